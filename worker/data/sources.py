"""The `data.source` strings of a job, parsed and loaded.

    sklearn:digits            the 1,797 8x8 digit images scikit-learn ships
                              (vendored in worker/datasets/; no scikit-learn needed)
    idx:DIR                   MNIST IDX files in DIR (see worker.data.idx)
    npz:PATH                  arrays x (N, ...) and y (N,), optional x_test/y_test, num_classes
    synthetic:n=N,k=v,...     seeded Gaussian clusters, generated lazily (keys below)

`parse_source` checks a string's syntax without touching any file;
`load_dataset` returns the (train, test) pair for a normalized `data:` dict,
reading idx: and npz: paths only under the data roots it is given
(worker/data/roots.py; a worker's --data-root).
"""
from __future__ import annotations

import functools
import gzip
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import worker
from worker.data.base import ArrayDataset, DataError, Dataset, split_holdout
from worker.data.idx import load_idx_dir
from worker.data.roots import PathGuard
from worker.data.synthetic import (
    DEFAULT_CLASSES,
    DEFAULT_FEATURES,
    DEFAULT_NOISE,
    DEFAULT_SEPARATION,
    SyntheticDataset,
)

SCHEMES = ("sklearn", "idx", "npz", "synthetic")
EXPECTED_FORMS = "sklearn:digits, idx:DIR, npz:PATH or synthetic:n=N,k=v,..."
DIGITS_PATH = Path(worker.__file__).parent / "datasets" / "digits.csv.gz"
DIGITS_ROWS, DIGITS_PIXELS, DIGITS_MAX = 1797, 64, 16.0


def _parse_shape(value: str) -> tuple[int, ...]:
    return tuple(int(p) for p in value.lower().split("x"))


def _parse_count_or_fraction(value: str) -> int | float:
    return int(value) if value.isdigit() else float(value)


# synthetic key -> (parser, check of the parsed value, what the error sentence expects)
_SYNTHETIC_KEYS = {
    "n": (int, lambda v: v >= 1, "an integer >= 1"),
    "test": (_parse_count_or_fraction,
             lambda v: v >= 1 if isinstance(v, int) else 0.0 < v < 1.0,
             "an integer >= 1 or a fraction in (0, 1)"),
    "features": (int, lambda v: v >= 1, "an integer >= 1"),
    "shape": (_parse_shape, lambda v: all(d >= 1 for d in v), "sizes joined by x, such as 1x8x8"),
    "classes": (int, lambda v: v >= 2, "an integer >= 2"),
    "separation": (float, lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    "noise": (float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
    "seed": (int, lambda v: v >= 0, "an integer >= 0"),
}


def _bad(source: str, what: str) -> DataError:
    return DataError(f"data.source {source!r}: {what}")


def _parse_synthetic(source: str, body: str) -> dict:
    out: dict = {"scheme": "synthetic"}
    if not body.strip():
        raise _bad(source, "expected synthetic:n=N[,key=value...], found no keys")
    for item in body.split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise _bad(source, f"expected key=value items separated by commas, found {item!r}")
        if key not in _SYNTHETIC_KEYS:
            raise _bad(source, f"expected a key among {', '.join(_SYNTHETIC_KEYS)}, found {key!r}")
        if key in out:
            raise _bad(source, f"expected each key once, found {key!r} twice")
        parse, check, expected = _SYNTHETIC_KEYS[key]
        try:
            parsed = parse(value)
            ok = check(parsed)
        except ValueError:
            ok = False
        if not ok:
            raise _bad(source, f"expected {key} to be {expected}, found {value!r}")
        out[key] = parsed
    if "n" not in out:
        raise _bad(source, "expected the key n (number of training examples), found none")
    if "features" in out and "shape" in out:
        raise _bad(source, "expected either features or shape, found both")
    return out


def parse_source(source: str) -> dict:
    """The parsed form of a `data.source` string; checks syntax only, loads nothing.

    Returns {"scheme": "sklearn", "name": "digits"}, {"scheme": "idx"|"npz",
    "path": str} or {"scheme": "synthetic", "n": int, ...the keys given}.
    Raises DataError on an unknown scheme, an empty path, or a bad key/value.
    """
    if not isinstance(source, str):
        raise DataError(f"data.source: expected a string such as {EXPECTED_FORMS}, "
                        f"found {type(source).__name__}")
    scheme, colon, rest = source.partition(":")
    scheme = scheme.strip().lower()
    if not colon or scheme not in SCHEMES:
        raise _bad(source, f"expected one of {EXPECTED_FORMS}, found "
                   + (f"the unknown scheme {scheme!r}" if colon else "no scheme"))
    if scheme == "sklearn":
        if rest.strip() != "digits":
            raise _bad(source, f"expected sklearn:digits (the one scikit-learn set shipped), found {rest!r}")
        return {"scheme": "sklearn", "name": "digits"}
    if scheme in ("idx", "npz"):
        if not rest.strip():
            raise _bad(source, f"expected {scheme}:PATH, found an empty path")
        return {"scheme": scheme, "path": rest.strip()}
    return _parse_synthetic(source, rest)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = DIGITS_PATH
    if not path.is_file():
        raise DataError(f"data source sklearn:digits: expected the vendored file {path}, found no such file")
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"data source sklearn:digits: expected {path} to be a gzip CSV of numbers, "
                        f"found an error ({exc})") from None
    if table.shape != (DIGITS_ROWS, DIGITS_PIXELS + 1):
        raise DataError(f"data source sklearn:digits: expected {path} to hold {DIGITS_ROWS} rows of "
                        f"{DIGITS_PIXELS + 1} columns, found shape {table.shape}")
    x = table[:, :DIGITS_PIXELS].reshape(-1, 1, 8, 8).astype(np.uint8)
    y = table[:, DIGITS_PIXELS].astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def load_digits() -> ArrayDataset:
    """All 1,797 digits: x (1, 8, 8) in [0, 1] (pixels / 16), y in 0..9."""
    x, y = _digits_arrays()
    return ArrayDataset(x, y, num_classes=10, scale=1.0 / DIGITS_MAX, name="sklearn:digits")


def _npz_labels(path: Path, key: str, y: np.ndarray) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"npz file {path}: expected {key} of shape (N,), found shape {y.shape}")
    if y.dtype.kind in "iu":
        return y.astype(np.int64)
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    sample = y[~(y == np.round(y))][:1] if y.dtype.kind == "f" else y[:1]
    raise DataError(f"npz file {path}: expected integer labels in {key}, found dtype {y.dtype}"
                    + (f" with value {sample[0].item()!r}" if sample.size else ""))


def _npz_features(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise DataError(f"npz file {path}: expected numeric features in {key}, found dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"npz file {path}: expected {key} of shape (N, features...), found shape {x.shape}")
    return x


def load_npz(path_str: str, *, test_fraction: float, seed: int,
             roots: Sequence[str] | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) from a .npz with x, y and optionally x_test, y_test, num_classes.

    uint8 features are scaled to [0, 1] (pixels); other dtypes are used as
    stored. Without x_test/y_test a seeded `test_fraction` is held out.
    Never unpickles: object arrays are refused. `roots`: see worker.data.roots
    (None: any path; otherwise the path must lie inside one of them).
    """
    path = PathGuard(f"npz:{path_str}", roots).resolve(path_str)
    if not path.is_file():
        raise DataError(f"data source npz:{path_str}: expected a .npz file, found no such file at {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"npz file {path}: expected a numpy .npz archive, found an unreadable file ({exc})") from None
    with npz:
        keys = set(npz.files)
        for k in ("x", "y"):
            if k not in keys:
                raise DataError(f"npz file {path}: expected an array named {k!r}, "
                                f"found only {sorted(keys) or 'no arrays'}")
        if ("x_test" in keys) != ("y_test" in keys):
            missing = "y_test" if "x_test" in keys else "x_test"
            raise DataError(f"npz file {path}: expected x_test and y_test together, found no {missing!r}")
        try:
            arrays = {k: npz[k] for k in keys & {"x", "y", "x_test", "y_test", "num_classes"}}
        except ValueError as exc:  # object arrays need pickle, which we refuse
            raise DataError(f"npz file {path}: expected plain numeric arrays, "
                            f"found one that needs pickle ({exc})") from None
    x = _npz_features(path, "x", arrays["x"])
    y = _npz_labels(path, "y", arrays["y"])
    if len(x) != len(y):
        raise DataError(f"npz file {path}: expected as many labels as examples, "
                        f"found {len(x)} rows in x and {len(y)} in y")
    has_test = "x_test" in arrays
    if has_test:
        xt = _npz_features(path, "x_test", arrays["x_test"])
        yt = _npz_labels(path, "y_test", arrays["y_test"])
        if len(xt) != len(yt):
            raise DataError(f"npz file {path}: expected as many test labels as test examples, "
                            f"found {len(xt)} rows in x_test and {len(yt)} in y_test")
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"npz file {path}: expected x_test rows of shape {x.shape[1:]} like x, "
                            f"found {xt.shape[1:]}")
    all_y = np.concatenate([y, yt]) if has_test else y
    if len(all_y) == 0:
        raise DataError(f"npz file {path}: expected at least one example, found none")
    if "num_classes" in arrays:
        nc = arrays["num_classes"]
        if nc.shape not in ((), (1,)) or nc.dtype.kind not in "iu" or int(nc.reshape(-1)[0]) < 1:
            raise DataError(f"npz file {path}: expected num_classes to be a positive integer scalar, "
                            f"found {nc!r}")
        num_classes = int(nc.reshape(-1)[0])
    else:
        num_classes = int(all_y.max()) + 1
    lo, hi = int(all_y.min()), int(all_y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"npz file {path}: expected labels in 0..{num_classes - 1}, "
                        f"found {lo if lo < 0 else hi}")
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    name = f"npz:{path_str}"
    train = ArrayDataset(x, y, num_classes=num_classes, scale=scale, name=name)
    if not has_test:
        return split_holdout(train, test_fraction, seed=seed)
    tscale = 1.0 / 255.0 if xt.dtype == np.uint8 else 1.0
    return train, ArrayDataset(xt, yt, num_classes=num_classes, scale=tscale, name=f"{name} (test)")


def _synthetic(parsed: dict, *, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    n = parsed["n"]
    test = parsed.get("test", test_fraction)
    n_test = test if isinstance(test, int) else max(1, round(n * test))
    if "shape" in parsed:
        shape = parsed["shape"]
    else:
        shape = (parsed.get("features", DEFAULT_FEATURES),)
    common = {"input_shape": shape, "classes": parsed.get("classes", DEFAULT_CLASSES),
                  "separation": parsed.get("separation", DEFAULT_SEPARATION),
                  "noise": parsed.get("noise", DEFAULT_NOISE), "seed": parsed.get("seed", seed)}
    return (SyntheticDataset(n, offset=0, name="synthetic (train)", **common),
            SyntheticDataset(n_test, offset=n, name="synthetic (test)", **common))


def load_dataset(data_spec: dict, *, seed: int = 0,
                 roots: Sequence[str] | None = None) -> tuple[Dataset, Dataset]:
    """(train, test) for the normalized `data:` dict of a job spec.

    `seed` is the job seed: it fixes the held-out split (digits, npz, idx
    without t10k) and the synthetic stream unless the source names its own.
    `roots` are the directories idx: and npz: paths must lie in (a worker's
    --data-root; an empty tuple: built-in sources only); None reads any path
    (train-local). Raises DataError with one sentence on any problem with the
    source, a path outside the roots included (worker.data.roots).
    """
    source = data_spec.get("source")
    test_fraction = float(data_spec.get("test_fraction", 0.2))
    parsed = parse_source(source)
    scheme = parsed["scheme"]
    if scheme == "sklearn":
        return split_holdout(load_digits(), test_fraction, seed=seed)
    if scheme == "idx":
        return load_idx_dir(parsed["path"], test_fraction=test_fraction, seed=seed, roots=roots)
    if scheme == "npz":
        return load_npz(parsed["path"], test_fraction=test_fraction, seed=seed, roots=roots)
    return _synthetic(parsed, test_fraction=test_fraction, seed=seed)
