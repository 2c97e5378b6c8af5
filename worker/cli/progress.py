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
    """Draws progress rows ({step, total_steps, loss, accuracy, test_accuracy, examples_per_s})."""

    def __init__(self, stream=None, *, label: str = ""):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label = label
        self.started = time.monotonic()
        self._last_plain = 0.0
        self._next_tenth = 0.0
        self._drawn = False
        self._pending: str | None = None

    def line(self, row: dict) -> str:
        step, total = row.get("step") or 0, row.get("total_steps") or 0
        frac = min(1.0, step / total) if total else 0.0
        filled = int(frac * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        parts = [
            f"{self.label} " if self.label else "",
            f"[{bar}] {step}/{total or '?'}",
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
            total = row.get("total_steps") or 0
            frac = (row.get("step") or 0) / total if total else 0.0
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


def print_summary(summary: dict, *, as_json: bool, stream=None) -> None:
    """The job's final figures: one JSON object, or aligned lines for people."""
    stream = stream or sys.stdout
    if as_json:
        stream.write(json.dumps(summary, sort_keys=True, default=str) + "\n")
        return
    order = ("job", "status", "test_accuracy", "test_loss", "final_loss", "steps", "wall_s", "examples_per_s",
             "error")
    for key in order:
        if key in summary and summary[key] not in (None, ""):
            value = summary[key]
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            stream.write(f"{key:>15}  {shown}\n")
    stream.flush()
