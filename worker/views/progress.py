"""Live progress on stderr, and the loss curve as a PNG.

`ProgressBar` draws a cluster job's progress (`psctl submit --wait`, `psctl
wait`, `psctl run`): steps done over steps asked, loss, accuracy, test
accuracy, examples/s, the slowest partition, elapsed time. On a terminal it
is one tqdm bar redrawn in place, fitted to the terminal's width at every
redraw: the bar shrinks, and when the line would still not fit fields drop
(DROP_ORDER: elapsed time first, steps never), so it never wraps into a
second line (a wrapped line is what stacked a new line at every redraw).
Not on a terminal (CI, a pipe, a log file) it draws no bar: a plain line
when the job crosses another tenth, or once QUIET_EVERY_S passed without
one, and the last state when it closes (a dozen lines for a short job).
Callers close it before they print anything else (the plot message, the
summary), so nothing is glued to it.

Why tqdm rather than rich: tqdm is one small pure-Python package with no
markup language to escape job names from; it sizes the bar to the width it
is given (measured here at every redraw, as its `dynamic_ncols` does),
trims whatever would still overflow, pads over a longer previous line, and
keeps the redraw to one `\\r` line. rich would bring a console model, markup
and a much larger dependency for one line of text.

`ProgressLine` does the same for the single-process trainer (`psctl
train-local`), without a bar: one line redrawn in place, cut to the
terminal's width.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

# Not a terminal: a plain line at least this often while the job shows no new tenth.
QUIET_EVERY_S = 60.0
# The bar keeps at least this many cells; fields drop before it gets narrower.
MIN_BAR_CELLS = 8
# When the width cannot be measured (no terminal behind the stream).
DEFAULT_COLUMNS = 80
# ProgressLine: a TTY line is redrawn at most this often; without a TTY a
# line is printed every this fraction of the run.
PROGRESS_REDRAW_S = 0.1
PROGRESS_LOG_FRACTION = 0.1


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def columns(stream) -> int:
    """The width of the terminal behind `stream` (COLUMNS, else DEFAULT_COLUMNS, when it cannot be measured)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or DEFAULT_COLUMNS
    except (AttributeError, OSError, ValueError):
        try:
            return int(os.environ.get("COLUMNS", "")) or DEFAULT_COLUMNS
        except ValueError:
            return DEFAULT_COLUMNS


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# The fields of a progress line, in the order they are shown ("percent" only
# before the bar), and the order in which they drop when the terminal is too
# narrow for all of them: steps stay, and the label goes only after every field.
FIELD_ORDER = ("percent", "steps", "slowest", "loss", "acc", "test", "rate", "elapsed")
DROP_ORDER = ("elapsed", "percent", "test", "slowest", "rate", "acc", "loss")


class ProgressBar:
    """Draws a job's progress: steps done over steps asked across all partitions, the slowest partition,
    loss, accuracy, test accuracy, examples/s (the scheduler's `progress` summary)."""

    def __init__(self, stream=None, *, label: str = ""):
        self.stream = stream or sys.stderr
        self.tty = _isatty(self.stream)
        self.label = label
        self.started = time.monotonic()
        self._bar = None                  # the tqdm bar, made at the first update on a terminal
        self._last_plain = time.monotonic()
        self._next_tenth = 0.0
        self._pending: str | None = None  # not a terminal: the last state, not yet printed

    @staticmethod
    def fraction(row: dict) -> float:
        done, asked = row.get("steps_done") or 0, row.get("steps_asked") or 0
        return min(1.0, done / asked) if asked else 0.0

    def fields(self, row: dict, *, bar: bool = False) -> dict[str, str]:
        """Each field's text, in FIELD_ORDER (the slowest partition only when there are several).

        `bar`: the terse forms for a line beside the bar (which shows the fraction).
        """
        slow = row.get("slowest") or {}
        steps = f"{row.get('steps_done') or 0}/{row.get('steps_asked') or '?'}"
        out = {"percent": f"{100 * self.fraction(row):3.0f}%", "steps": steps} if bar else {"steps": steps + " steps"}
        if slow.get("partition") is not None and (row.get("partitions") or 1) > 1:
            out["slowest"] = f"slowest p{slow['partition']} {slow.get('steps_done', 0)}/{slow.get('steps') or '?'}"
        out["loss"] = f"loss {_fmt(row.get('loss'), '.4f')}"
        out["acc"] = f"acc {_fmt(row.get('accuracy'), '.3f')}"
        out["test"] = f"test {_fmt(row.get('test_accuracy'), '.3f')}"
        out["rate"] = f"{_rate(row.get('examples_per_s'), terse=bar)} ex/s"
        out["elapsed"] = f"{time.monotonic() - self.started:.1f}s"
        return out

    def line(self, row: dict) -> str:
        """The plain line (no bar): every field."""
        return "  ".join(([self.label] if self.label else []) + list(self.fields(row).values()))

    def fit(self, row: dict, width: int) -> tuple[str, str]:
        """(left of the bar, right of it) for a line of at most `width` columns with a bar of MIN_BAR_CELLS."""
        fields = self.fields(row, bar=True)
        label = self.label

        def parts() -> tuple[str, str]:
            left = " ".join(x for x in (label, fields.get("percent")) if x)
            rest = [text for name, text in fields.items() if name != "percent"]
            return (left + " |" if left else "|"), "| " + "  ".join(rest)

        def fits() -> bool:
            left, right = parts()
            return len(left) + MIN_BAR_CELLS + len(right) <= width

        for name in DROP_ORDER:
            if fits():
                break
            fields.pop(name, None)
        if not fits():
            label = ""  # the label goes last; tqdm trims whatever still overflows
        return parts()

    def update(self, row: dict) -> None:
        if self.tty:
            self._draw(row)
            return
        # Not a terminal: a line per tenth of the job, or after QUIET_EVERY_S of none; the rest waits for close().
        now, frac = time.monotonic(), self.fraction(row)
        self._pending = self.line(row)
        if frac >= self._next_tenth or now - self._last_plain >= QUIET_EVERY_S:
            self._last_plain, self._next_tenth = now, int(frac * 10 + 1e-9) / 10 + 0.1
            self.stream.write(self._pending + "\n")
            self.stream.flush()
            self._pending = None

    def _draw(self, row: dict) -> None:
        # Measured at every redraw (a resized window is followed). One column spare: a line that
        # fills the last column leaves some terminals waiting to wrap.
        width = columns(self.stream) - 1
        left, right = self.fit(row, width)
        fmt = (left.replace("{", "{{").replace("}", "}}") + "{bar}" + right.replace("{", "{{").replace("}", "}}"))
        total = max(1, row.get("steps_asked") or 1)
        if self._bar is None:
            self._bar = _Bar(total=total, file=self.stream, ncols=width, bar_format=fmt, leave=True,
                             mininterval=0, ascii=not _unicode(self.stream), delay=0)
        elif width < self._bar.ncols:
            # Narrower: tqdm would pad the new line with spaces to the old length, and that wraps.
            # Its lines always fill the width, so a fresh printer (no padding) is all it takes.
            self._bar.sp = self._bar.status_printer(self.stream)
        self._bar.bar_format, self._bar.ncols = fmt, width
        self._bar.total = total
        self._bar.n = min(total, row.get("steps_done") or 0)
        self._bar.refresh()

    def close(self) -> None:
        """End the line (a terminal) or print the last state not yet printed; then whatever follows starts clean."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._pending is not None:  # the last state, so a log ends where the job did
            self.stream.write(self._pending + "\n")
            self._pending = None
        self.stream.flush()


def _rate(value, *, terse: bool) -> str:
    """Examples per second: 1,234 (terse: 1,234, 12.3k, 4.5M)."""
    if value is None:
        return "-"
    if terse and value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if terse and value >= 1e4:
        return f"{value / 1e3:.1f}k"
    return f"{value:,.0f}"


def _unicode(stream) -> bool:
    """Block characters for the bar only when the stream's encoding has them."""
    return (getattr(stream, "encoding", "") or "").lower().replace("-", "") in ("utf8", "utf16", "utf32")


class _Bar(tqdm):
    """tqdm without its monitor thread: the bar is redrawn only when ProgressBar updates it."""

    monitor_interval = 0


class ProgressLine:
    """Renders LocalTrainer progress rows on a stream (stderr).

    On a TTY one line is redrawn in place with \\r (throttled), cut to the
    terminal's width so it never wraps; otherwise a
    full line is written each time the run crosses another ~10% of its
    steps, so logs stay short.
    """

    def __init__(self, total: int, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.total = max(1, int(total))
        self.tty = _isatty(self.stream)
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
                line = line[:max(1, columns(self.stream) - 1)]  # wrapped, every redraw would leave a line
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
