"""The push/pull benchmark behind `psctl bench pushpull`: latency and throughput
through real shard processes, next to raw pyzmq request/reply of the same bytes
measured in the same run.

The command (worker/cli/cmd_bench_pushpull.py) parses and prints; `run` here
starts the processes, measures and always stops them. numpy and the client code
are imported inside the functions, so the command line loads this module cheaply.

For each size: S `psctl server` processes hold a table of float32 tensors
of that many bytes in all (SGD, a tiny learning rate), and S raw echo
processes (worker/bench/raw_echo.py) stand beside them. The raw reference mirrors
our messages frame for frame: to each echo server go the bytes our client
sends to the matching shard, and back come the bytes that shard returns:

    push       the gradient slices out, a tiny reply back
    pull       a tiny request out, the parameter slices back
    push_pull  the gradient slices out, the parameter slices back

Beside raw stands the floor (worker/bench/raw_echo.py): the same round trips
plus the least work the bytes need, in numpy (the server's one-pass update
of its parameters, the client's one copy of the replies). slowdown = our
median / raw median; 1.0 would mean no overhead at all. over_floor = our
median / the floor's: what the machinery costs beyond the work itself.
Ours, raw and the floor take turns call by call, so machine noise hits
all three alike.

With `curve=True` a second set of S shards runs with CURVE on (`--curve-dir`
on a throwaway key dir that LocalCluster.make_keys makes with `psctl keys
generate` in the run's temporary folder, removed afterwards), and our client calls them as a worker key would, in the
same rounds as the rest: each row gains curve_median_s (and its p90) and
curve_over_plain = CURVE median / plain median, the cost of authentication
and encryption on the wire. Both sets of shards are set up the way the
scheduler sets up a job (a scheduler-role client creates the table and sends
the membership that names the bench's worker id), so the two differ only in
CURVE.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from worker.local_cluster import ClusterError, LocalCluster

OPS = ("push", "pull", "push_pull")
DEFAULT_SIZES_BYTES = (4 * 1024, 1024**2, 16 * 1024**2)
DEFAULT_PARTITION_BYTES = 4 * 1024**2
# A figure needs a few samples for a median and a p90 to mean anything.
MIN_REPEATS = 5
# Upper bound of timed calls per figure with --min-time (tiny sizes, fast machines).
MAX_REPEATS = 100_000
# Warm-up per figure: this many calls each of ours and raw, or this share
# of --min-time, whichever takes longer (sockets connected, caches hot).
WARMUP_CALLS = 3
WARMUP_SHARE = 0.1
REQUEST_TIMEOUT_S = 30.0
# Gradient values and learning rate: small, so thousands of steps keep the
# parameters finite and ordinary.
GRAD_VALUE = 1e-3
LEARNING_RATE = 1e-3
# The bench's worker id: with --curve its key is LocalCluster.make_keys's "worker", whose ids start "worker-".
WORKER_ID = "worker-bench"

COLUMNS = (  # (header, row key, format)
    ("op", "op", "{}"),
    ("size", "size", None),
    ("median ms", "median_s", "ms"),
    ("p90 ms", "p90_s", "ms"),
    ("GB/s", "gb_per_s", "{:.2f}"),
    ("raw median ms", "raw_median_s", "ms"),
    ("raw p90 ms", "raw_p90_s", "ms"),
    ("raw GB/s", "raw_gb_per_s", "{:.2f}"),
    ("slowdown", "slowdown", "{:.2f}"),
    ("floor ms", "floor_median_s", "ms"),
    ("over floor", "over_floor", "{:.2f}"),
)
CURVE_COLUMNS = (  # added with --curve
    ("curve ms", "curve_median_s", "ms"),
    ("curve p90 ms", "curve_p90_s", "ms"),
    ("curve/plain", "curve_over_plain", "{:.2f}"),
)
WIRE_COLUMNS = (  # added with --wire fp16 (or topk:R): the same calls with the job's compression
    ("wire ms", "wire_median_s", "ms"),
    ("wire/f32", "wire_over_f32", "{:.2f}"),
    ("codec ms", "codec_median_s", "ms"),
)


# --- measurement ----------------------------------------------------------------

def _quantiles(times: list[float]) -> tuple[float, float]:
    import numpy as np

    arr = np.asarray(times)
    return float(np.median(arr)), float(np.percentile(arr, 90))


def _timed_rounds(fns: list, *, repeat: int | None, min_time_s: float) -> list[list[float]]:
    """Call every fn once per round, rotating who goes first, and time each call.

    Returns one list of call times per fn. Rounds stop after `repeat`, or
    once `min_time_s` was spent (at least MIN_REPEATS rounds).
    """
    perf = time.perf_counter
    warm_until = perf() + (0.0 if repeat is not None else WARMUP_SHARE * min_time_s)
    calls = 0
    while calls < WARMUP_CALLS or perf() < warm_until:
        for fn in fns:
            fn()
        calls += 1
    times: list[list[float]] = [[] for _ in fns]
    spent = 0.0
    i = 0
    while True:
        if repeat is not None:
            if i >= repeat:
                break
        elif i >= MAX_REPEATS or (i >= MIN_REPEATS and spent >= min_time_s):
            break
        for j in range(len(fns)):
            k = (i + j) % len(fns)
            t0 = perf()
            fns[k]()
            dt = perf() - t0
            times[k].append(dt)
            spent += dt
        i += 1
    return times


def bench_size(client, echo, plan, *, repeat: int | None, min_time_s: float, curve_client=None,
               wire_client=None) -> list[dict]:
    """One row per op for the table `plan` describes (created already through `client`).

    With `curve_client` (the same table on the CURVE shards), its calls take
    turns with the others and each row gains its figures; so with
    `wire_client` (the same table, gradients sent with a compression).
    """
    import numpy as np

    from worker.bench.raw_echo import filled

    grads = {t.name: np.full(t.shape, GRAD_VALUE, np.float32) for t in plan.tensors}
    outs = {t.name: np.ones(t.shape, np.float32) for t in plan.tensors}  # reused: no page faults
    size = sum(t.size * t.itemsize for t in plan.tensors)
    # The raw mirror of our messages: per shard, frames of the same bytes as its slices.
    raw_grad = {t.name: filled(t.size * t.itemsize) for t in plan.tensors}
    frames = {k: [raw_grad[s.name][s.start * 4:s.stop * 4] for s in plan.slices_on(k)]
              for k in range(plan.num_shards) if plan.slices_on(k)}
    raw = {op: functools.partial(echo.request, sends) for op, sends in _raw_sends(frames, update=False).items()}
    # The floor: the same round trips, the server's one-pass update and our copy of the replies.
    floor_out = {k: [filled(f.nbytes) for f in fs] for k, fs in frames.items()}
    floor = {op: functools.partial(_floor_call, echo, sends, floor_out)
             for op, sends in _raw_sends(frames, update=True).items()}
    ours = {
        "push": lambda: client.push(grads),
        "pull": lambda: client.pull(out=outs),
        "push_pull": lambda: client.push_pull(grads, out=outs),
    }
    curve = None if curve_client is None else {
        "push": lambda: curve_client.push(grads),
        "pull": lambda: curve_client.pull(out=outs),
        "push_pull": lambda: curve_client.push_pull(grads, out=outs),
    }
    wire = None if wire_client is None else {
        "push": lambda: wire_client.push(grads),
        "pull": lambda: wire_client.pull(out=outs),
        "push_pull": lambda: wire_client.push_pull(grads, out=outs),
    }
    # The numpy work the compression adds, alone: the worker's encoding and the shard's decoding
    # of every slice (protocol/compression.py), timed in the same rounds.
    codec = None if wire_client is None else functools.partial(_codec_call, wire_client.compressor, plan, grads)
    moved = {"push": size, "pull": size, "push_pull": 2 * size}  # payload bytes sent + received
    rows = []
    for op in OPS:
        fns = [ours[op], raw[op], floor[op]] + ([wire[op], codec] if wire is not None and op != "pull" else []) \
            + ([curve[op]] if curve is not None else [])
        t_ours, t_raw, t_floor, *t_more = _timed_rounds(fns, repeat=repeat, min_time_s=min_time_s)
        t_wire = [t_more.pop(0), t_more.pop(0)] if wire is not None and op != "pull" else []
        t_curve = t_more
        median, p90 = _quantiles(t_ours)
        raw_median, raw_p90 = _quantiles(t_raw)
        floor_median, floor_p90 = _quantiles(t_floor)
        rows.append({
            "op": op, "size": size, "tensors": len(plan.tensors), "repeats": len(t_ours),
            "median_s": median, "p90_s": p90,
            "raw_median_s": raw_median, "raw_p90_s": raw_p90,
            "floor_median_s": floor_median, "floor_p90_s": floor_p90,
            "gb_per_s": moved[op] / median / 1e9, "raw_gb_per_s": moved[op] / raw_median / 1e9,
            "slowdown": median / raw_median,
            "over_floor": median / floor_median,
        })
        if t_wire:
            wire_median, _wire_p90 = _quantiles(t_wire[0])
            rows[-1].update({"wire": wire_client.compressor.kind, "wire_median_s": wire_median,
                             "wire_over_f32": wire_median / median, "codec_median_s": _quantiles(t_wire[1])[0]})
        if t_curve:
            curve_median, curve_p90 = _quantiles(t_curve[0])
            rows[-1].update({
                "curve_median_s": curve_median, "curve_p90_s": curve_p90,
                "curve_gb_per_s": moved[op] / curve_median / 1e9,
                "curve_over_plain": curve_median / median,
            })
    return rows


def _codec_call(compressor, plan, grads: dict) -> None:
    """Encode every gradient slice as the client does and decode it as the shard does."""
    from protocol.compression import Compressor, wire_slices
    from protocol.messages import SliceData

    scratch = Compressor(f"{compressor.kind}:{compressor.ratio}" if compressor.kind == "topk" else compressor.kind)
    for k in range(plan.num_shards):
        held = {s.sid: s for s in plan.slices_on(k)}
        frames = [f for s in held.values()
                  for f in scratch.encode(SliceData(s.sid, grads[s.name].reshape(-1)[s.start:s.stop]))]
        wire_slices(tuple(frames), held, scratch.coding)


def _raw_sends(frames: dict[int, list], *, update: bool) -> dict[str, dict[int, list]]:
    """Per op, the frames each echo server gets: the sizes of the reply it must send, then the payload."""
    from worker.bench.raw_echo import EchoClient

    none = EchoClient.sizes_frame([], update=update)
    back = {k: EchoClient.sizes_frame([f.nbytes for f in fs], update=update) for k, fs in frames.items()}
    return {
        "push": {k: [none, *fs] for k, fs in frames.items()},
        "pull": {k: [back[k]] for k in frames},
        "push_pull": {k: [back[k], *fs] for k, fs in frames.items()},
    }


def _floor_call(echo, sends: dict[int, list], outs: dict[int, list]) -> None:
    """One floor round trip, each reply frame then copied once into the caller's array, as ours does."""
    import numpy as np

    for k, reply in zip(sends, echo.request(sends), strict=True):
        for frame, dst in zip(reply[1:], outs[k], strict=False):
            np.copyto(dst, np.frombuffer(frame.buffer, np.uint8))


@dataclass(frozen=True)
class BenchKeys:
    """The throwaway CURVE keys of a --curve run: the scheduler's and the worker's pairs, the shards' public key."""

    dir: str
    scheduler: tuple[str, str]
    worker: tuple[str, str]
    server: str


def load_keys(directory: str) -> BenchKeys:
    """The bench's keys from a dir LocalCluster.make_keys made (one key per role, named after it)."""
    from protocol.keys import Identity, KeyFileError, KeyRing

    try:
        ring = KeyRing(directory)
        _, *scheduler = ring.own("scheduler")
        _, *worker = ring.own("worker")
        return BenchKeys(directory, tuple(scheduler), tuple(worker), ring.public[Identity("server", "server")])
    except (KeyFileError, KeyError) as exc:
        raise ClusterError(f"the bench's keys in {directory} are not usable: {exc}") from None


def start_shards(children: LocalCluster, servers: int, keys: BenchKeys | None) -> list[str]:
    """S shard processes on loopback (with CURVE when `keys`), no scheduler; their addresses."""
    prefix, curve_dir = ("curve-server", keys.dir) if keys else ("server", "")  # "": off, whatever the env says
    return [children.start(f"{prefix}-{k}", "server", "--bind", "tcp://127.0.0.1:0", "--shard-id", str(k),
                           "--log-level", "warning", "--curve-dir", curve_dir)["addr"] for k in range(servers)]


def open_table(addrs: list[str], plan, job: str, arrays: dict, keys: BenchKeys | None,
               compression: str | None = None):
    """Set up `job` on the shards as the scheduler would, and return the bench's ParamClient for it.

    A client with the scheduler's key creates the table and sends the
    membership that names WORKER_ID (CURVE shards take `create` and
    `membership` only from the scheduler, pushes only from members); the
    returned client then speaks as that worker, with the worker's key.
    """
    from protocol.messages import Membership
    from worker.client import ParamClient

    shard_keys = [keys.server] * len(addrs) if keys else []
    common = {"timeout_s": REQUEST_TIMEOUT_S, "retries": 0, "shard_keys": shard_keys}
    with ParamClient(addrs, plan, job=job, worker="scheduler", curve=keys.scheduler if keys else None,
                     **common) as control:
        control.create(arrays, optimizer={"kind": "sgd", "lr": LEARNING_RATE})
        # No public call sends a membership (the scheduler's own calls live in ps/): the client's engine does.
        control._exchange({k: Membership(**control._common(k, -1), epoch=1, workers={WORKER_ID: -1})
                           for k in range(len(addrs))})
    return ParamClient(addrs, plan, job=job, worker=WORKER_ID, curve=keys.worker if keys else None,
                       compression=compression, **common)


def run_bench(servers: int, sizes: list[int], *, partition_bytes: int, tensors: int, repeat: int | None,
              min_time_s: float, children: LocalCluster, keys: BenchKeys | None = None,
              wire: str | None = None) -> list[dict]:
    """Start the processes into `children`, measure every size, return the rows (children left running).

    With `keys`, S more shards run with CURVE and every row gains its figures.
    """
    import numpy as np

    from protocol.buffers import keep_freed_buffers
    from protocol.plan import make_plan
    from worker.bench.raw_echo import EchoClient

    # This process is the client of both ours and raw: it reuses freed
    # receive buffers for both, as every shard and echo server does.
    keep_freed_buffers()

    addrs = start_shards(children, servers, None)
    curve_addrs = start_shards(children, servers, keys) if keys else None
    raw_addrs = [children.start(f"echo-{k}", "--bind", "tcp://127.0.0.1:0", module="worker.bench.raw_echo")["addr"]
                 for k in range(servers)]
    rows = []
    echo = EchoClient(raw_addrs, timeout_s=REQUEST_TIMEOUT_S)
    try:
        for size in sizes:
            count = size // 4
            shapes = {f"t{i:03d}": (count // tensors + (1 if i < count % tensors else 0),) for i in range(tensors)}
            plan = make_plan({name: (shape, "float32") for name, shape in shapes.items()}, servers, partition_bytes)
            initial = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
            job = f"bench-{size}"
            with open_table(addrs, plan, job, initial, None) as client:
                if wire:
                    with open_table(addrs, plan, job + "-wire", initial, None, wire) as wire_client:
                        rows.extend(bench_size(client, echo, plan, repeat=repeat, min_time_s=min_time_s,
                                               wire_client=wire_client))
                    continue
                if curve_addrs is None:
                    rows.extend(bench_size(client, echo, plan, repeat=repeat, min_time_s=min_time_s))
                    continue
                with open_table(curve_addrs, plan, job, initial, keys) as curve_client:
                    rows.extend(bench_size(client, echo, plan, repeat=repeat, min_time_s=min_time_s,
                                           curve_client=curve_client))
    finally:
        echo.close()
    return rows


# --- output ---------------------------------------------------------------------

def human_size(nbytes: int) -> str:
    """4096 -> '4 KiB', 16777216 -> '16 MiB', 1000 -> '1000 B'."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    if nbytes >= 1024**2:
        return f"{nbytes / 1024**2:.2f} MiB"
    return f"{nbytes} B"


def _cell(row: dict, key: str, fmt: str | None) -> str:
    if key not in row:
        return "-"  # a figure this op has not (pull with --wire: replies are float32 either way)
    if fmt is None:
        return human_size(row[key])
    if fmt == "ms":
        return f"{row[key] * 1000:.3f}"
    return fmt.format(row[key])


def format_table(rows: list[dict]) -> str:
    """Rows as an aligned text table (text left, numbers right); CURVE columns when the rows have them."""
    columns = COLUMNS + (WIRE_COLUMNS if rows and "wire_median_s" in rows[0] else ()) \
        + (CURVE_COLUMNS if rows and "curve_median_s" in rows[0] else ())
    cells = [[_cell(row, key, fmt) for _, key, fmt in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(columns)]

    def line(values: list[str]) -> str:
        pairs = enumerate(zip(values, widths, strict=True))
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in pairs)

    return "\n".join([line([h for h, _, _ in columns]), *(line(c) for c in cells)])


def describe(servers: int, partition_bytes: int, tensors: int, curve: bool = False) -> str:
    """The line above the table: what was measured against what."""
    line = (f"servers: {servers}  partition: {human_size(partition_bytes)}  tensors: {tensors}  "
            f"transport: tcp (127.0.0.1)  raw: pyzmq zero-copy request/reply of the same frames  "
            f"floor: raw + numpy update on the server + copy into the client's arrays")
    if curve:
        line += f"  curve: the same calls to {servers} more shard(s) with CURVE on (curve/plain: median over median)"
    return line


# --- the whole run ----------------------------------------------------------------

def check_sizes(sizes: list[int], tensors: int, partition_bytes: int) -> None:
    """ValueError, one sentence, for sizes the bench cannot lay out as float32 tensors."""
    for size in sizes:
        if size < 4 or size % 4:
            raise ValueError(f"--size {size} must be a positive multiple of 4 bytes (float32 elements)")
        if size // 4 < tensors:
            raise ValueError(f"--size {size} holds {size // 4} float32 elements, fewer than --tensors {tensors}")
    if partition_bytes < 4:
        raise ValueError(f"--partition-bytes must be at least 4 (one float32), found {partition_bytes}")


def run(servers: int, sizes: list[int], *, partition_bytes: int, tensors: int, repeat: int | None,
        min_time_s: float, curve: bool = False, wire: str | None = None) -> list[dict]:
    """Start S shards and S echo servers, measure every size, stop and reap them all; the rows.

    With `curve`, also S shards with CURVE on, their keys generated in the
    run's temporary folder (removed with it). Raises ValueError for sizes
    `check_sizes` refuses (before anything starts) and ClusterError when a
    process does not start.
    """
    check_sizes(sizes, tensors, partition_bytes)
    log_dir = tempfile.mkdtemp(prefix="psctl-bench-")
    children = LocalCluster(log_dir)
    try:
        keys = load_keys(children.make_keys(os.path.join(log_dir, "keys"))) if curve else None
        return run_bench(servers, sizes, partition_bytes=partition_bytes, tensors=tensors, repeat=repeat,
                         min_time_s=min_time_s, children=children, keys=keys, wire=wire)
    finally:
        children.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
