"""The live progress bar and the end-of-job summary `psctl` prints.

One line on stderr: bar, step, loss, accuracy, test accuracy, examples/s,
elapsed time. On a terminal it is redrawn in place; otherwise (CI, a pipe)
a line is printed every PLAIN_EVERY_S seconds so logs stay short.
"""
from __future__ import annotations

import json
import sys
import time

BAR_WIDTH = 24
PLAIN_EVERY_S = 5.0


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


class ProgressBar:
    """Draws a job's progress: steps done over steps asked across all partitions, the slowest partition,
    loss, accuracy, test accuracy, examples/s (the scheduler's `progress` summary)."""

    def __init__(self, stream=None, *, label: str = ""):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label = label
        self.started = time.monotonic()
        self._last_plain = 0.0
        self._next_tenth = 0.0
        self._drawn = False
        self._pending: str | None = None

    @staticmethod
    def fraction(row: dict) -> float:
        done, asked = row.get("steps_done") or 0, row.get("steps_asked") or 0
        return min(1.0, done / asked) if asked else 0.0

    def line(self, row: dict) -> str:
        done, asked = row.get("steps_done") or 0, row.get("steps_asked")
        filled = int(self.fraction(row) * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        slow = row.get("slowest") or {}
        slowest = (f"  slowest p{slow['partition']} {slow.get('steps_done', 0)}/{slow.get('steps') or '?'}"
                   if slow.get("partition") is not None and (row.get("partitions") or 1) > 1 else "")
        parts = [
            f"{self.label} " if self.label else "",
            f"[{bar}] {done}/{asked or '?'} steps{slowest}",
            f"  loss {_fmt(row.get('loss'), '.4f')}",
            f"  acc {_fmt(row.get('accuracy'), '.3f')}",
            f"  test {_fmt(row.get('test_accuracy'), '.3f')}",
            f"  {_fmt(row.get('examples_per_s'), ',.0f')} ex/s",
            f"  {time.monotonic() - self.started:6.1f}s",
        ]
        return "".join(parts)

    def update(self, row: dict) -> None:
        text = self.line(row)
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
            self._drawn = True
        else:
            # Not a terminal: a line per tenth of the job or per PLAIN_EVERY_S, whichever comes first.
            now = time.monotonic()
            frac = self.fraction(row)
            if now - self._last_plain < PLAIN_EVERY_S and frac < self._next_tenth:
                self._pending = text
                return
            self._last_plain, self._next_tenth, self._pending = now, frac + 0.1, None
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False
        elif self._pending is not None:  # the last state, so a log ends where the job did
            self.stream.write(self._pending + "\n")
            self._pending = None
        self.stream.flush()


def write_loss_plot(rows: list[dict], path: str, *, title: str) -> str | None:
    """Training loss (and test accuracy) against wall time as a PNG; None if matplotlib is missing.

    rows: progress samples with "t" (seconds since the start), "loss" and
    optionally "test_accuracy" (the scheduler's `curve` of the job).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = [(r["t"], r["loss"]) for r in rows if r.get("loss") is not None]
    accs = [(r["t"], r["test_accuracy"]) for r in rows if r.get("test_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if pts:
        ax.plot(*zip(*pts, strict=True), color="tab:blue", label="training loss")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    if accs:
        twin = ax.twinx()
        twin.plot(*zip(*accs, strict=True), color="tab:green", marker=".", label="test accuracy")
        twin.set_ylabel("test accuracy")
        twin.set_ylim(0, 1)
    fig.legend(loc="center right", bbox_to_anchor=(0.85, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
