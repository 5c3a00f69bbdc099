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


def test_text_corpus_is_split_contiguously_in_file_order(tmp_path):
    from syq_tf.data import load_text_corpus

    (tmp_path / "sub").mkdir()
    (tmp_path / "b.h").write_bytes(b"int b;\n" * 200)
    (tmp_path / "sub" / "a.h").write_bytes(b"#define A 1\n" * 100)
    (tmp_path / "skip.txt").write_bytes(b"not a header")
    corpus = load_text_corpus(str(tmp_path), "*.h", split=(0.8, 0.1, 0.1))
    text = b"int b;\n" * 200 + b"#define A 1\n" * 100  # sorted paths: b.h < sub/a.h
    assert corpus.files == 2 and corpus.size == len(text)
    assert corpus.alphabet == bytes(sorted(set(text)))
    joined = np.concatenate([corpus.train, corpus.valid, corpus.test])
    assert corpus.decode(joined) == text.decode()
    assert len(corpus.train) == round(0.8 * len(text)) and len(corpus.valid) == round(0.1 * len(text))
    assert corpus.train.dtype == np.int32 and joined.max() == len(corpus.alphabet) - 1


def test_text_corpus_errors_name_the_problem(tmp_path):
    from syq_tf.data import load_text_corpus

    with pytest.raises(FileNotFoundError, match="no files matching '\\*.h' under"):
        load_text_corpus(str(tmp_path))
    (tmp_path / "x.h").write_bytes(b"abc")
    with pytest.raises(ValueError, match="only 3 bytes"):
        load_text_corpus(str(tmp_path))
    with pytest.raises(ValueError, match="three positive fractions"):
        load_text_corpus(str(tmp_path), split=(0.5, 0.5))


def test_synthetic_images_are_deterministic_and_learnable():
    x, y = data.synthetic_images(600, seed=0)
    assert x.shape == (600, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05
    assert set(np.unique(y)) == set(range(10))
    x2, y2 = data.synthetic_images(600, seed=0)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    xs, ys = data.synthetic_images(400, seed=1)
    assert not np.array_equal(xs[:10], x[:10])
    # the rule does not depend on the seed: class means of seed 0 classify seed 1 (nearest mean)
    means = np.stack([x[y == k].mean(axis=0) for k in range(10)])
    distances = ((xs[:, None] - means[None]) ** 2).reshape(len(xs), 10, -1).sum(axis=-1)
    assert np.mean(distances.argmin(axis=1) == ys) > 0.9
    # while an unrelated labelling of the same images is not learnable this way (chance ~0.1)
    assert np.mean(distances.argmin(axis=1) == np.roll(ys, 1)) < 0.3


def test_synthetic_images_other_shapes_and_errors():
    x, y = data.synthetic_images(30, seed=3, shape=(6, 5, 2), classes=3)
    assert x.shape == (30, 6, 5, 2) and y.min() >= 0 and y.max() <= 2
    with pytest.raises(ValueError, match="n=0 must be >= 1"):
        data.synthetic_images(0)
    with pytest.raises(ValueError, match="must be \\(height, width, channels\\)"):
        data.synthetic_images(4, shape=(28, 28))
    with pytest.raises(ValueError, match="classes=1 must be >= 2"):
        data.synthetic_images(4, classes=1)
