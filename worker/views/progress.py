"""Live progress on stderr, and the loss curve as a PNG.

`ProgressBar` draws a cluster job's progress (`psctl submit --wait`, `psctl
run`): bar, steps, slowest partition, loss, accuracy, test accuracy,
examples/s, elapsed time. On a terminal it is redrawn in place; otherwise
(CI, a pipe) a line is printed every PLAIN_EVERY_S seconds or tenth of the
job, so logs stay short. `ProgressLine` does the same for the single-process
trainer (`psctl train-local`).
"""
from __future__ import annotations

import sys
import time

BAR_WIDTH = 24
PLAIN_EVERY_S = 5.0
# ProgressLine: a TTY line is redrawn at most this often; without a TTY a
# line is printed every this fraction of the run.
PROGRESS_REDRAW_S = 0.1
PROGRESS_LOG_FRACTION = 0.1


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


class ProgressLine:
    """Renders LocalTrainer progress rows on a stream (stderr).

    On a TTY one line is redrawn in place with \\r (throttled); otherwise a
    full line is written each time the run crosses another ~10% of its
    steps, so logs stay short.
    """

    def __init__(self, total: int, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.total = max(1, int(total))
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._last_bucket = 0
        self._width = 0
        self._test = None

    def format(self, row: dict) -> str:
        if "test_accuracy" in row:
            self._test = row["test_accuracy"]
        parts = [f"step {row['step']}/{self.total}", f"loss {row['loss']:.4f}", f"acc {row['accuracy']:.3f}"]
        if self._test is not None:
            parts.append(f"test {self._test:.4f}")
        parts.append(f"{row['examples_per_s']:,.0f} ex/s")
        parts.append(f"{row['wall_s']:.1f}s")
        return "  ".join(parts)

    def __call__(self, row: dict) -> None:
        line = self.format(row)
        last = row["step"] >= self.total
        if self.tty:
            now = time.monotonic()
            if last or "test_accuracy" in row or now - self._last_draw >= PROGRESS_REDRAW_S:
                pad = " " * max(0, self._width - len(line))
                self.stream.write("\r" + line + pad)
                self.stream.flush()
                self._width = len(line)
                self._last_draw = now
            return
        bucket = int(row["step"] / (self.total * PROGRESS_LOG_FRACTION))
        if bucket > self._last_bucket or last or row["step"] == 1:
            self._last_bucket = bucket
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the redrawn line (TTY) so what follows starts on a fresh one."""
        if self.tty and self._width:
            self.stream.write("\n")
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
