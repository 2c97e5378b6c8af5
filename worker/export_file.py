"""Export files: a job's parameters with what is needed to use them again (`psctl export`, `psctl evaluate`).

One file holds every tensor the servers keep for the job (learned
parameters and running statistics, under the model's names: "dense0.W",
"bn0.running_var") and, as string metadata:

    pscluster_export   the file format's version ("1")
    pscluster_version  the pscluster that wrote it
    job, state         the job id and its state when exported
    spec               the job's validated job file, JSON (model, data, seed, ...)
    result             the job's result, JSON (test_accuracy, test_loss, ...; null before the end)
    nonlearned         the running statistics' names, JSON (pushed as deltas, not gradients)
    exported_at        UTC time of the export

The format is safetensors (https://huggingface.co/docs/safetensors): a
JSON header and raw little-endian arrays, no code in the file, and torch,
JAX/flax, TensorFlow and Hugging Face read it as they are (and a string
metadata map is part of the format). A name ending in `.npz` gets numpy's
format instead, for users with numpy alone: `numpy.load` lists exactly the
tensor names (as `psctl export` always wrote), and the metadata, as one
JSON object, is the zip archive's comment, which numpy ignores and
`zipfile.ZipFile(path).comment` reads. No pickles either way.

`load_export(path)` reads either and checks it: the file parses, its
metadata carries a spec that validates as a job file, and its tensors are
those of the model the spec builds (names, shapes, dtypes). The data's
input shape and class count, which the spec alone does not give, are
taken from the file's first and last layers; `evaluate_export` then
builds the model for the job's own data and checks the tensors against it
again. Every problem is ExportFileError, one sentence naming the file and,
for a tensor, the tensor.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import uuid
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT_VERSION = "1"
FORMAT_KEY = "pscluster_export"
# A zip comment is at most this long (its length is a 16-bit field).
MAX_ZIP_COMMENT = 0xFFFF
NPZ_SUFFIX = ".npz"
# Both zip signatures numpy.load looks for: a local file header, and the end record of an empty archive.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


class ExportFileError(ValueError):
    """An export file that cannot be used; the message is one sentence naming the file."""


def pscluster_version() -> str:
    try:
        return importlib.metadata.version("pscluster")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def export_metadata(*, job: str, state: str, spec: Mapping, result: Mapping | None,
                    nonlearned: list[str]) -> dict[str, str]:
    """The metadata of an export file (every value a string, as safetensors requires)."""
    # A finished job's per-partition history can be long and says nothing about the model; NaN (a
    # diverged loss) is not JSON other readers accept, null is.
    result = {k: None if isinstance(v, float) and not math.isfinite(v) else v
              for k, v in result.items() if k != "partitions"} if result else None
    return {
        FORMAT_KEY: FORMAT_VERSION,
        "pscluster_version": pscluster_version(),
        "job": str(job),
        "state": str(state),
        "spec": json.dumps(spec, sort_keys=True),
        "result": json.dumps(result, sort_keys=True, default=str),
        "nonlearned": json.dumps(sorted(nonlearned)),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# --- writing -------------------------------------------------------------------------------------

def write_export(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write `tensors` and `metadata` to `path` (.npz: numpy's format; otherwise safetensors), atomically.

    The file is written under a temporary name in the same directory and
    renamed over `path` once complete and synced, so a reader (or an
    interrupted export) never sees half a file and an older file stays
    whole until replaced. OSError on a write failure; ExportFileError when
    the metadata does not fit an .npz comment.
    """
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:8]}.tmp")
    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    try:
        if path.endswith(NPZ_SUFFIX):
            _write_npz(tmp, arrays, metadata, shown=path)
        else:
            from safetensors import SafetensorError
            from safetensors.numpy import save_file

            try:
                save_file(arrays, tmp, metadata=dict(metadata))
            except SafetensorError as exc:  # its I/O errors come as this, not as OSError
                raise OSError(_first_line(exc)) from None
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_npz(tmp: str, arrays: dict[str, np.ndarray], metadata: Mapping[str, str], *, shown: str) -> None:
    comment = json.dumps(dict(metadata), sort_keys=True).encode()
    if len(comment) > MAX_ZIP_COMMENT:
        # zipfile would cut it silently; a .safetensors header has no such limit.
        raise ExportFileError(f"{shown}: the metadata ({len(comment):,} bytes) does not fit an .npz file's "
                              f"{MAX_ZIP_COMMENT:,}-byte comment; write a .safetensors file instead")
    # What numpy.savez writes (one stored NAME.npy per array), with the metadata as the archive comment.
    with open(tmp, "xb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.comment = comment
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


# --- reading -------------------------------------------------------------------------------------

def read_export(path: str) -> tuple[dict, dict[str, np.ndarray], dict]:
    """(spec, tensors, meta) of an export file: parsed, spec validated; the tensors are not checked yet.

    `meta` holds the metadata with the JSON values decoded (result: a dict
    or None, nonlearned: a list). ExportFileError for any problem.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ExportFileError(f"cannot read {path}: {exc.strerror}") from None
    raw, tensors = _read_npz(path) if head in ZIP_MAGIC else _read_safetensors(path)
    spec, meta = _check_metadata(path, raw)
    return spec, tensors, meta


def _read_safetensors(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as f:
            raw = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ExportFileError(f"{path} is not an export file: neither an .npz nor a readable safetensors file "
                              f"({_first_line(exc)})") from None
    return raw, tensors


def _read_npz(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        with zipfile.ZipFile(path) as zf:
            comment = zf.comment
        with np.load(path, allow_pickle=False) as npz:
            tensors = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise ExportFileError(f"{path} is not a readable .npz export file ({_first_line(exc)})") from None
    odd = sorted(name for name, value in tensors.items() if not isinstance(value, np.ndarray))
    if odd:  # numpy.load hands back the raw bytes of a member that is not an .npy array
        raise ExportFileError(f"{path}: its member {odd[0]} is not a numpy array")
    try:
        raw = json.loads(comment.decode()) if comment else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        raw = None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ExportFileError(f"{path}: its zip comment is not the metadata of a psctl export "
                              "(a JSON object of strings)")
    return raw, tensors


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _json_field(path: str, raw: Mapping, key: str, default: Any = None) -> Any:
    if key not in raw:
        return default
    try:
        return json.loads(raw[key])
    except json.JSONDecodeError:
        raise ExportFileError(f"{path}: its metadata field {key!r} is not JSON") from None


def _check_metadata(path: str, raw: Mapping) -> tuple[dict, dict]:
    from protocol.jobspec import SpecError, validate_job

    if "spec" not in raw:
        raise ExportFileError(f"{path} has no job spec in its metadata: it was not written by psctl export "
                              "(older exports hold the tensors only)")
    version = raw.get(FORMAT_KEY, FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ExportFileError(f"{path} is export format {version!r}; this pscluster reads format "
                              f"{FORMAT_VERSION} (written by pscluster {raw.get('pscluster_version', '?')})")
    try:
        spec = validate_job(_json_field(path, raw, "spec"))
    except SpecError as exc:
        raise ExportFileError(f"{path}: the job spec in its metadata does not validate: {exc}") from None
    result = _json_field(path, raw, "result")
    nonlearned = _json_field(path, raw, "nonlearned", [])
    if result is not None and not isinstance(result, dict):
        raise ExportFileError(f"{path}: its metadata field 'result' is not a JSON object or null")
    if not isinstance(nonlearned, list) or not all(isinstance(n, str) for n in nonlearned):
        raise ExportFileError(f"{path}: its metadata field 'nonlearned' is not a JSON list of tensor names")
    meta = {**raw, "result": result, "nonlearned": nonlearned}
    del meta["spec"]
    return spec, meta


# --- checking the tensors against the model --------------------------------------------------------

def _shape_text(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def check_tensors(path: str, expected: Mapping[str, tuple[tuple[int, ...], str]],
                  tensors: Mapping[str, np.ndarray]) -> None:
    """ExportFileError naming the first tensor that is missing, extra, or of another shape or dtype.

    `expected` is Model.param_shapes(): name -> (shape, dtype name).
    """
    for name in sorted(expected):
        shape, dtype = expected[name]
        if name not in tensors:
            raise ExportFileError(f"{path}: tensor {name} of the spec's model is missing from the file")
        got = tensors[name]
        if tuple(got.shape) != tuple(shape):
            raise ExportFileError(f"{path}: tensor {name} has shape {_shape_text(got.shape)}, but the spec's "
                                  f"model needs {_shape_text(shape)}")
        if got.dtype.name != dtype:
            raise ExportFileError(f"{path}: tensor {name} is {got.dtype.name}, but the spec's model needs {dtype}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ExportFileError(f"{path}: tensor {extra[0]} is not part of the spec's model")


def _tensor(path: str, tensors: Mapping[str, np.ndarray], name: str, ndim: int) -> np.ndarray:
    array = tensors.get(name)
    if array is None:
        raise ExportFileError(f"{path}: tensor {name} of the spec's model is missing from the file")
    if array.ndim != ndim:
        raise ExportFileError(f"{path}: tensor {name} has shape {_shape_text(array.shape)}, but the spec's model "
                              f"needs {ndim} dimensions")
    return array


def io_from_tensors(path: str, model_spec: dict, tensors: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], int]:
    """(input shape, number of classes) the file's tensors were made for, read off its first and last layers.

    Only the data tells them, and checking a file must not need the data.
    For a cnn only the flattened size after the pools is fixed, so the
    (channels, height, width) returned is one that gives the same tensors.
    """
    last = f"dense{len(model_spec['hidden'])}.b"  # the output layer: one bias per class
    num_classes = int(_tensor(path, tensors, last, 1).shape[0])
    width = int(_tensor(path, tensors, "dense0.W", 2).shape[0])
    if model_spec["kind"] != "cnn":
        return (width,), num_classes
    in_channels = int(_tensor(path, tensors, "conv0.W", 4).shape[1])
    last_channels = int(model_spec["channels"][-1])
    if width % last_channels:
        raise ExportFileError(f"{path}: tensor dense0.W has {width} rows, not a multiple of the last conv "
                              f"stage's {last_channels} channels")
    side = 2 ** len(model_spec["channels"])  # every stage halves height and width
    return (in_channels, width // last_channels * side, side), num_classes


def model_shapes(path: str, spec: dict, input_shape: tuple[int, ...], num_classes: int) -> dict:
    """Model.param_shapes() of the model `spec` builds for this data shape (on the CPU)."""
    from worker.nn.model import build_model

    try:
        model = build_model(spec["model"], input_shape, num_classes, seed=int(spec["seed"]))
    except ValueError as exc:
        raise ExportFileError(f"{path}: its tensors do not fit the spec's model: {exc}") from None
    return model.param_shapes()


def load_export(path: str) -> tuple[dict, dict[str, np.ndarray], dict]:
    """(spec, tensors, meta) of an export file, checked: it parses, its spec validates, its tensors are
    exactly those of the model the spec builds. ExportFileError (one sentence) otherwise."""
    spec, tensors, meta = read_export(path)
    input_shape, num_classes = io_from_tensors(path, spec["model"], tensors)
    check_tensors(path, model_shapes(path, spec, input_shape, num_classes), tensors)
    return spec, tensors, meta


# --- evaluating ----------------------------------------------------------------------------------

def evaluate_export(path: str, spec: dict, tensors: Mapping[str, np.ndarray], *, device,
                    roots: tuple[str, ...] | None = None) -> dict:
    """Test loss and accuracy of `tensors` on the job's own test split, as the job's final evaluation.

    The same calls as the worker's final evaluation (worker/task.py,
    `Task._build` and `_evaluate_final`): load_dataset with the job's data
    section and seed (so the same test_fraction split), build_model for
    that data, the parameters loaded, worker.trainer.evaluate. `roots` as
    a worker's --data-root (None: any path, relative to the current
    directory). DataError for data that cannot be read, ExportFileError
    when a tensor does not fit the model built for this data.
    """
    from worker.data import load_dataset
    from worker.nn.model import build_model
    from worker.trainer import evaluate

    seed = int(spec["seed"])
    train, test = load_dataset(spec["data"], seed=seed, roots=roots)
    try:
        model = build_model(spec["model"], train.input_shape, train.num_classes, seed=seed, xp=device.xp)
    except ValueError as exc:  # e.g. a cnn on flat features: the job itself could not have run
        raise ExportFileError(f"{path}: the spec's model does not fit its data: {exc}") from None
    check_tensors(path, model.param_shapes(), tensors)
    model.load(dict(tensors))
    loss, accuracy = evaluate(model, test, xp=device.xp)
    return {"test_accuracy": accuracy, "test_loss": loss, "examples": len(test)}
