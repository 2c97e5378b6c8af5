"""`psctl bench overlap`: examples/s with communication overlapped with backprop, and without.

One local cluster (S shards, W workers) runs the same job again and
again, its `overlap` field alternating (off, on, off, on, ...), so both
see the same machine in the same run. The job: an MLP of about --params
parameters (hidden [H, H] on sklearn:digits, as `psctl bench scale`),
--steps steps per partition, plain SGD under the chosen policy.

Figures come from what happened: each run's examples/s is the scheduler's
(examples done / training seconds, ps/sched/jobs.py), and the bench
reports each setting's median over --repeat runs and on/off, their ratio.
A run that does not succeed is an error, not a figure.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import uuid
from collections.abc import Callable

from worker.bench.scale import hidden_for, model_spec, wait_for_job
from worker.local_cluster import ClusterError, LocalCluster, request

DATA_SOURCE = "sklearn:digits"
LEARNING_RATE = 1e-3
JOB_TIMEOUT_S = 1800.0


def job_spec(params: int, *, workers: int, steps: int, batch_size: int, policy: str, overlap: bool) -> dict:
    """The normalized job of one run (ValueError if the job file's rules refuse an option)."""
    from protocol.jobspec import validate_job

    return validate_job({
        "name": f"bench-overlap-{'on' if overlap else 'off'}", "seed": 0, "workers": workers, "steps": steps,
        "eval_every": 10**9, "overlap": overlap, "model": model_spec(hidden_for(params)),
        "data": {"source": DATA_SOURCE, "batch_size": batch_size},
        "optimizer": {"kind": "sgd", "lr": LEARNING_RATE}, "consistency": {"policy": policy},
    })


def run(params: int, *, servers: int = 1, workers: int = 2, steps: int = 20, batch_size: int = 64,
        policy: str = "bsp", repeat: int = 2, log: Callable[[str], None] = lambda _line: None) -> dict:
    """Run the job `repeat` times each way on one cluster (stopped and reaped whatever happens)."""
    from protocol.messages import Submit

    specs = {flag: job_spec(params, workers=workers, steps=steps, batch_size=batch_size, policy=policy,
                            overlap=flag) for flag in (False, True)}
    log_dir = tempfile.mkdtemp(prefix="psctl-bench-overlap-")
    cluster = LocalCluster(log_dir)
    runs: dict[bool, list[float]] = {False: [], True: []}
    try:
        _addr, client = cluster.boot(servers, [[] for _ in range(workers)])
        try:
            for i in range(repeat):
                for flag in (False, True):
                    job = request(client, Submit(spec=specs[flag], submission_id=uuid.uuid4().hex))["job"]
                    body = wait_for_job(client, job, timeout_s=JOB_TIMEOUT_S, log=log)
                    if body["state"] != "succeeded":
                        raise ClusterError(f"job {job} (overlap {'on' if flag else 'off'}) ended "
                                           f"{body['state']}: {body.get('error') or 'no reason given'} "
                                           f"(logs in {log_dir})")
                    rate = float(body["progress"]["examples_per_s"])
                    runs[flag].append(rate)
                    log(f"run {i + 1}/{repeat}, overlap {'on' if flag else 'off'}: {rate:,.0f} examples/s")
        finally:
            client.close()
    finally:
        cluster.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
    off, on = statistics.median(runs[False]), statistics.median(runs[True])
    model = specs[True]["model"]
    return {
        "params": _count(model), "hidden": model["hidden"], "servers": servers, "workers": workers, "steps": steps,
        "batch_size": batch_size, "policy": policy, "repeat": repeat, "cores": os.cpu_count(),
        "off_examples_per_s": off, "on_examples_per_s": on, "on_over_off": on / off if off > 0 else None,
        "off_runs": runs[False], "on_runs": runs[True],
    }


def _count(model: dict) -> int:
    from worker.bench.scale import count_params

    return count_params(model["hidden"][0])


def format_report(out: dict) -> str:
    runs = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)  # noqa: E731 - a one-line formatter
    return "\n".join([
        f"MLP hidden {out['hidden']} ({out['params']:,} parameters), {out['servers']} shard(s), "
        f"{out['workers']} workers, {out['steps']} steps of {out['batch_size']}, {out['policy']}, "
        f"{out['cores']} cores",
        f"overlap off: {out['off_examples_per_s']:,.0f} examples/s (runs: {runs(out['off_runs'])})",
        f"overlap on:  {out['on_examples_per_s']:,.0f} examples/s (runs: {runs(out['on_runs'])})",
        f"on/off: {out['on_over_off']:.2f}" if out["on_over_off"] else "on/off: n/a",
    ])
