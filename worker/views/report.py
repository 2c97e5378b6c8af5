"""Text views of scheduler answers for people: a finished job's summary, `psctl status`, `psctl list`."""
from __future__ import annotations

import json
import sys
import time

HIST_WIDTH = 30
SUMMARY_FIELDS = ("test_accuracy", "test_loss", "final_loss", "steps_done", "steps_asked", "examples", "train_s",
                  "examples_per_s", "wall_s", "stopped_by")


def job_summary(body: dict) -> dict:
    """The summary object of a finished (or failing) job's status: every figure from what its partitions did."""
    result = body.get("result") or {}
    summary = {"job": body["id"], "status": body["state"], **{k: result.get(k) for k in SUMMARY_FIELDS},
               "error": body.get("error") or ""}
    summary["partitions"] = [{k: p.get(k) for k in ("index", "steps", "steps_done", "examples", "holder", "holders")}
                             for p in result.get("partitions") or body.get("partitions") or []]
    return summary


SUMMARY_ORDER = ("job", "status", "test_accuracy", "test_loss", "final_loss", "steps_done", "steps_asked",
                 "examples", "train_s", "examples_per_s", "wall_s", "stopped_by", "error")


def print_summary(summary: dict, *, as_json: bool, stream=None) -> None:
    """The job's final figures: one JSON object, or aligned lines and a partition table for people."""
    stream = stream or sys.stdout
    if as_json:
        stream.write(json.dumps(summary, sort_keys=True, default=str) + "\n")
        return
    for key in SUMMARY_ORDER:
        if key in summary and summary[key] not in (None, ""):
            value = summary[key]
            shown = f"{value:,.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) \
                else str(value)
            stream.write(f"{key:>15}  {shown}\n")
    stream.writelines(line + "\n" for line in partition_table(summary.get("partitions") or []))
    stream.flush()


def partition_table(parts: list[dict]) -> list[str]:
    """One line per partition: steps done of owed, examples, and who trained which steps."""
    if not parts:
        return []
    lines = [f"{'partition':>15}  {'steps':>13}  {'examples':>10}  trained by (steps)"]
    for p in parts:
        who = ", ".join(f"{h['worker'] or '?'} ({h['first']}-{h['last']})" for h in p.get("holders") or []
                        if h["last"] > h["first"]) or "-"
        steps = f"{p.get('steps_done', 0)}/{p.get('steps') or '?'}"
        lines.append(f"{p['index']:>15}  {steps:>13}  {p.get('examples', 0):>10,}  {who}")
    return lines


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


def _checkpoint_lines(body: dict) -> list[str]:
    """The job's newest complete checkpoint and every rollback: when, to which version, steps lost."""
    lines = []
    checkpoints = body.get("checkpoints") or []
    if checkpoints:
        last = checkpoints[-1]
        lines.append(f"  checkpoint: version {last.get('version')} complete on every shard at {_when(last.get('at'))}")
    for rb in body.get("rollbacks") or []:
        lines.append(f"  rollback at {_when(rb.get('at'))}: shard {rb.get('shard')} restarted; back to version "
                     f"{rb.get('version')}, {rb.get('steps_lost', 0):,} steps lost")
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
    lines.extend(_checkpoint_lines(body))
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
