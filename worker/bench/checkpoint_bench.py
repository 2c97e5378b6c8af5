"""The checkpoint benchmark behind `psctl bench checkpoint`: what checkpointing costs a job's steps.

One `psctl server` process with --checkpoint-dir (a temporary folder,
removed afterwards) holds two tables of the same model, --params float32
parameters in one tensor, with the same optimizer: one checkpointed every
--every versions, one never. The bench is the only worker of both and
times push_pull steps (the gradient out, the parameters back: what a
worker's step waits for) in blocks of --steps, without and with
checkpoints in turn, --rounds times, so drift and noise fall on both alike.

Each block with checkpoints ends with a `stats` request, which the shard
answers once the checkpoint writes asked before it are on disk: the next
block without checkpoints never shares the machine with a write, and the
time that answer took is the write work still pending when the block ended
(`drain_s`). The shard's own figures (writes, seconds per write, seconds
of it spent checksumming) come in the same answer.

The command (worker/cli/cmd_bench_checkpoint.py) parses and prints; `run`
here starts the shard, measures and always stops it. numpy and the client
are imported inside the functions, so the command line loads this cheaply.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import time

from protocol.version import DEFAULT_MAX_MESSAGE_BYTES
from worker.local_cluster import ClusterError, LocalCluster

DEFAULT_PARAMS = 100_000_000
DEFAULT_EVERY = 10
DEFAULT_STEPS = 30
DEFAULT_ROUNDS = 2
DEFAULT_PARTITION_BYTES = 4 * 1024**2
OPTIMIZERS = ("sgd", "momentum", "adam")
# Untimed steps per table before the first block (sockets connected, buffers faulted in).
WARMUP_STEPS = 2
# A push_pull reply of the whole model comes from one shard: the client decodes at most this.
MAX_PARAMS = (DEFAULT_MAX_MESSAGE_BYTES - (1 << 20)) // 4
# Generous: a step of the largest model moves 1 GB through loopback, and a
# stats answer may wait for a whole write.
REQUEST_TIMEOUT_S = 300.0
GRAD_VALUE = 1e-4
LEARNING_RATE = 1e-3
WORKER_ID = "worker-bench"
_COUNT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_count(text: str) -> int:
    """'100M' -> 100_000_000, '20k' -> 20_000, '1.5G' -> 1_500_000_000; ValueError otherwise."""
    m = _COUNT_RE.match(str(text))
    if not m:
        raise ValueError(f"--params {text!r}: expected a count like 100M, 20M or 50000")
    return int(float(m.group(1)) * _SCALE[m.group(2).lower()])


def check(params: int, every: int, steps: int) -> None:
    """ValueError, one sentence, for figures the bench cannot run with."""
    if not 1 <= params <= MAX_PARAMS:
        raise ValueError(f"--params must be 1 to {MAX_PARAMS:,} (one shard's whole reply is at most "
                         f"{DEFAULT_MAX_MESSAGE_BYTES // 1024**2} MiB), found {params:,}")
    if steps < every:
        raise ValueError(f"--steps {steps} is less than --every {every}: a block would write no checkpoint")


def _open(addr: str, plan, job: str, optimizer: str, every: int, initial: dict):
    """The table `job` created as the scheduler would, its membership naming the bench; a client as that worker."""
    from protocol.messages import Membership
    from worker.client import ParamClient

    with ParamClient([addr], plan, job=job, worker="scheduler", timeout_s=REQUEST_TIMEOUT_S, retries=0) as control:
        control.create(initial, optimizer={"kind": optimizer, "lr": LEARNING_RATE}, checkpoint_every=every)
        # No public call sends a membership (the scheduler's own calls live in ps/): the client's engine does.
        control._exchange({0: Membership(**control._common(0, -1), epoch=1, workers={WORKER_ID: -1})})
    return ParamClient([addr], plan, job=job, worker=WORKER_ID, timeout_s=REQUEST_TIMEOUT_S, retries=0)


def _block(client, grads: dict, outs: dict, steps: int) -> list[float]:
    perf = time.perf_counter
    times = []
    for _ in range(steps):
        t0 = perf()
        client.push_pull(grads, out=outs)
        times.append(perf() - t0)
    return times


def summary(times: list[float]) -> dict:
    import numpy as np

    arr = np.asarray(times)
    return {"steps": len(times), "mean_s": float(arr.mean()), "median_s": float(np.median(arr)),
            "p90_s": float(np.percentile(arr, 90)), "max_s": float(arr.max())}


def run_bench(params: int, *, every: int, steps: int, rounds: int, optimizer: str, partition_bytes: int,
              children: LocalCluster, ckpt_dir: str) -> dict:
    """Start the shard into `children`, measure, return the figures (the shard left running)."""
    import numpy as np

    from protocol.buffers import keep_freed_buffers
    from protocol.plan import make_plan

    keep_freed_buffers()  # as every shard does: large receive buffers are reused, not faulted in again
    nbytes = params * 4
    max_message = max(DEFAULT_MAX_MESSAGE_BYTES, nbytes + (64 << 20))
    addr = children.start("server", "server", "--bind", "tcp://127.0.0.1:0", "--shard-id", "0",
                          "--checkpoint-dir", ckpt_dir, "--max-message-bytes", str(max_message),
                          "--log-level", "warning")["addr"]
    plan = make_plan({"w": ((params,), "float32")}, 1, partition_bytes)
    initial = {"w": np.zeros(params, np.float32)}
    grads = {"w": np.full(params, GRAD_VALUE, np.float32)}
    outs = {"w": np.empty(params, np.float32)}
    plain = _open(addr, plan, "bench-plain", optimizer, 0, initial)
    ckpt = _open(addr, plan, "bench-ckpt", optimizer, every, initial)
    del initial
    without: list[float] = []
    with_ckpt: list[float] = []
    drains: list[float] = []
    try:
        for client in (plain, ckpt):
            _block(client, grads, outs, WARMUP_STEPS)
        for _ in range(rounds):
            without += _block(plain, grads, outs, steps)
            with_ckpt += _block(ckpt, grads, outs, steps)
            t0 = time.perf_counter()
            stats = ckpt.stats()[0]  # answered once the writes asked so far are on disk
            drains.append(time.perf_counter() - t0)
        written = stats.get("checkpoints", {}).get("bench-ckpt") or {}
    finally:
        plain.close()
        ckpt.close()
    plain_s, ckpt_s = summary(without), summary(with_ckpt)
    return {
        "params": params, "bytes": nbytes, "optimizer": optimizer, "every": every, "steps": steps,
        "rounds": rounds, "partition_bytes": partition_bytes,
        "without": plain_s, "with": ckpt_s,
        "ratio_mean": ckpt_s["mean_s"] / plain_s["mean_s"],
        "ratio_median": ckpt_s["median_s"] / plain_s["median_s"],
        "checkpoints": {"written": written.get("written", 0), "versions": written.get("versions", []),
                        "write_s": written.get("write_s", 0.0), "checksum_s": written.get("checksum_s", 0.0),
                        "bytes": written.get("bytes", 0), "drain_s": max(drains, default=0.0)},
    }


def run(params: int, *, every: int = DEFAULT_EVERY, steps: int = DEFAULT_STEPS, rounds: int = DEFAULT_ROUNDS,
        optimizer: str = "momentum", partition_bytes: int = DEFAULT_PARTITION_BYTES) -> dict:
    """Start the shard, measure, stop and reap it, remove its checkpoints; the figures.

    ValueError for figures `check` refuses (before anything starts);
    ClusterError when the shard does not start.
    """
    check(params, every, steps)
    work = tempfile.mkdtemp(prefix="psctl-bench-checkpoint-")
    children = LocalCluster(work)
    try:
        return run_bench(params, every=every, steps=steps, rounds=rounds, optimizer=optimizer,
                         partition_bytes=partition_bytes, children=children, ckpt_dir=f"{work}/ckpt")
    except ConnectionError as exc:
        raise ClusterError(str(exc)) from None
    finally:
        children.stop()
        shutil.rmtree(work, ignore_errors=True)


def describe(result: dict) -> str:
    """The lines the command prints."""
    def ms(seconds: float) -> str:
        return f"{seconds * 1000:10.1f}"

    rows = [f"{'':18}{'mean ms':>10}{'median ms':>10}{'p90 ms':>10}{'max ms':>10}"]
    for name, key in (("without", "without"), (f"every {result['every']} steps", "with")):
        s = result[key]
        rows.append(f"{name:18}{ms(s['mean_s'])}{ms(s['median_s'])}{ms(s['p90_s'])}{ms(s['max_s'])}")
    c = result["checkpoints"]
    n = max(1, c["written"])
    head = (f"push_pull of {result['params']:,} float32 parameters ({result['bytes'] / 1e6:,.0f} MB) on one shard, "
            f"optimizer {result['optimizer']}; {result['rounds']} round(s) of {result['steps']} steps each way")
    tail = [f"with/without: mean {result['ratio_mean']:.3f}, median {result['ratio_median']:.3f}",
            f"checkpoints written: {c['written']}, {c['write_s'] / n:.2f} s each on the writer thread "
            f"({c['checksum_s'] / n:.2f} s of it checksumming), {c['bytes'] / 1e6:,.0f} MB each; "
            f"writes still pending after a block: {c['drain_s']:.2f} s at most"]
    return "\n".join([head, *rows, *tail])
