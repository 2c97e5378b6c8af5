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
"""
from __future__ import annotations

import functools
import shutil
import tempfile
import time

from worker.local_cluster import LocalCluster

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


def bench_size(client, echo, plan, *, repeat: int | None, min_time_s: float) -> list[dict]:
    """One row per op for the table `plan` describes (created already through `client`)."""
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
    moved = {"push": size, "pull": size, "push_pull": 2 * size}  # payload bytes sent + received
    rows = []
    for op in OPS:
        t_ours, t_raw, t_floor = _timed_rounds([ours[op], raw[op], floor[op]], repeat=repeat, min_time_s=min_time_s)
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
    return rows


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


def run_bench(servers: int, sizes: list[int], *, partition_bytes: int, tensors: int, repeat: int | None,
              min_time_s: float, children: LocalCluster) -> list[dict]:
    """Start the processes into `children`, measure every size, return the rows (children left running)."""
    import numpy as np

    from protocol.buffers import keep_freed_buffers
    from protocol.plan import make_plan
    from worker.bench.raw_echo import EchoClient
    from worker.client import ParamClient

    # This process is the client of both ours and raw: it reuses freed
    # receive buffers for both, as every shard and echo server does.
    keep_freed_buffers()

    addrs = [children.start(f"server-{k}", "server", "--bind", "tcp://127.0.0.1:0", "--shard-id", str(k),
                            "--log-level", "warning")["addr"] for k in range(servers)]
    raw_addrs = [children.start(f"echo-{k}", "--bind", "tcp://127.0.0.1:0", module="worker.bench.raw_echo")["addr"]
                 for k in range(servers)]
    rows = []
    echo = EchoClient(raw_addrs, timeout_s=REQUEST_TIMEOUT_S)
    try:
        for size in sizes:
            count = size // 4
            shapes = {f"t{i:03d}": (count // tensors + (1 if i < count % tensors else 0),) for i in range(tensors)}
            plan = make_plan({name: (shape, "float32") for name, shape in shapes.items()}, servers, partition_bytes)
            with ParamClient(addrs, plan, job=f"bench-{size}", worker="bench", timeout_s=REQUEST_TIMEOUT_S,
                             retries=0) as client:
                client.create({name: np.zeros(shape, np.float32) for name, shape in shapes.items()},
                              optimizer={"kind": "sgd", "lr": LEARNING_RATE})
                rows.extend(bench_size(client, echo, plan, repeat=repeat, min_time_s=min_time_s))
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
    if fmt is None:
        return human_size(row[key])
    if fmt == "ms":
        return f"{row[key] * 1000:.3f}"
    return fmt.format(row[key])


def format_table(rows: list[dict]) -> str:
    """Rows as an aligned text table (text left, numbers right)."""
    cells = [[_cell(row, key, fmt) for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(COLUMNS)]

    def line(values: list[str]) -> str:
        pairs = enumerate(zip(values, widths, strict=True))
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in pairs)

    return "\n".join([line([h for h, _, _ in COLUMNS]), *(line(c) for c in cells)])


def describe(servers: int, partition_bytes: int, tensors: int) -> str:
    """The line above the table: what was measured against what."""
    return (f"servers: {servers}  partition: {human_size(partition_bytes)}  tensors: {tensors}  "
            f"transport: tcp (127.0.0.1)  raw: pyzmq zero-copy request/reply of the same frames  "
            f"floor: raw + numpy update on the server + copy into the client's arrays")


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
        min_time_s: float) -> list[dict]:
    """Start S shards and S echo servers, measure every size, stop and reap them all; the rows.

    Raises ValueError for sizes `check_sizes` refuses (before anything
    starts) and ClusterError when a process does not start.
    """
    check_sizes(sizes, tensors, partition_bytes)
    log_dir = tempfile.mkdtemp(prefix="psctl-bench-")
    children = LocalCluster(log_dir)
    try:
        return run_bench(servers, sizes, partition_bytes=partition_bytes, tensors=tensors, repeat=repeat,
                         min_time_s=min_time_s, children=children)
    finally:
        children.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
