"""tensorflow-datasets, offline: the Debian Fashion-MNIST files as a local tfds builder, any prepared
tfds dataset through --dataset / --data_dir, and one-line errors (never a download) otherwise."""

import json
import os

import numpy as np
import pytest

from syq_tf import cli, datasets
from syq_tf.data import FASHION_MNIST_FILES, load_fashion_mnist


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """A tiny Fashion-MNIST in the Debian package's format: 96 training and 32 test images."""
    d = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("test", 32)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (labels[:, None, None] * 25 + rng.integers(0, 20, (n, 28, 28))).astype(np.uint8)
        images_file, labels_file = FASHION_MNIST_FILES[split]
        datasets.write_idx(str(d / images_file), images)
        datasets.write_idx(str(d / labels_file), labels)
    return str(d)


@pytest.fixture(scope="module")
def prepared(idx_dir, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    old = os.environ.get("SYQ_TF_FASHION_MNIST_DIR")
    os.environ["SYQ_TF_FASHION_MNIST_DIR"] = idx_dir
    try:
        datasets.fashion_mnist_builder(data_dir)
    finally:
        if old is None:
            os.environ.pop("SYQ_TF_FASHION_MNIST_DIR")
        else:
            os.environ["SYQ_TF_FASHION_MNIST_DIR"] = old
    return idx_dir, data_dir


def test_local_builder_serves_the_debian_files_in_their_order(prepared):
    idx_dir, data_dir = prepared
    builder = datasets.fashion_mnist_builder(data_dir)  # prepared: read back, not regenerated
    assert builder.info.features["label"].names[9] == "Ankle boot"
    assert builder.info.splits["train"].num_examples == 96 and builder.info.splits["test"].num_examples == 32
    for split in ("train", "test"):
        x_ref, y_ref = load_fashion_mnist(split, idx_dir)
        x, y, classes = datasets.load("fashion_mnist_debian", split, data_dir)
        assert classes == 10 and x.dtype == np.float32 and x.shape == x_ref.shape
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)
    x, y, _ = datasets.load("fashion_mnist_debian", "test", data_dir, limit=5)
    assert len(x) == 5 and np.array_equal(y, load_fashion_mnist("test", idx_dir)[1][:5])


def test_unknown_and_unprepared_names_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="--dataset no_such_set: not a tensorflow-datasets name"):
        datasets.load("no_such_set", "train", str(tmp_path))
    with pytest.raises(ValueError, match=r"--dataset mnist: not prepared in .*never downloads at run time.*"
                                         r"tfds build mnist --data_dir DIR"):
        datasets.load("mnist", "train", str(tmp_path))
    assert not any(tmp_path.rglob("*.tfrecord*"))  # nothing was fetched


def test_cli_trains_on_a_prepared_tfds_dataset(prepared, tmp_path, capsys):
    _, data_dir = prepared
    out = tmp_path / "run"
    code = cli.main(["train", "--dataset", "fashion_mnist_debian", "--data_dir", data_dir, "--widths", "4,4,8,8,16",
                     "--float_epochs", "1", "--epochs", "1", "--batch_size", "32", "--method", "syq", "--bits", "2",
                     "--out", str(out), "--verbose", "0"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["dataset"] == "fashion_mnist_debian"
    code = cli.main(["train", "--dataset", "mnist", "--data_dir", str(tmp_path / "empty"), "--out",
                     str(tmp_path / "run2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "--dataset mnist: not prepared" in err[0], err
