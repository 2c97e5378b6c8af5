"""The job file: its schema, defaults and validation. Pure; no I/O but reading YAML.

A job file is checked before anything reaches the cluster (by `psctl` and
again by the scheduler on `submit`): every field is looked up in one
declarative schema, defaults are filled in, and the first problem raises
`SpecError` naming the field's path, what was expected and what was found:

    optimizer.lr: expected a number > 0, found -0.1

The normalized dict that comes out is what the scheduler stores and what
workers and servers receive; documentation of every field is
in README.md ("The job file").

This is the only schema. The builders (ps/optim.py `make_optimizer`,
ps/policy.py `make_policy`, worker/nn/model.py `build_model`) normalize
their section with `normalize_section`, so a partial section written by
hand (tests, benchmarks, tools) takes the same defaults and the same rules
as a job file; they check only what needs data (the input shape, the
number of classes).
"""
from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from protocol.plan import DEFAULT_PARTITION_BYTES

POLICIES = ("asp", "bsp", "ssp")
OPTIMIZERS = ("sgd", "momentum", "adagrad", "rmsprop", "adam")
SCHEDULES = ("constant", "step", "cosine")
MODEL_KINDS = ("mlp", "cnn")
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid")
INITS = ("he", "xavier")
DATA_SCHEMES = ("sklearn", "idx", "npz", "synthetic")
# Job names travel as ids and file names: keep them tame.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_WORKERS = 1024
MAX_STEPS = 10**9


class SpecError(ValueError):
    """A job file field is wrong: `path` names it, the message says why."""

    def __init__(self, path: str, expected: str, found: Any, *, message: str | None = None, hint: str = ""):
        shown = _show(found)
        super().__init__(message or f"{path}: expected {expected}, found {shown}{hint}")
        self.path = path
        self.expected = expected
        self.found = shown


def _show(value: Any) -> str:
    if value is _MISSING:
        return "nothing (the field is required)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_MISSING = object()


def _closest(word: Any, options) -> str | None:
    """The one of `options` closest to `word` when it is close enough (difflib), else None."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return close[0] if close else None


# --- field checkers: each returns the normalized value or raises SpecError ---
# Each carries `allowed`: what it accepts, in the words of its error message
# and of README's defaults table (`defaults_table` below).

def _allowing(text: str):
    """Decorator: set a checker's `allowed` text."""
    def mark(check):
        check.allowed = text
        return check
    return mark


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str, Any], int]:
    expected = "an integer" + _range_text(lo, hi, whole=True)

    @_allowing(expected)
    def check(path: str, v: Any) -> int:
        if isinstance(v, float) and math.isfinite(v) and v == int(v):
            v = int(v)  # 5e2 is how people write 500
        if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise SpecError(path, expected, v)
        return v
    return check


def _num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    expected = "a number" + _range_text(lo, hi, lo_open, hi_open)

    @_allowing(expected)
    def check(path: str, v: Any) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            raise SpecError(path, expected, v)
        return float(v)
    return check


@_allowing("true or false")
def _bool(path: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise SpecError(path, "true or false", v)
    return v


@_allowing("none, fp16 or topk:RATIO (0 < RATIO <= 0.5)")
def _compression(path: str, v: Any) -> str:
    """How gradients travel: float32 as they are, fp16, or the top RATIO of each slice (error feedback)."""
    if v in ("none", "fp16"):
        return v
    if isinstance(v, str) and v.startswith("topk:"):
        try:
            ratio = float(v[5:])
        except ValueError:
            ratio = math.nan
        if 0 < ratio <= 0.5:
            return f"topk:{ratio:g}"
    raise SpecError(path, "none, fp16 or topk:RATIO with 0 < RATIO <= 0.5", v)


def _choice(options: tuple[str, ...]):
    expected = "one of " + ", ".join(options)

    @_allowing(expected)
    def check(path: str, v: Any) -> str:
        if not isinstance(v, str) or v not in options:
            close = _closest(v, options) if isinstance(v, str) else None
            raise SpecError(path, expected, v, hint=f" (did you mean {close}?)" if close else "")
        return v
    return check


@_allowing("a list of positive integers (at most 64)")
def _int_list(path: str, v: Any) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        raise SpecError(path, "a list of positive integers", v)
    if len(v) > 64:
        raise SpecError(path, "at most 64 layers", v)
    return list(v)


@_allowing("sklearn:digits, idx:DIR (MNIST files), npz:PATH (arrays x, y), "
           "synthetic:n=N,features=F,classes=C (lazy, any size)")
def _source(path: str, v: Any) -> str:
    if not isinstance(v, str) or ":" not in v or v.split(":", 1)[0] not in DATA_SCHEMES or not v.split(":", 1)[1]:
        raise SpecError(path, "a source like sklearn:digits, idx:DIR, npz:PATH or synthetic:n=N,...", v)
    if v.startswith("sklearn:") and v != "sklearn:digits":
        raise SpecError(path, "sklearn:digits (the one scikit-learn set we ship)", v)
    return v


# `init_from`: where a job's first parameters come from instead of its seeded initialisation.
INIT_JOB_RE = re.compile(r"^job:[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_INIT_PATH_CHARS = 4096


@_allowing("job:JOB_ID (that job's parameters) or file:PATH (a file psctl export wrote)")
def _init_from(path: str, v: Any) -> str:
    if isinstance(v, str) and (INIT_JOB_RE.fullmatch(v) or (
            v.startswith("file:") and 5 < len(v) <= MAX_INIT_PATH_CHARS and "\x00" not in v)):
        return v
    raise SpecError(path, _init_from.allowed, v)


@_allowing("letters, digits, '.', '_' or '-' (at most 64, starting alphanumeric)")
def _name(path: str, v: Any) -> str:
    if not isinstance(v, str) or not NAME_RE.fullmatch(v):
        raise SpecError(path, "a name of letters, digits, '.', '_' or '-' (at most 64, starting alphanumeric)", v)
    return v


def _opt(check):
    """`check`, but null is allowed (and kept as None)."""
    @_allowing(f"{check.allowed}, or null")
    def wrapped(path: str, v: Any):
        return None if v is None else check(path, v)
    return wrapped


def _range_text(lo, hi, lo_open: bool = False, hi_open: bool = False, *, whole: bool = False) -> str:
    """" from 1 to 8" (integers), " in (0, 1]", " >= 0", " < 1", or "" (no bounds)."""
    if lo is not None and hi is not None:
        if whole:
            return f" from {lo} to {hi}"
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


@dataclass(frozen=True)
class Field:
    """One key of a section: its checker, default (_MISSING = required) and what it means (README's table)."""

    check: Callable[[str, Any], Any]
    default: Any = _MISSING
    doc: str = ""


SCHEDULE = {
    "kind": Field(_choice(SCHEDULES), "constant", "the learning-rate schedule"),
    "warmup_steps": Field(_int(0), 0, "linear warm-up, for every kind"),
    "step_size": Field(_int(1), 100, "step: lr * gamma ** (step // step_size)"),
    "gamma": Field(_num(0, 1, lo_open=True), 0.1,   # (0, 1]: a step schedule never grows the lr
                   "step: the factor"),
    "total_steps": Field(_int(0), 0, "cosine: decay length (0: the job's steps)"),
    "min_lr": Field(_num(0), 0.0, "cosine: floor, at most optimizer.lr"),
}

OPTIMIZER = {
    "kind": Field(_choice(OPTIMIZERS), "sgd", "runs on the servers (ps/optim.py)"),
    "lr": Field(_num(0, lo_open=True), 0.1, "learning rate"),
    "momentum": Field(_num(0, 1, hi_open=True), 0.9, "momentum"),
    "nesterov": Field(_bool, False, "momentum only"),
    "beta1": Field(_num(0, 1, hi_open=True), 0.9, "adam"),
    "beta2": Field(_num(0, 1, hi_open=True), 0.999, "adam"),
    "eps": Field(_num(0, lo_open=True), 1e-8, "adam, adagrad, rmsprop"),
    "rho": Field(_num(0, 1, hi_open=True), 0.9, "rmsprop"),
    "weight_decay": Field(_num(0), 0.0, "L2, added to the gradient"),
    "clip_norm": Field(_num(0), 0.0, "clip by the global norm of each pushed gradient (0: off)"),
    "staleness_aware": Field(_bool, False, "ASP/SSP: lr / max(1, staleness) (Zhang et al. 2016); false under bsp"),
    "schedule": SCHEDULE,
}

MODEL = {
    "kind": Field(_choice(MODEL_KINDS), doc="the network"),
    "hidden": Field(_int_list, [128],  # the same for both kinds (README)
                    "dense widths (after the conv stack for cnn)"),
    "activation": Field(_choice(ACTIVATIONS), "relu", "after each hidden layer"),
    "dropout": Field(_num(0, 1, hi_open=True), 0.0, "after each hidden dense layer"),
    "batchnorm": Field(_bool, False, "after each hidden dense (and conv) layer, before the activation"),
    "init": Field(_choice(INITS), "he", "initial weights"),
    "channels": Field(_int_list, [8, 16], "cnn: conv3x3 'same' -> [bn] -> maxpool2 -> act, per stage"),
    "kernel": Field(_int(1, 15), 3, "cnn: odd kernel size"),  # odd for a cnn (below)
}

DATA = {
    "source": Field(_source, doc="where the examples come from (idx: and npz: under a worker's data roots)"),
    "batch_size": Field(_int(1, 1 << 20), 32, "per partition and step"),
    "test_fraction": Field(_num(0, 1, lo_open=True, hi_open=True), 0.2,
                           "held-out split (idx uses its t10k files when present)"),
    "micro_batches": Field(_int(1, 1024), 1, "gradient accumulation; must divide batch_size"),
}

CONSISTENCY = {
    "policy": Field(_choice(POLICIES), "asp", "when a shard applies pushes (README.md, \"Semantics\")"),
    "staleness": Field(_int(0, 1_000_000), 3, "ssp: the bound s"),
}

JOB = {
    "name": Field(_name, "job", "the job id is NAME-N"),
    "seed": Field(_int(0, 2**32 - 1), 0, "initial weights, dropout masks, test split, data order"),
    "workers": Field(_int(1, MAX_WORKERS), 1, "data partitions (any number of workers shares them)"),
    "steps": Field(_opt(_int(1, MAX_STEPS)), None, "per partition; exactly one of steps and epochs"),
    "epochs": Field(_opt(_num(0, 1_000_000, lo_open=True)), None,
                    "passes over each partition's own data; exactly one of steps and epochs"),
    "target_accuracy": Field(_opt(_num(0, 1, lo_open=True)), None,
                             "stop early once the evaluated test accuracy reaches it"),
    "eval_every": Field(_int(0, MAX_STEPS), 0, "evaluate every N steps (0: once per epoch of a partition)"),
    "checkpoint_every": Field(_int(0, MAX_STEPS), 0, "servers checkpoint every N versions (0: off)"),
    "partition_bytes": Field(_int(1024, 1 << 30), DEFAULT_PARTITION_BYTES, "largest slice of a tensor on one shard"),
    "compression": Field(_compression, "none", "gradients on the wire: none (float32), fp16, or topk:RATIO "
                         "(the largest RATIO of each slice; the rest is kept and added to the next step)"),
    "overlap": Field(_bool, True, "send each layer's gradient as soon as its backward is done (off with clipping)"),
    "init_from": Field(_opt(_init_from), None, "first parameters: job:JOB_ID or file:PATH (psctl export); "
                       "null: seeded"),
    "model": MODEL,
    "data": DATA,
    "optimizer": OPTIMIZER,
    "consistency": CONSISTENCY,
}


# --- rules between the fields of one section: each checks a normalized section in place ---

def _model_rules(model: dict) -> None:
    if model["kind"] != "cnn":
        return
    if model["kernel"] % 2 == 0:
        raise SpecError("model.kernel", "an odd kernel size for a cnn ('same' padding)", model["kernel"])
    if not model["channels"]:
        raise SpecError("model.channels", "at least one conv stage for a cnn", model["channels"])


def _data_rules(data: dict) -> None:
    if data["batch_size"] % data["micro_batches"]:
        raise SpecError("data.micro_batches", f"a divisor of data.batch_size ({data['batch_size']})",
                        data["micro_batches"])


def _optimizer_rules(opt: dict) -> None:
    if opt["nesterov"] and opt["kind"] != "momentum":
        raise SpecError("optimizer.nesterov", "false unless optimizer.kind is momentum", True)
    lr, min_lr = opt["lr"], opt["schedule"]["min_lr"]
    if min_lr > lr:
        raise SpecError("optimizer.schedule.min_lr", f"a number in [0, optimizer.lr = {lr!r}]", min_lr)


# The sections a job file has, and the rules each one's fields obey together.
SECTIONS = {"model": MODEL, "data": DATA, "optimizer": OPTIMIZER, "consistency": CONSISTENCY}
_RULES: dict[str, Callable[[dict], None]] = {
    "model": _model_rules,
    "data": _data_rules,
    "optimizer": _optimizer_rules,
}


def _known_fields(path: str, schema: dict, raw: Mapping) -> None:
    """SpecError for the first field of `raw` that `schema` does not have, with the closest known one."""
    unknown = sorted(str(k) for k in raw if k not in schema)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        known = ", ".join(schema)
        close = _closest(unknown[0], schema)
        guess = f"did you mean {close}? " if close else ""
        raise SpecError(where, f"one of the known fields ({known})", unknown[0],
                        message=f"{where}: unknown field ({guess}known fields here: {known})")


def _section(path: str, schema: dict, raw: Any) -> dict:
    if not isinstance(raw, Mapping):
        raise SpecError(path or "job", "a mapping of fields", raw)
    _known_fields(path, schema, raw)
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        where = f"{path}.{key}" if path else key
        if isinstance(spec, dict):
            out[key] = _section(where, spec, raw.get(key) if raw.get(key) is not None else {})
            continue
        value = raw.get(key, _MISSING)
        if value is _MISSING:
            if spec.default is _MISSING:
                raise SpecError(where, "a value", _MISSING)
            out[key] = list(spec.default) if isinstance(spec.default, list) else spec.default
        else:
            out[key] = spec.check(where, value)
    rules = _RULES.get(path)
    if rules is not None:
        rules(out)
    return out


def normalize_section(name: str, raw: Any) -> dict:
    """The complete `name:` section (model, data, optimizer or consistency) of `raw`.

    Every missing field takes its default (None reads as an empty section),
    every field is checked, then the rules between the section's fields;
    the first problem raises SpecError naming the field's full path. A
    normalized section normalizes to itself. Rules between sections
    (staleness_aware under bsp, a cosine schedule's length) need the whole
    job: `validate_job`.
    """
    if name not in SECTIONS:
        raise ValueError(f"no job file section named {name!r}: choose one of {', '.join(SECTIONS)}")
    return _section(name, SECTIONS[name], {} if raw is None else raw)


def normalize_model(raw: Any) -> dict:
    """`normalize_section("model", raw)`: model.kind is required."""
    return normalize_section("model", raw)


def normalize_data(raw: Any) -> dict:
    """`normalize_section("data", raw)`: data.source is required."""
    return normalize_section("data", raw)


def normalize_optimizer(raw: Any) -> dict:
    """`normalize_section("optimizer", raw)`: every field has a default."""
    return normalize_section("optimizer", raw)


def normalize_consistency(raw: Any) -> dict:
    """`normalize_section("consistency", raw)`: every field has a default."""
    return normalize_section("consistency", raw)


def validate_job(raw: Any) -> dict:
    """The normalized job spec for `raw` (a parsed job file); raises SpecError.

    Each section goes through the same checks as `normalize_section`; then
    the rules between sections and the job's own fields.
    """
    if not isinstance(raw, Mapping):
        raise SpecError("job", "a mapping of fields (model, data, optimizer, ...)", raw)
    _known_fields("", JOB, raw)  # a misspelt `modle:` is named as such, not as a missing model
    for required in ("model", "data"):
        if raw.get(required) is None:
            raise SpecError(required, "a section", _MISSING)
    spec = _section("", JOB, raw)
    if (spec["steps"] is None) == (spec["epochs"] is None):
        raise SpecError("steps", "exactly one of steps or epochs", {"steps": spec["steps"], "epochs": spec["epochs"]})
    opt = spec["optimizer"]
    if opt["staleness_aware"] and spec["consistency"]["policy"] == "bsp":
        raise SpecError("optimizer.staleness_aware", "false under bsp (bsp updates are never stale)", True)
    sched = opt["schedule"]
    if sched["kind"] == "cosine" and sched["total_steps"] == 0 and spec["steps"] is not None:
        sched["total_steps"] = spec["steps"]
    return spec


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers: `1e-3` and `5e2` are floats.

    PyYAML follows YAML 1.1, whose floats need a dot (`1.0e-3`), and reads
    `lr: 1e-3` as the string "1e-3"; people write numbers the 1.2 way.
    """


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def parse_job_text(text: str, *, source: str = "job file") -> dict:
    """Parse YAML text and validate it; raises SpecError (YAML errors name the line)."""
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass: no Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "the file"
        problem = getattr(exc, "problem", exc)
        raise SpecError(source, f"valid YAML (problem at {where}: {problem})", "invalid YAML") from None
    if raw is None:
        raise SpecError(source, "a mapping of fields", "an empty file")
    return validate_job(raw)


def load_job_file(path: str) -> dict:
    """Read and validate a job file; SpecError for a bad field, OSError-derived SpecError for a missing file."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise SpecError(str(path), "an existing job file", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), "a readable UTF-8 job file", type(exc).__name__) from None
    return parse_job_text(text, source=str(path))


# Bytes per parameter: every tensor the servers hold is float32.
PARAM_BYTES = 4
# Classes every classifier has at least, for the size bound below.
MIN_CLASSES = 2


# The built-in sources' input width and classes, known without loading them
# (worker/data: the digits are 8x8 images; synthetic's defaults are 32 features
# and 10 classes, checked against worker/data/synthetic.py by the tests).
DIGITS_DATA = (64, 10)
SYNTHETIC_DEFAULTS = (32, 10)


def known_data(source: str) -> tuple[int, int] | None:
    """(input values per example, classes) of a built-in source; None for files (idx:, npz:)."""
    if source == "sklearn:digits":
        return DIGITS_DATA
    if not source.startswith("synthetic:"):
        return None
    keys = dict(part.partition("=")[::2] for part in source[len("synthetic:"):].split(",") if "=" in part)
    try:
        width = math.prod(int(d) for d in keys["shape"].lower().split("x")) if "shape" in keys \
            else int(keys.get("features", SYNTHETIC_DEFAULTS[0]))
        return width, int(keys.get("classes", SYNTHETIC_DEFAULTS[1]))
    except ValueError:
        return None  # the worker's parser names the bad key


def min_param_bytes(spec: dict) -> int:
    """A lower bound on the bytes of a normalized spec's model, from the spec alone.

    The size depends on the data, which the scheduler does not load: for an
    MLP on a built-in source (known_data) the bound is the exact size;
    otherwise it counts one input feature and two classes, so it never
    refuses a model that would fit. A model over the limit is refused at
    submit with its size (the worker checks the exact size before it
    allocates anything).
    """
    model = spec["model"]
    bn = 4 if model["batchnorm"] else 0       # gamma, beta, running mean and variance
    known = known_data(spec["data"]["source"]) if model["kind"] == "mlp" else None
    if known is not None:
        count, width = 0, known[0]
        for hidden in model["hidden"]:
            count += width * hidden + hidden + bn * hidden
            width = hidden
        return (count + width * known[1] + known[1]) * PARAM_BYTES
    count, width = 0, 1
    if model["kind"] == "cnn":
        k2 = model["kernel"] ** 2
        for channels in model["channels"]:
            count += width * channels * k2 + channels + bn * channels
            width = channels
    for hidden in model["hidden"]:
        count += width * hidden + hidden + bn * hidden
        width = hidden
    count += width * MIN_CLASSES + MIN_CLASSES
    return count * PARAM_BYTES


# --- README's table of every field, from the schema above ----------------------------------------

def _shown_default(value: Any) -> str:
    """A default as it is written in a job file (YAML)."""
    if value is _MISSING:
        return "*required*"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return f"`[{', '.join(map(str, value))}]`"
    return f"`{value!r}`" if isinstance(value, float) else f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(path: str, schema: dict) -> list[str]:
    rows = []
    for key, spec in schema.items():
        where = f"{path}.{key}" if path else key
        if isinstance(spec, dict):
            rows += _rows(where, spec)
        else:
            rows.append(f"| `{where}` | {_shown_default(spec.default)} | {_cell(spec.check.allowed)} | "
                        f"{_cell(spec.doc)} |")
    return rows


def defaults_table() -> str:
    """Every field of a job file with its default, what it accepts and what it means: markdown rows.

    Made from the Field objects the validator uses, so README's table (between its
    `<!-- defaults:begin -->` and `<!-- defaults:end -->` markers) cannot drift from them;
    print it with `python -m protocol.jobspec --markdown` (or `make readme-defaults`).
    """
    head = ["| field | default | allowed | meaning |", "|---|---|---|---|"]
    return "\n".join(head + _rows("", JOB)) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m protocol.jobspec --markdown  (prints README's table of job-file fields)")
    sys.stdout.write(defaults_table())
