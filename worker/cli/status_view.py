"""Text views of scheduler answers for people (`psctl status`, `psctl list`)."""
from __future__ import annotations

import time

from worker.cli.progress import partition_table

HIST_WIDTH = 30


def _when(ts) -> str:
    return "-" if not ts else time.strftime("%H:%M:%S", time.localtime(ts))


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_list(jobs: list[dict]) -> str:
    if not jobs:
        return "no jobs"
    lines = [f"{'JOB':<28} {'STATE':<10} {'SUBMITTED':<9} {'STEPS':>13} {'TEST ACC':>8}"]
    for j in jobs:
        prog = j.get("progress") or {}
        result = j.get("result") or {}
        step = f"{prog.get('steps_done', 0)}/{prog.get('steps_asked') or '?'}" if prog else "-"
        acc = result.get("test_accuracy", prog.get("test_accuracy"))
        lines.append(f"{j['id']:<28} {j['state']:<10} {_when(j['submitted']):<9} {step:>13} {_num(acc, '.4f'):>8}")
    return "\n".join(lines)


def render_cluster(body: dict) -> str:
    lines = [f"servers: {len(body['servers'])}"]
    for s in body["servers"]:
        lines.append(f"  shard {s['shard']}  {s['addr']}  seen {s['seen_s_ago']}s ago")
    lines.append(f"workers: {len(body['workers'])}")
    for w in body["workers"]:
        held = w.get("partitions") or []
        doing = (f"{w['job']} (partitions {', '.join(map(str, held))})" if held else w["job"]) if w["job"] \
            else ("waiting for work" if w["waiting"] else "idle")
        lines.append(f"  {w['worker']}  {doing}  seen {w['seen_s_ago']}s ago")
    lines.append(f"running: {', '.join(body['running']) or '-'}")
    lines.append(f"queued:  {', '.join(body['queued']) or '-'}")
    return "\n".join(lines)


def _histogram(hist: dict) -> list[str]:
    if not hist:
        return ["    (no pushes yet)"]
    total = sum(hist.values())
    peak = max(hist.values())
    lines = []
    for staleness, count in sorted(hist.items(), key=lambda kv: int(kv[0])):
        bar = "#" * max(1, round(HIST_WIDTH * count / peak))
        lines.append(f"    {int(staleness):>4} | {bar} {count} ({100 * count / total:.0f}%)")
    return lines


def render_job(body: dict) -> str:
    spec = body.get("spec") or {}
    policy = spec.get("consistency", {})
    bound = f"(s={policy.get('staleness')})" if policy.get("policy") == "ssp" else ""
    prog = body.get("progress") or {}
    result = body.get("result") or {}
    lines = [
        f"job {body['id']}  {body['state']}  policy {policy.get('policy', '?')}{bound}  "
        f"optimizer {spec.get('optimizer', {}).get('kind', '?')}",
        f"  submitted {_when(body['submitted'])}  started {_when(body['started'])}  "
        f"finished {_when(body['finished'])}",
    ]
    if prog:
        slow = prog.get("slowest") or {}
        lines.append(f"  steps {prog.get('steps_done')}/{prog.get('steps_asked') or '?'} over "
                     f"{prog.get('partitions')} partitions (slowest: {slow.get('partition')} at "
                     f"{slow.get('steps_done')}/{slow.get('steps') or '?'})  workers {prog.get('workers')}  "
                     f"loss {_num(prog.get('loss'), '.4f')}  acc {_num(prog.get('accuracy'), '.3f')}  "
                     f"test {_num(prog.get('test_accuracy'), '.4f')}  "
                     f"{_num(prog.get('examples_per_s'), ',.0f')} ex/s")
    if result:
        lines.append(f"  result: test accuracy {_num(result.get('test_accuracy'), '.4f')}  "
                     f"final loss {_num(result.get('final_loss'), '.4f')}  "
                     f"steps {result.get('steps_done')}/{result.get('steps_asked')}  "
                     f"examples {result.get('examples') or 0:,}  {_num(result.get('examples_per_s'), ',.0f')} ex/s "
                     f"over {_num(result.get('train_s'), '.1f')}s of training, "
                     f"wall {_num(result.get('wall_s'), '.1f')}s")
    if body.get("error"):
        lines.append(f"  error: {body['error']}")
    parts = body.get("partitions") or []
    if parts:
        lines.append("  partitions:")
        lines.extend("  " + line for line in partition_table(parts))
    for s in body.get("shard_stats") or []:
        clocks = s.get("clocks") or {}
        lines.append(f"  shard {s['shard']}  version {s['version']}  epoch {s['epoch']}  parked pulls {s['parked']}  "
                     f"pushes {s['pushes']}  pulls {s['pulls']}")
        if clocks and s.get("min_clock") is not None and s.get("max_clock") is not None:
            lines.append(f"    clocks: slowest {s.get('min_clock')}  fastest {s.get('max_clock')}  "
                         f"(spread {s.get('max_clock') - s.get('min_clock')})")
            for worker, clock in sorted(clocks.items()):
                lines.append(f"      {worker}: {clock}")
        lines.append("    staleness of applied pushes (versions behind):")
        lines.extend(_histogram(s.get("staleness_hist") or {}))
    return "\n".join(lines)
