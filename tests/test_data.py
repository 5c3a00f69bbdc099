import gzip
import struct

import numpy as np
import pytest

from syq_tf import data


def _write_idx(path, array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(">u1" if type_code == 0x08 else ">i4").tobytes())


def test_read_idx_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(str(tmp_path / "x.gz"), images)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "x.gz")), images)
    ints = np.array([1, -2, 70000], dtype=np.int64)
    _write_idx(str(tmp_path / "i.gz"), ints, 0x0C)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "i.gz")), ints)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="bad magic number"):
        data.read_idx(str(bad))
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match="IDX payload is 2 bytes, header says 5"):
        data.read_idx(str(bad))
    bad.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="truncated IDX header"):
        data.read_idx(str(bad))


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist_dir(str(tmp_path))


def test_fashion_mnist_from_debian_package():
    # installed by scripts/setup.sh, so the real data is there for every test run
    x, y = data.load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32 and y.shape == (10000,)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(np.bincount(y), np.full(10, 1000))
    batch_x, batch_y = next(iter(data.fashion_mnist_dataset("train", batch_size=32, limit=64)))
    assert batch_x.shape == (32, 28, 28, 1) and batch_y.shape == (32,)
    with pytest.raises(ValueError, match="split='val'"):
        data.load_fashion_mnist("val")
