"""The IDX file format of MNIST (and Fashion-MNIST, EMNIST...), read and written.

Layout (big-endian): two zero bytes, a dtype code, the number of
dimensions d, then d uint32 sizes, then the data in C order. Files may be
gzip-compressed (`.gz`). Header parsing is ours, checked field by field,
so a wrong file gives a sentence naming it instead of a numpy error.
"""
from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from worker.data.base import ArrayDataset, DataError, split_holdout
from worker.data.roots import PathGuard

# IDX dtype code -> big-endian numpy dtype
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
MNIST_CLASSES = 10


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"IDX file {path}: expected a readable "
                        f"{'gzip ' if path.suffix == '.gz' else ''}file, found an error ({exc})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in one IDX file (plain or .gz), in native byte order.

    Raises DataError naming the file on a bad magic number, unknown dtype
    code, or a data length that does not match the header's dimensions.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"IDX file {path}: expected a 4-byte magic number, found {len(raw)} bytes in all")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES or ndim == 0:
        raise DataError(f"IDX file {path}: expected a magic number 0x0000<dtype><ndim> with dtype in "
                        f"{{08,09,0B,0C,0D,0E}} and ndim >= 1, found 0x{raw[:4].hex().upper()}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"IDX file {path}: expected {ndim} dimension sizes after the magic number, "
                        f"found a file of {len(raw)} bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = IDX_DTYPES[code]
    want = math.prod(dims) * dtype.itemsize
    have = len(raw) - header_len
    if have != want:
        raise DataError(f"IDX file {path}: expected {want} data bytes for dimensions "
                        f"{'x'.join(map(str, dims))}, found {have}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write `array` as an IDX file (gzip-compressed when `path` ends in .gz)."""
    path = Path(path)
    arr = np.asarray(array)
    code = _CODES.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}; use uint8, int8, int16, int32, float32 or float64")
    body = struct.pack(">BBBB", 0, 0, code, arr.ndim)
    body += struct.pack(f">{arr.ndim}I", *arr.shape)
    body += np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(body)
    else:
        path.write_bytes(body)


def _find(directory: Path, stem: str, guard: PathGuard) -> Path | None:
    for name in (stem, stem + ".gz"):
        p = guard.member(directory / name)  # a symlink out of the roots is refused before it is stat'ed
        if p.is_file():
            return p
    return None


def _load_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    images = read_idx(images_path)
    if images.ndim != 3:
        raise DataError(f"IDX file {images_path}: expected 3 dimensions (count, rows, columns), "
                        f"found {images.ndim} ({'x'.join(map(str, images.shape))})")
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise DataError(f"IDX file {labels_path}: expected 1 dimension (count), "
                        f"found {labels.ndim} ({'x'.join(map(str, labels.shape))})")
    if labels.dtype.kind not in "iu":
        raise DataError(f"IDX file {labels_path}: expected integer labels, found dtype {labels.dtype}")
    if len(images) != len(labels):
        raise DataError(f"IDX files {images_path} and {labels_path}: expected as many labels as images, "
                        f"found {len(images)} images and {len(labels)} labels")
    if len(labels):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= MNIST_CLASSES:
            raise DataError(f"IDX file {labels_path}: expected labels in 0..{MNIST_CLASSES - 1}, "
                            f"found {lo if lo < 0 else hi}")
    # 8-bit pixels are scaled to [0, 1]; any other dtype is taken as it is.
    scale = 1.0 / 255.0 if images.dtype == np.uint8 else 1.0
    return images[:, None, :, :], labels, scale


def load_idx_dir(directory: str | Path, *, test_fraction: float, seed: int, roots: Sequence[str] | None = None):
    """(train, test) from the MNIST files in `directory` (each plain or .gz).

    The t10k pair, when present, is the test split; otherwise a seeded
    `test_fraction` of the training files is held out. `roots`: see
    worker.data.roots (None: any path; otherwise the directory and each file
    read in it must lie inside one of them).
    """
    guard = PathGuard(f"idx:{directory}", roots)
    d = guard.resolve(str(directory))
    if not d.is_dir():
        raise DataError(f"data source idx:{directory}: expected a directory of MNIST IDX files, "
                        f"found {'a file' if d.exists() else 'nothing'} at {d}")
    tr_img, tr_lab = _find(d, TRAIN_IMAGES, guard), _find(d, TRAIN_LABELS, guard)
    for stem, found in ((TRAIN_IMAGES, tr_img), (TRAIN_LABELS, tr_lab)):
        if found is None:
            raise DataError(f"data source idx:{directory}: expected {stem} (or {stem}.gz) in {d}, found no such file")
    te_img, te_lab = _find(d, TEST_IMAGES, guard), _find(d, TEST_LABELS, guard)
    if (te_img is None) != (te_lab is None):
        have, missing = (TEST_IMAGES, TEST_LABELS) if te_lab is None else (TEST_LABELS, TEST_IMAGES)
        raise DataError(f"data source idx:{directory}: expected {missing} (or .gz) next to {have} in {d}, "
                        f"found no such file")
    x, y, scale = _load_pair(tr_img, tr_lab)
    train = ArrayDataset(x, y, num_classes=MNIST_CLASSES, scale=scale, name=f"idx:{directory}")
    if te_img is None:
        return split_holdout(train, test_fraction, seed=seed)
    xt, yt, tscale = _load_pair(te_img, te_lab)
    if xt.shape[1:] != x.shape[1:]:
        raise DataError(f"IDX file {te_img}: expected images of {x.shape[2]}x{x.shape[3]} like the "
                        f"training images, found {xt.shape[2]}x{xt.shape[3]}")
    test = ArrayDataset(xt, yt, num_classes=MNIST_CLASSES, scale=tscale, name=f"idx:{directory} (t10k)")
    return train, test
