"""worker.data: the sources (digits, IDX, npz, synthetic) and their error sentences."""
from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from worker.data import (
    DataError,
    load_dataset,
    load_digits,
    parse_source,
    read_idx,
    write_idx,
)
from worker.data.idx import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS


def spec(source: str, test_fraction: float = 0.2) -> dict:
    return {"source": source, "batch_size": 32, "test_fraction": test_fraction, "micro_batches": 1}


# ---------------------------------------------------------------- digits

def test_digits_shapes_dtypes_ranges():
    ds = load_digits()
    assert len(ds) == 1797 and ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    x, y = ds.take(np.arange(len(ds)))
    assert x.dtype == np.float32 and x.shape == (1797, 1, 8, 8)
    assert y.dtype == np.int64 and y.shape == (1797,)
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))
    # the first sklearn digit is a 0 whose top row is 0 0 5 13 9 1 0 0
    assert y[0] == 0
    np.testing.assert_allclose(x[0, 0, 0] * 16, [0, 0, 5, 13, 9, 1, 0, 0])


def test_digits_split_is_seeded_disjoint_and_sized():
    train, test = load_dataset(spec("sklearn:digits", 0.2), seed=0)
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * 0.2)
    again, _ = load_dataset(spec("sklearn:digits", 0.2), seed=0)
    other, _ = load_dataset(spec("sklearn:digits", 0.2), seed=1)
    xa, _ = train.take(np.arange(50))
    xb, _ = again.take(np.arange(50))
    xc, _ = other.take(np.arange(50))
    assert np.array_equal(xa, xb) and not np.array_equal(xa, xc)
    # disjoint: no test image equals a train row it came from (compare row identities)
    assert not set(train._rows.tolist()) & set(test._rows.tolist())


def test_take_refuses_out_of_range_and_negative():
    ds = load_digits()
    with pytest.raises(IndexError):
        ds.take([1797])
    with pytest.raises(IndexError):
        ds.take([-1])


# ---------------------------------------------------------------- idx

def _write_mnist(d, n=20, h=5, w=4, gz=False, test_n=None, seed=0):
    rng = np.random.default_rng(seed)
    sfx = ".gz" if gz else ""
    imgs = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    labs = rng.integers(0, 10, size=n).astype(np.uint8)
    write_idx(d / (TRAIN_IMAGES + sfx), imgs)
    write_idx(d / (TRAIN_LABELS + sfx), labs)
    if test_n:
        write_idx(d / (TEST_IMAGES + sfx), imgs[:test_n])
        write_idx(d / (TEST_LABELS + sfx), labs[:test_n])
    return imgs, labs


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    imgs, labs = _write_mnist(tmp_path, gz=gz, test_n=6)
    sfx = ".gz" if gz else ""
    assert np.array_equal(read_idx(tmp_path / (TRAIN_IMAGES + sfx)), imgs)
    train, test = load_dataset(spec(f"idx:{tmp_path}"), seed=0)
    assert len(train) == 20 and len(test) == 6 and train.input_shape == (1, 5, 4)
    x, y = train.take(np.arange(20))
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(x[:, 0] * 255, imgs, atol=1e-4)
    assert np.array_equal(y, labs)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_other_dtypes_round_trip(tmp_path, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    write_idx(tmp_path / "a.idx", arr)
    back = read_idx(tmp_path / "a.idx")
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, arr)


def test_idx_without_t10k_splits_by_fraction(tmp_path):
    _write_mnist(tmp_path, n=50)
    train, test = load_dataset(spec(f"idx:{tmp_path}", 0.2), seed=0)
    assert (len(train), len(test)) == (40, 10)


def test_idx_missing_dir(tmp_path):
    with pytest.raises(DataError, match=r"expected a directory of MNIST IDX files, found nothing"):
        load_dataset(spec(f"idx:{tmp_path / 'nope'}"))


def test_idx_missing_file(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / TRAIN_LABELS).unlink()
    with pytest.raises(DataError, match=rf"expected {TRAIN_LABELS} \(or {TRAIN_LABELS}.gz\).*found no such file"):
        load_dataset(spec(f"idx:{tmp_path}"))


def test_idx_half_test_pair(tmp_path):
    _write_mnist(tmp_path, test_n=4)
    (tmp_path / TEST_LABELS).unlink()
    with pytest.raises(DataError, match=rf"expected {TEST_LABELS}.*next to {TEST_IMAGES}"):
        load_dataset(spec(f"idx:{tmp_path}"))


def test_idx_bad_magic(tmp_path):
    _write_mnist(tmp_path)
    p = tmp_path / TRAIN_IMAGES
    raw = bytearray(p.read_bytes())
    raw[0] = 0x12
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"IDX file {p}: expected a magic number .* found 0x1200"):
        load_dataset(spec(f"idx:{tmp_path}"))


def test_idx_truncated(tmp_path):
    _write_mnist(tmp_path)
    p = tmp_path / TRAIN_IMAGES
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(DataError, match=rf"IDX file {p}: expected 400 data bytes for dimensions 20x5x4, found 397"):
        load_dataset(spec(f"idx:{tmp_path}"))


def test_idx_wrong_dims(tmp_path):
    _write_mnist(tmp_path)
    write_idx(tmp_path / TRAIN_IMAGES, np.zeros((20, 20), np.uint8))
    with pytest.raises(DataError, match=r"expected 3 dimensions \(count, rows, columns\), found 2 \(20x20\)"):
        load_dataset(spec(f"idx:{tmp_path}"))


def test_idx_count_mismatch(tmp_path):
    _write_mnist(tmp_path)
    write_idx(tmp_path / TRAIN_LABELS, np.zeros(19, np.uint8))
    with pytest.raises(DataError, match=r"expected as many labels as images, found 20 images and 19 labels"):
        load_dataset(spec(f"idx:{tmp_path}"))


@pytest.mark.parametrize("bad", [10, -1])
def test_idx_label_out_of_range(tmp_path, bad):
    _write_mnist(tmp_path)
    labs = np.zeros(20, np.int8 if bad < 0 else np.uint8)
    labs[3] = bad
    write_idx(tmp_path / TRAIN_LABELS, labs)
    with pytest.raises(DataError, match=rf"{TRAIN_LABELS}: expected labels in 0..9, found {bad}"):
        load_dataset(spec(f"idx:{tmp_path}"))


def test_idx_bad_gzip(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / TRAIN_IMAGES).unlink()
    (tmp_path / (TRAIN_IMAGES + ".gz")).write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"expected a readable gzip file"):
        load_dataset(spec(f"idx:{tmp_path}"))


# ---------------------------------------------------------------- npz

def test_npz_with_and_without_test(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 3, 2))
    y = rng.integers(0, 4, 30)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    train, test = load_dataset(spec(f"npz:{tmp_path / 'a.npz'}", 0.2), seed=0)
    assert (len(train), len(test)) == (24, 6)
    assert train.input_shape == (3, 2) and train.num_classes == int(y.max()) + 1
    np.savez(tmp_path / "b.npz", x=x, y=y, x_test=x[:5], y_test=y[:5], num_classes=7)
    train, test = load_dataset(spec(f"npz:{tmp_path / 'b.npz'}"))
    assert (len(train), len(test), train.num_classes) == (30, 5, 7)
    xt, yt = test.take(np.arange(5))
    np.testing.assert_allclose(xt, x[:5].astype(np.float32))
    assert np.array_equal(yt, y[:5])


def test_npz_uint8_is_scaled_and_float_labels_accepted(tmp_path):
    x = np.full((4, 2), 255, np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([0.0, 1.0, 2.0, 1.0]), x_test=x, y_test=np.arange(4))
    train, _test = load_dataset(spec(f"npz:{tmp_path / 'a.npz'}"))
    xs, ys = train.take(np.arange(4))
    assert xs.max() == 1.0 and ys.dtype == np.int64 and train.num_classes == 4


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros(3, int)}, r"expected an array named 'x', found only \['y'\]"),
    ({"x": np.zeros((3, 2))}, r"expected an array named 'y', found only \['x'\]"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(4, int)},
     r"expected as many labels as examples, found 3 rows in x and 4 in y"),
    ({"x": np.zeros((3, 2)), "y": np.array([0.0, 0.5, 1.0])},
     r"expected integer labels in y, found dtype float64 with value 0.5"),
    ({"x": np.zeros((3, 2)), "y": np.array([0, 5, 1]), "num_classes": 3}, r"expected labels in 0..2, found 5"),
    ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 1])}, r"expected labels in 0..1, found -1"),
    ({"x": np.array([["a", "b"]] * 3), "y": np.zeros(3, int)}, r"expected numeric features in x, found dtype <U1"),
    ({"x": np.zeros(3), "y": np.zeros(3, int)}, r"expected x of shape \(N, features...\), found shape \(3,\)"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(3, int), "x_test": np.zeros((2, 2))},
     r"expected x_test and y_test together, found no 'y_test'"),
])
def test_npz_errors(tmp_path, arrays, message):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=rf"npz file {p}: {message}"):
        load_dataset(spec(f"npz:{p}"))


def test_npz_object_array_refused_without_unpickling(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, x=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3, int))
    with pytest.raises(DataError, match=r"expected plain numeric arrays, found one that needs pickle"):
        load_dataset(spec(f"npz:{p}"))


def test_npz_missing_and_garbage_file(tmp_path):
    with pytest.raises(DataError, match=r"npz:.*expected a .npz file, found no such file"):
        load_dataset(spec(f"npz:{tmp_path / 'nope.npz'}"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"expected a numpy .npz archive, found an unreadable file"):
        load_dataset(spec(f"npz:{tmp_path / 'junk.npz'}"))


# ---------------------------------------------------------------- synthetic

def test_synthetic_shapes_split_and_determinism():
    train, test = load_dataset(spec("synthetic:n=1000,features=12,classes=3"), seed=5)
    assert (len(train), len(test)) == (1000, 200)
    assert train.input_shape == (12,) and train.num_classes == 3
    x, y = train.take(np.array([3, 999, 3]))
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (3, 12)
    assert np.array_equal(x[0], x[2]) and set(y) <= {0, 1, 2}
    again, _ = load_dataset(spec("synthetic:n=1000,features=12,classes=3"), seed=5)
    assert np.array_equal(again.take([999])[0][0], x[1])
    other, _ = load_dataset(spec("synthetic:n=1000,features=12,classes=3"), seed=6)
    assert not np.array_equal(other.take([999])[0][0], x[1])
    # the source's own seed beats the job seed
    own, _ = load_dataset(spec("synthetic:n=1000,features=12,classes=3,seed=5"), seed=99)
    assert np.array_equal(own.take([999])[0][0], x[1])
    # test examples are the stream after the train examples: disjoint from train
    long, _ = load_dataset(spec("synthetic:n=1200,features=12,classes=3"), seed=5)
    assert np.array_equal(long.take(np.arange(1000, 1200))[0], test.take(np.arange(200))[0])


def test_synthetic_shape_and_test_keys():
    train, test = load_dataset(spec("synthetic:n=100,shape=1x8x8,test=7"))
    assert train.input_shape == (1, 8, 8) and len(test) == 7
    assert train.take([0, 1])[0].shape == (2, 1, 8, 8)
    _, test = load_dataset(spec("synthetic:n=100,test=0.5"))
    assert len(test) == 50


def test_synthetic_is_learnable_by_nearest_mean():
    train, _ = load_dataset(spec("synthetic:n=2000"), seed=0)
    x, y = train.take(np.arange(2000))
    d = ((x[:, None, :] - train.means[None]) ** 2).sum(-1)
    assert (d.argmin(1) == y).mean() > 0.9
    assert np.bincount(y, minlength=10).min() > 120   # labels are spread over the classes


def test_synthetic_ten_million_is_lazy():
    gc.collect()
    tracemalloc.start()
    try:
        train, test = load_dataset(spec("synthetic:n=10000000,features=32"), seed=1)
        idx = np.array([0, 9_999_999, 1234567, 42])
        x1, y1 = train.take(idx)
        x2, y2 = train.take(idx[::-1])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(train) == 10_000_000 and len(test) == 2_000_000
    assert peak < 1_000_000           # an n-element int64 array alone would be 80 MB
    assert np.array_equal(x1, x2[::-1]) and np.array_equal(y1, y2[::-1])
    # no attribute of the dataset holds anything of size n
    for value in vars(train).values():
        assert getattr(value, "size", 0) < 10_000


# ---------------------------------------------------------------- parse_source

def test_parse_source_forms():
    assert parse_source("sklearn:digits") == {"scheme": "sklearn", "name": "digits"}
    assert parse_source("idx:/data/mnist") == {"scheme": "idx", "path": "/data/mnist"}
    assert parse_source("npz:a.npz") == {"scheme": "npz", "path": "a.npz"}
    assert parse_source("synthetic:n=10_000,shape=1x4x4,classes=3,noise=0.5,separation=2,seed=1,test=100") == {
        "scheme": "synthetic", "n": 10000, "shape": (1, 4, 4), "classes": 3, "noise": 0.5,
        "separation": 2.0, "seed": 1, "test": 100}


@pytest.mark.parametrize("source, message", [
    ("mnist", r"expected one of sklearn:digits, .* found no scheme"),
    ("ftp:x", r"expected one of sklearn:digits, .* found the unknown scheme 'ftp'"),
    ("sklearn:iris", r"expected sklearn:digits .* found 'iris'"),
    ("idx:", r"expected idx:PATH, found an empty path"),
    ("npz:  ", r"expected npz:PATH, found an empty path"),
    ("synthetic:", r"expected synthetic:n=N\[,key=value...\], found no keys"),
    ("synthetic:features=3", r"expected the key n \(number of training examples\), found none"),
    ("synthetic:n=0", r"expected n to be an integer >= 1, found '0'"),
    ("synthetic:n=ten", r"expected n to be an integer >= 1, found 'ten'"),
    ("synthetic:n=10,colour=red", r"expected a key among n, test, .*found 'colour'"),
    ("synthetic:n=10,classes", r"expected key=value items separated by commas, found 'classes'"),
    ("synthetic:n=10,n=11", r"expected each key once, found 'n' twice"),
    ("synthetic:n=10,features=4,shape=2x2", r"expected either features or shape, found both"),
    ("synthetic:n=10,shape=2xx2", r"expected shape to be sizes joined by x, such as 1x8x8, found '2xx2'"),
    ("synthetic:n=10,test=1.5", r"expected test to be an integer >= 1 or a fraction in \(0, 1\), found '1.5'"),
    ("synthetic:n=10,noise=-1", r"expected noise to be a number >= 0, found '-1'"),
    ("synthetic:n=10,classes=1", r"expected classes to be an integer >= 2, found '1'"),
])
def test_parse_source_errors(source, message):
    with pytest.raises(DataError, match=rf"data.source '{source.split(':')[0]}.*{message}"):
        parse_source(source)
