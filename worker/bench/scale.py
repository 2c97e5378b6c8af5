"""The scale benchmark behind `psctl bench scale`: a wide MLP of a given parameter count,
trained for a few steps on S shards and W workers with Adam, and what it cost.

One run starts a local cluster (worker/local_cluster.py: a scheduler, S
`psctl server` and W `psctl worker` processes, each worker with its share
of the cores as BLAS threads) and S raw echo servers (worker/bench/raw_echo.py),
submits one job and waits for it to succeed:

    model      mlp, hidden [H, H] on sklearn:digits (64 inputs, 10 classes),
               H chosen so the parameter count is within 1% of --params
    optimizer  adam (the shards keep m and v beside each value: 3x the bytes)
    policy     --policy (asp by default; bsp also keeps a gradient-sized sum
               buffer per slice on each shard, ps/table.py)

Then, from what happened (never from the plan):

- per process, its peak resident memory (VmHWM of /proc/PID/status) and
  its ratio to the bytes it must hold: a shard, its slices of the
  parameters (its `stats` reply) times 3 for Adam's state; a worker, the
  model's parameters. The ratio says what the machinery costs on top
  (receive buffers, copies in flight, the worker's gradients and
  activations). Read before anything below adds a table to the shards;
- examples/s of the training: the examples the job's partitions did over
  its training time, both as the scheduler counted them (its `result`:
  from the tables' creation to the last step, so the first worker's
  initial load of the parameters is in it);
- cold and warm push_pull: in this process, a ParamClient on the same
  shards creates a second table of the same plan with Adam (ASP, clock
  -1: nothing waits for a barrier) and times its first push_pull of the
  whole model (cold: the shards touch their optimizer state and reply
  buffers for the first time), then the median of `repeat` more (warm);
  the same frames go to the raw echo servers (pyzmq request/reply of the
  same bytes, zero-copy, no header, no work), cold and warm, taking turns
  with ours call by call so machine noise hits both alike. Ratios:
  cold/warm, and warm/raw (1.0 would be no overhead at all).

The command (worker/cli/cmd_bench_scale.py) parses and prints; numpy and
the clients are imported inside the functions. Every process started is
stopped and reaped on any exit (success, failure, Ctrl-C); the logs are
kept, and named, when the job did not succeed.
"""
from __future__ import annotations

import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable

from protocol.jobstate import FINAL_STATES, JobState
from worker.bench import checkpoint_bench
from worker.local_cluster import ClusterError, LocalCluster, request, worker_threads

# The data every run trains on: shipped with the package, so the bench needs nothing else.
DATA_SOURCE = "sklearn:digits"
DIGITS_FEATURES = 64
DIGITS_CLASSES = 10
PARAM_BYTES = 4                 # float32, as every tensor the servers hold (protocol/jobspec.py)
# Adam keeps two arrays beside each parameter slice (m and v, ps/optim.py): a shard holds 3x its share.
ADAM_COPIES = 3
# Below this a two-layer MLP cannot be sized within 1% (one unit of H moves the count by 2H + 76).
MIN_PARAMS = 100_000
MAX_PARAMS = 100 * 10**9
# The hidden width's count may miss the request by this share at most.
PARAMS_TOLERANCE = 0.01
POLICIES = ("asp", "bsp", "ssp")
LEARNING_RATE = 1e-4
GRAD_VALUE = 1e-3
# The job's own evaluations: none mid-run (the last step of partition 0 and the final one still run).
EVAL_EVERY = 10**9
# How often the job's status is read while it trains (seconds).
POLL_S = 0.5
REQUEST_TIMEOUT_S = 600.0      # one push_pull of a whole large model, on a loaded machine
DEFAULT_TIMEOUT_S = 3600.0


class ScaleError(RuntimeError):
    """The bench's job did not succeed, or outlived its timeout (the message names the kept logs)."""


# --- sizing ----------------------------------------------------------------------------------

def parse_count(text: str) -> int:
    """'500M' -> 500_000_000, '1.5G', '20k', '2000000' (worker/bench/checkpoint_bench.py reads them);
    ValueError, one sentence naming --params, otherwise or out of the bench's range."""
    value = checkpoint_bench.parse_count(text)
    if not MIN_PARAMS <= value <= MAX_PARAMS:
        raise ValueError(f"--params {str(text)!r} is {value:,} parameters, outside the {MIN_PARAMS:,} to "
                         f"{MAX_PARAMS:,} the bench sizes models to")
    return value


def model_spec(hidden: int) -> dict:
    return {"kind": "mlp", "hidden": [hidden, hidden]}


def count_params(hidden: int) -> int:
    """Parameters of model_spec(hidden) on the bench's data (worker/nn/model.py counts them)."""
    from worker.nn.model import count_values

    return count_values(model_spec(hidden), (DIGITS_FEATURES,), DIGITS_CLASSES)


def hidden_for(params: int) -> int:
    """The width H of hidden [H, H] whose count is nearest `params` (ValueError if not within 1%)."""
    # H^2 + (F + 2 + C) H + C = params, F inputs and C classes: the positive root, then its neighbours.
    b = DIGITS_FEATURES + 2 + DIGITS_CLASSES
    root = (-b + math.sqrt(b * b + 4 * max(0, params - DIGITS_CLASSES))) / 2
    best = min((h for h in range(max(1, int(root) - 1), int(root) + 3)), key=lambda h: abs(count_params(h) - params))
    if abs(count_params(best) - params) > PARAMS_TOLERANCE * params:
        raise ValueError(f"no hidden width gives {params:,} parameters within 1%")
    return best


def job_spec(params: int, *, workers: int, steps: int, batch_size: int, policy: str) -> dict:
    """The normalized job of one run; ValueError (SpecError) if the job spec refuses an option."""
    from protocol.jobspec import validate_job

    return validate_job({
        "name": "bench-scale", "seed": 0, "workers": workers, "steps": steps, "eval_every": EVAL_EVERY,
        "model": model_spec(hidden_for(params)),
        "data": {"source": DATA_SOURCE, "batch_size": batch_size},
        "optimizer": {"kind": "adam", "lr": LEARNING_RATE},
        "consistency": {"policy": policy},
    })


def memory_estimate(params: int, *, servers: int, workers: int) -> int:
    """Bytes this machine needs at least, all processes together (a rough floor, for a warning).

    Shards: the job's table, then the push_pull table, each 3x the model
    (Adam); workers: parameters and a little more (dense gradients go out
    in row blocks: worker/task.py); this process: the gradients and the
    replies of its push_pull.
    """
    model = params * PARAM_BYTES
    return model * (ADAM_COPIES + 2 * workers + 2)


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo, None where there is none."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# --- measuring -------------------------------------------------------------------------------

def peak_rss(pid: int) -> int:
    """The peak resident set of a live process (VmHWM, bytes); 0 if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def wait_for_job(client, job: str, *, timeout_s: float, log: Callable[[str], None]) -> dict:
    """The job's final status body; a line to `log` whenever its steps move; TimeoutError past `timeout_s`."""
    from protocol.messages import Status

    deadline = time.monotonic() + timeout_s
    shown = None
    while True:
        body = request(client, Status(job=job))
        prog = body.get("progress") or {}
        seen = (body["state"], prog.get("steps_done"))
        if seen != shown:
            shown = seen
            log(f"job {job}: {body['state']}, steps {prog.get('steps_done', 0)}/{prog.get('steps_asked') or '?'}")
        if body["state"] in FINAL_STATES:
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job} did not end within {timeout_s:g}s")
        time.sleep(POLL_S)  # a job's progress is read, not announced: a status request every POLL_S


def _raw_frames(plan, grads: dict) -> dict[int, list]:
    """Per shard, the frames of the bytes our push_pull sends it: views of `grads` (no copies)."""
    import numpy as np

    flat = {name: np.ascontiguousarray(g).reshape(-1).view(np.uint8) for name, g in grads.items()}
    return {k: [flat[s.name][s.start * PARAM_BYTES:s.stop * PARAM_BYTES] for s in plan.slices_on(k)]
            for k in range(plan.num_shards) if plan.slices_on(k)}


def time_push_pull(addrs: list[str], echo_addrs: list[str], plan, *, job: str, repeat: int) -> dict:
    """Cold and warm push_pull of the whole model on a new Adam table of `plan`, beside raw pyzmq of the same bytes.

    Blocks for 2 + 2 x `repeat` round trips of the model to every shard;
    raises ShardError / ShardTimeout (worker/client.py) and TimeoutError
    (a raw echo server silent).
    """
    import numpy as np

    from protocol.buffers import keep_freed_buffers
    from worker.bench.raw_echo import EchoClient
    from worker.client import ParamClient

    keep_freed_buffers()  # as the shards and the echo servers do: the same allocator on both sides
    shapes = {t.name: t.shape for t in plan.tensors}
    grads = {name: np.full(shape, GRAD_VALUE, np.float32) for name, shape in shapes.items()}
    outs = {name: np.ones(shape, np.float32) for name, shape in shapes.items()}  # touched: no page faults here
    frames = _raw_frames(plan, grads)
    # push_pull: the gradient slices out, as many bytes of parameters back (EchoClient.sizes_frame: what to send).
    sends = {k: [EchoClient.sizes_frame([f.nbytes for f in fs]), *fs] for k, fs in frames.items()}
    perf = time.perf_counter
    with ParamClient(addrs, plan, job=job, worker="bench-scale", timeout_s=REQUEST_TIMEOUT_S, retries=0) as client:
        echo = EchoClient(echo_addrs, timeout_s=REQUEST_TIMEOUT_S)
        try:
            client.create({name: np.zeros(shape, np.float32) for name, shape in shapes.items()},
                          optimizer={"kind": "adam", "lr": LEARNING_RATE})
            echo.request({k: [EchoClient.sizes_frame([])] for k in sends})  # connected, as `client` is by now
            t0 = perf()
            client.push_pull(grads, out=outs)
            cold = perf() - t0
            t0 = perf()
            echo.request(sends)
            raw_cold = perf() - t0
            ours, raw = [], []
            for i in range(repeat):  # taking turns, who goes first alternating
                pair = [(ours, lambda: client.push_pull(grads, out=outs)), (raw, lambda: echo.request(sends))]
                for times, call in (pair if i % 2 == 0 else pair[::-1]):
                    t0 = perf()
                    call()
                    times.append(perf() - t0)
        finally:
            echo.close()
    warm, raw_warm = float(np.median(ours)), float(np.median(raw))
    model_bytes = sum(t.size * t.itemsize for t in plan.tensors)
    return {
        "bytes_out": model_bytes, "bytes_back": model_bytes, "repeats": repeat,
        "cold_s": cold, "warm_s": warm, "raw_cold_s": raw_cold, "raw_warm_s": raw_warm,
        "cold_over_warm": cold / warm, "warm_over_raw": warm / raw_warm, "raw_cold_over_warm": raw_cold / raw_warm,
        "warm_gb_per_s": 2 * model_bytes / warm / 1e9, "raw_gb_per_s": 2 * model_bytes / raw_warm / 1e9,
    }


def measure_processes(cluster: LocalCluster, shard_stats: list[dict], job: str, model_bytes: int) -> list[dict]:
    """One row per shard and worker: peak RSS and its ratio to the bytes the process holds."""
    rows = []
    for stats in shard_stats:
        k = stats["shard"]
        params = int(stats["jobs"][job]["bytes"])
        held = params * ADAM_COPIES
        rss = peak_rss(cluster.pid_of(f"server-{k}"))
        rows.append({"name": f"server-{k}", "role": "server", "param_bytes": params, "holds_bytes": held,
                     "peak_rss_bytes": rss, "rss_over_held": rss / held if held else None})
    names = sorted((name for name, _ in cluster.children if name.startswith("worker-")),
                   key=lambda n: int(n.split("-")[1]))
    for name in names:
        rss = peak_rss(cluster.pid_of(name))
        rows.append({"name": name, "role": "worker", "param_bytes": model_bytes, "holds_bytes": model_bytes,
                     "peak_rss_bytes": rss, "rss_over_held": rss / model_bytes,
                     "blas_threads": cluster.ready_of(name).get("blas_threads")})
    return rows


# --- the whole run ---------------------------------------------------------------------------

def run(params: int, *, servers: int, workers: int, steps: int, batch_size: int, policy: str = "asp",
        repeat: int = 5, threads_per_worker: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
        log: Callable[[str], None] = lambda line: None) -> dict:
    """Start the cluster, train, measure, stop and reap everything; the result (see `format_report`).

    Raises ValueError for options the job spec refuses (before anything
    starts), ClusterError when a process does not start, ScaleError when
    the job does not succeed in time, ShardError/ShardTimeout when the
    push_pull timing fails.
    """
    from protocol.messages import Drop, Export, Submit
    from protocol.plan import Plan
    from worker.client import ParamClient

    spec = job_spec(params, workers=workers, steps=steps, batch_size=batch_size, policy=policy)
    hidden = spec["model"]["hidden"]
    need, have = memory_estimate(params, servers=servers, workers=workers), available_bytes()
    if have is not None and need > have:
        log(f"warning: this run needs about {need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB "
            "this machine has available")
    threads = threads_per_worker or worker_threads(workers)
    log_dir = tempfile.mkdtemp(prefix="psctl-bench-scale-")
    cluster = LocalCluster(log_dir)
    client = None
    keep_logs = False  # kept when the job failed or a process did not start: the error names them
    try:
        _addr, client = cluster.boot(servers, [[] for _ in range(workers)], threads_per_worker=threads)
        echo_addrs = [cluster.start(f"echo-{k}", "--bind", "tcp://127.0.0.1:0", module="worker.bench.raw_echo")["addr"]
                      for k in range(servers)]
        job = request(client, Submit(spec=spec, submission_id=uuid.uuid4().hex))["job"]
        log(f"job {job}: mlp {DIGITS_FEATURES}-{hidden[0]}-{hidden[1]}-{DIGITS_CLASSES}, {servers} shard(s), "
            f"{workers} worker(s) with {threads} BLAS thread(s) each, {steps} step(s) of batch {batch_size}")
        try:
            body = wait_for_job(client, job, timeout_s=timeout_s, log=log)
        except TimeoutError as exc:
            raise ScaleError(f"{exc} (logs in {log_dir})") from None
        if body["state"] != JobState.SUCCEEDED:
            raise ScaleError(f"job {job} {body['state']}: {body.get('error') or 'no error given'} (logs in {log_dir})")
        result = body.get("result") or {}
        export = request(client, Export(job=job))
        plan = Plan.from_wire(export["plan"])
        model_bytes = sum(t.size * t.itemsize for t in plan.tensors)
        with ParamClient(export["shards"], plan, job=job, worker="bench-scale-observer", timeout_s=REQUEST_TIMEOUT_S,
                         retries=1) as observer:
            shard_stats = observer.stats()
            processes = measure_processes(cluster, shard_stats, job, model_bytes)  # before the push_pull table
            # The measured job's tables go before the push_pull table comes: the shards hold one model's
            # Adam table at a time, not two (a 500M model is 6 GB of tables over the shards).
            observer._exchange({k: Drop(**observer._common(k, -1)) for k in range(plan.num_shards)})
        push_pull = time_push_pull(export["shards"], echo_addrs, plan, job=f"{job}-pushpull", repeat=repeat)
        train_s = float(result.get("train_s") or 0.0)
        examples = int(result.get("examples") or 0)
        return {
            "params": sum(t.size for t in plan.tensors), "params_asked": params, "model_bytes": model_bytes,
            "model": f"mlp {DIGITS_FEATURES}-{hidden[0]}-{hidden[1]}-{DIGITS_CLASSES}", "hidden": list(hidden),
            "data": DATA_SOURCE, "optimizer": "adam", "policy": policy,
            "servers": servers, "workers": workers, "threads_per_worker": threads, "batch_size": batch_size,
            "bytes_per_shard": [p["param_bytes"] for p in processes if p["role"] == "server"],
            "processes": processes,
            "push_pull": push_pull,
            "training": {"job": job, "steps_asked": result.get("steps_asked"), "steps_done": result.get("steps_done"),
                         "examples": examples, "train_s": train_s, "wall_s": result.get("wall_s"),
                         "examples_per_s": examples / train_s if train_s > 0 else None},
        }
    except (ScaleError, ClusterError):
        keep_logs = True
        raise
    finally:
        if client is not None:
            client.close()
        cluster.stop()
        if keep_logs:
            log(f"logs kept in {log_dir}")
        else:
            shutil.rmtree(log_dir, ignore_errors=True)


# --- output ----------------------------------------------------------------------------------

def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_report(out: dict) -> str:
    """The result as lines for people: the run, a table of processes, push_pull, examples/s."""
    pp, tr = out["push_pull"], out["training"]
    lines = [
        f"{out['params']:,} parameters ({out['model']} on {out['data']}, {out['params_asked']:,} asked), "
        f"{_mb(out['model_bytes'])} MB; adam, {out['policy']}; {out['servers']} shard(s), {out['workers']} "
        f"worker(s) x {out['threads_per_worker']} BLAS thread(s), batch {out['batch_size']}",
        "",
        f"{'process':<10} {'params MB':>10} {'holds MB':>10} {'peak RSS MB':>12} {'RSS/holds':>10}",
    ]
    for p in out["processes"]:
        lines.append(f"{p['name']:<10} {_mb(p['param_bytes']):>10} {_mb(p['holds_bytes']):>10} "
                     f"{_mb(p['peak_rss_bytes']):>12} {_ratio(p['rss_over_held']):>10}")
    lines += [
        "(a shard holds its parameters and Adam's m and v: 3x; a worker, the model's parameters)",
        "",
        f"push_pull of the whole model ({_mb(pp['bytes_out'])} MB out, {_mb(pp['bytes_back'])} MB back), "
        f"warm: median of {pp['repeats']}",
        f"{'':<10} {'cold ms':>10} {'warm ms':>10} {'cold/warm':>10} {'warm GB/s':>10}",
        f"{'ours':<10} {pp['cold_s'] * 1e3:>10.2f} {pp['warm_s'] * 1e3:>10.2f} {_ratio(pp['cold_over_warm']):>10} "
        f"{pp['warm_gb_per_s']:>10.2f}",
        f"{'raw pyzmq':<10} {pp['raw_cold_s'] * 1e3:>10.2f} {pp['raw_warm_s'] * 1e3:>10.2f} "
        f"{_ratio(pp['raw_cold_over_warm']):>10} {pp['raw_gb_per_s']:>10.2f}",
        f"warm / raw: {_ratio(pp['warm_over_raw'])}",
        "",
        f"training: {tr['steps_done']} step(s), {tr['examples']:,} examples in {tr['train_s']:.2f} s: "
        f"{_ratio(tr['examples_per_s'])} examples/s",
    ]
    return "\n".join(lines)

