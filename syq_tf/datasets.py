"""Image classification data through tensorflow-datasets, offline.

* Any tensorflow-datasets name the user has prepared locally (``tfds build NAME --data_dir DIR`` on
  a machine with network, or a copy of that folder): :func:`load` reads it from ``data_dir``. A
  dataset that is not there is a one-line error; nothing is ever downloaded.
* The bundled Fashion-MNIST (the Debian package ``dataset-fashion-mnist``) as a local
  tensorflow-datasets builder, :class:`FashionMnistDebian` (name ``fashion_mnist_debian``): its
  ``download_and_prepare`` reads the package's IDX files, so code reads like the tfds tutorials:

      builder = syq_tf.datasets.fashion_mnist_builder(data_dir)
      train = builder.as_dataset(split="train", as_supervised=True)

Importing this module imports tensorflow_datasets (a few seconds); syq_tf imports it only when a
tfds dataset is asked for.
"""

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

from syq_tf.data import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, fashion_mnist_dir, read_idx

LOCAL_BUILDERS = ("fashion_mnist_debian",)


class FashionMnistDebian(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (60,000 training and 10,000 test 28x28 grey images, 10 classes) from the IDX
    files of the Debian package ``dataset-fashion-mnist`` (or ``SYQ_TF_FASHION_MNIST_DIR``);
    preparing it reads those files, nothing is downloaded."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From the Debian package's IDX files."}

    def _info(self):
        return self.dataset_info_from_configs(
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # the files' order, as syq_tf.data.load_fashion_mnist reads them
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        directory = fashion_mnist_dir()
        return {split: self._generate_examples(directory, split) for split in FASHION_MNIST_FILES}

    def _generate_examples(self, directory, split):
        images_file, labels_file = FASHION_MNIST_FILES[split]
        images = read_idx(os.path.join(directory, images_file))
        labels = read_idx(os.path.join(directory, labels_file))
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image[..., None], "label": int(label)}


def fashion_mnist_builder(data_dir=None):
    """The prepared :class:`FashionMnistDebian` builder (prepared from the local files on first use)."""
    builder = FashionMnistDebian(data_dir=data_dir)
    if not builder.is_prepared():
        tfds.disable_progress_bar()
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def builder(name, data_dir=None):
    """A prepared tensorflow-datasets builder; ValueError (one line) for unknown or unprepared names."""
    if name in LOCAL_BUILDERS:
        return fashion_mnist_builder(data_dir)
    try:
        found = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"--dataset {name}: not a tensorflow-datasets name (see `tfds.list_builders()`; "
                         "local: fashion_mnist, fashion_mnist_debian, synthetic)") from None
    if not found.is_prepared():
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        raise ValueError(f"--dataset {name}: not prepared in {where}; syq_tf never downloads at run time: "
                         f"prepare it where there is network (`tfds build {name} --data_dir DIR`), copy DIR "
                         "here and pass --data_dir DIR")
    return found


def image_spec(found, name):
    """``(image shape, classes)`` of a prepared builder's (image, label) examples; ValueError unless
    they are fixed-size [H, W, C] images with a class label."""
    keys = found.info.supervised_keys
    label = found.info.features[keys[1]] if keys else None
    shape = tuple(found.info.features[keys[0]].shape or ()) if keys else ()
    if len(shape) != 3 or None in shape or not hasattr(label, "num_classes"):
        raise ValueError(f"--dataset {name}: not an image classification dataset of fixed-size images "
                         f"(supervised keys {keys}, image shape {shape}); syq-tf trains on (image [H, W, C], "
                         "class label) examples")
    return tuple(int(d) for d in shape), int(label.num_classes)


def load(name, split, data_dir=None, limit=None):
    """``(x float32 [N, H, W, C] in [0, 1], y int64 [N], classes)`` of an image-classification
    dataset (supervised keys image, label) from tensorflow-datasets, read from ``data_dir``."""
    found = builder(name, data_dir)
    if split not in found.info.splits:
        raise ValueError(f"--dataset {name}: no split {split!r}; it has {sorted(found.info.splits)}")
    _, classes = image_spec(found, name)
    ds = found.as_dataset(split=split if limit is None else f"{split}[:{int(limit)}]", as_supervised=True)
    images, labels = [], []
    for image, y in ds.batch(1024).as_numpy_iterator():
        images.append(image)
        labels.append(y)
    x = np.concatenate(images).astype(np.float32) / 255.0
    return x, np.concatenate(labels).astype(np.int64), classes


def write_idx(path, array):
    """Write ``array`` (uint8) as a gzipped IDX file (the format of MNIST / Fashion-MNIST)."""
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())
