"""Counters, gauges and histograms rendered in Prometheus' text format.

Pure bookkeeping and formatting (no sockets): each daemon serves
`MetricsRegistry.render()` over HTTP from its own side of the layout. Values are
plain Python numbers updated by the daemon's one loop thread and read by
the HTTP thread; a torn read of one float is harmless for monitoring.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterable


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Histogram:
    """Cumulative buckets over fixed upper bounds, Prometheus style."""

    def __init__(self, bounds: Iterable[float]):
        self.bounds = sorted(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last bucket: +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def buckets(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count) pairs, ending with +Inf."""
        out, running = [], 0
        for bound, count in zip(self.bounds + [math.inf], self.counts):
            running += count
            out.append((bound, running))
        return out


# Every metric a pscluster daemon exports: name -> (type, help). One table for
# all roles, so a name means one thing whichever daemon serves it.
KNOWN = {
    # server shards
    "pushes_total": ("counter", "Pushes accepted"),
    "pulls_total": ("counter", "Pulls received"),
    "duplicates_total": ("counter", "Repeated requests answered from the last reply"),
    "parked_pulls": ("gauge", "Pulls held by a consistency policy"),
    "staleness": ("histogram", "Versions between a gradient's base and its application"),
    "checkpoints_total": ("counter", "Checkpoints written"),
    # shards and the scheduler
    "rejected_total": ("counter", "Messages refused with an error reply, by code"),
    "bytes_received_total": ("counter", "Bytes received"),
    "bytes_sent_total": ("counter", "Bytes sent"),
    "internal_errors_total": ("counter", "Bugs hit and survived (logged with a traceback)"),
    # the scheduler
    "workers": ("gauge", "Workers registered and alive"),
    "servers": ("gauge", "Server shards registered and alive"),
    "jobs_running": ("gauge", "Jobs running"),
    "jobs_submitted_total": ("counter", "Jobs submitted"),
    "jobs_finished_total": ("counter", "Jobs ended, by final state"),
    # workers
    "steps_total": ("counter", "Training steps completed (one per partition and step)"),
    "examples_total": ("counter", "Training examples processed"),
    "step_seconds": ("histogram", "Time of one step: compute, push_pull, waits"),
    "loss": ("gauge", "Training loss of the last minibatch"),
    "accuracy": ("gauge", "Training accuracy of the last minibatch"),
    "test_accuracy": ("gauge", "Last evaluated test accuracy"),
    "examples_per_second": ("gauge", "Examples per second of the last step"),
    "assignments_total": ("counter", "Assignments ended, by outcome"),
    "staleness_seen": ("histogram", "Updates by others between this worker's pull and its push"),
}


class MetricsRegistry:
    """Named metrics of one daemon. Names follow Prometheus conventions; their
    type and help come from KNOWN unless `describe` says otherwise."""

    def __init__(self, prefix: str = "pscluster"):
        self.prefix = prefix
        self._values: dict[tuple[str, tuple], float] = {}
        self._hists: dict[tuple[str, tuple], Histogram] = {}
        self._help: dict[str, tuple[str, str]] = dict(KNOWN)

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())) if labels else ())
        self._values[key] = self._values.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._values[(name, tuple(sorted(labels.items())) if labels else ())] = float(value)

    def get(self, name: str, **labels: str) -> float:
        return self._values.get((name, tuple(sorted(labels.items()))), 0.0)

    def histogram(self, name: str, bounds: Iterable[float], **labels: str) -> Histogram:
        key = (name, tuple(sorted(labels.items())))
        if key not in self._hists:
            self._hists[key] = Histogram(bounds)
        return self._hists[key]

    def render(self) -> str:
        """The exposition text (version 0.0.4) of every metric."""
        lines: list[str] = []
        names = sorted({n for n, _ in self._values} | {n for n, _ in self._hists})
        for name in names:
            full = f"{self.prefix}_{name}"
            kind, text = self._help.get(name, ("untyped", name))
            lines.append(f"# HELP {full} {text}")
            lines.append(f"# TYPE {full} {kind if (name, ()) not in self._hists else 'histogram'}")
            for (n, labels), value in sorted(self._values.items()):
                if n == name:
                    lines.append(f"{full}{_labels(dict(labels))} {value:g}")
            for (n, labels), hist in sorted(self._hists.items(), key=lambda kv: kv[0]):
                if n != name:
                    continue
                for bound, count in hist.buckets():
                    le = "+Inf" if math.isinf(bound) else f"{bound:g}"
                    lines.append(f"{full}_bucket{_labels({**dict(labels), 'le': le})} {count}")
                lines.append(f"{full}_sum{_labels(dict(labels))} {hist.total:g}")
                lines.append(f"{full}_count{_labels(dict(labels))} {hist.n}")
        return "\n".join(lines) + "\n"
