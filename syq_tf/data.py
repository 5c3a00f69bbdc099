"""Offline datasets; nothing is ever downloaded.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (IDX files), parsed here and served
through tf.data (and as a tensorflow-datasets builder: :mod:`syq_tf.datasets`). Text corpora for character-level language models are read from files installed on
the machine (by default the Linux kernel headers of ``linux-libc-dev``)."""

import dataclasses
import glob
import gzip
import os

import numpy as np
import tensorflow as tf

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FILES = FASHION_MNIST_FILES


def read_idx(path):
    """Parse an IDX file (optionally gzipped): magic 0x0000 <type> <ndim>, big-endian dims, data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(dtypes[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX payload is {len(raw) - header} bytes, header says {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def fashion_mnist_dir(directory=None):
    candidates = [directory] if directory else [os.environ.get("SYQ_TF_FASHION_MNIST_DIR"), *FASHION_MNIST_DIRS]
    for d in candidates:
        if d and all(os.path.exists(os.path.join(d, f)) for pair in _FILES.values() for f in pair):
            return d
    raise FileNotFoundError(
        "Fashion-MNIST not found in " + ", ".join(c for c in candidates if c) + ". Install the Debian "
        "package: `apt-get install dataset-fashion-mnist` (or set SYQ_TF_FASHION_MNIST_DIR to a folder "
        "with the four IDX .gz files)."
    )


def load_fashion_mnist(split="train", directory=None):
    """(images float32 [N, 28, 28, 1] in [0, 1], labels int64 [N]) of the given split."""
    if split not in _FILES:
        raise ValueError(f"load_fashion_mnist: split={split!r}; allowed: {tuple(_FILES)}")
    d = fashion_mnist_dir(directory)
    images_file, labels_file = _FILES[split]
    images = read_idx(os.path.join(d, images_file))
    labels = read_idx(os.path.join(d, labels_file))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{d}: {images.shape[0]} images but {labels.shape[0]} labels in split {split}")
    return (images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int64)


def fashion_mnist_dataset(split="train", batch_size=128, limit=None, shuffle_seed=None, directory=None):
    """A batched tf.data pipeline over the local Fashion-MNIST files."""
    x, y = load_fashion_mnist(split, directory)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


# ------------------------------------------------------------------------------------------------
# Text corpora for character-level language models (the loss-aware papers' LSTM experiments).

LINUX_HEADERS = "/usr/include/linux"


@dataclasses.dataclass
class TextCorpus:
    """A byte-level corpus: ``alphabet`` lists the byte values present (id -> byte); ``train`` /
    ``valid`` / ``test`` are int32 id arrays, contiguous slices of the concatenated files."""

    alphabet: bytes
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    files: int
    root: str

    @property
    def size(self):
        return len(self.train) + len(self.valid) + len(self.test)

    def decode(self, ids):
        return bytes(self.alphabet[int(i)] for i in ids).decode("utf-8", errors="replace")

    def describe(self):
        return {"root": self.root, "files": self.files, "characters": self.size,
                "alphabet": len(self.alphabet), "train": len(self.train), "valid": len(self.valid),
                "test": len(self.test)}


def load_text_corpus(root=LINUX_HEADERS, pattern="*.h", split=(0.9, 0.05, 0.05)):
    """Concatenate every file matching ``pattern`` under ``root`` (recursively, sorted by path) and
    split the bytes contiguously into train / validation / test by the ``split`` fractions.

    The default is the Linux kernel's user-space API headers installed by ``linux-libc-dev``: real
    kernel C, a small stand-in for the Linux-kernel corpus of the loss-aware LSTM experiments.
    """
    if len(split) != 3 or any(f <= 0 for f in split) or abs(sum(split) - 1.0) > 1e-9:
        raise ValueError(f"load_text_corpus: split={split!r} must be three positive fractions summing to 1.")
    paths = sorted(glob.glob(os.path.join(root, "**", pattern), recursive=True)) if os.path.isdir(root) else []
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        hint = " (Debian/Ubuntu: `apt-get install linux-libc-dev`)" if root == LINUX_HEADERS else ""
        raise FileNotFoundError(f"load_text_corpus: no files matching {pattern!r} under {root!r}{hint}.")
    chunks = []
    for path in paths:
        with open(path, "rb") as f:
            chunks.append(f.read())
    data = np.frombuffer(b"".join(chunks), np.uint8)
    if data.size < 1000:
        raise ValueError(f"load_text_corpus: {root!r} holds only {data.size} bytes; too small to split.")
    present = np.unique(data)
    lookup = np.zeros(256, np.int32)
    lookup[present] = np.arange(present.size, dtype=np.int32)
    ids = lookup[data]
    a = int(round(split[0] * ids.size))
    b = a + int(round(split[1] * ids.size))
    return TextCorpus(bytes(present.tolist()), ids[:a], ids[a:b], ids[b:], len(paths), root)


# ------------------------------------------------------------------------------------------------
# A small synthetic image-classification task (tests, ``syq-tf train --dataset synthetic``).


def synthetic_images(n, seed=0, shape=(28, 28, 1), classes=10, noise=0.1):
    """``n`` deterministic synthetic images (float32 ``[n, *shape]`` in [0, 1]) and labels (int64).

    The rule, fixed for a given ``shape`` and ``classes`` (``seed`` only draws the examples):
    every class has its own pattern of two Gaussian blobs (centres, widths and per-channel
    brightness drawn once from a fixed generator); an image of class k is its pattern jittered by
    up to 1.5 pixels in each direction, scaled by a random contrast in [0.7, 1], plus Gaussian
    noise of standard deviation ``noise``, clipped to [0, 1]. A small CNN learns it in an epoch or
    two; the same ``(n, seed, shape, classes)`` always gives the same arrays."""
    n = int(n)
    if n < 1:
        raise ValueError(f"synthetic_images: n={n!r} must be >= 1")
    if len(shape) != 3 or any(int(d) < 1 for d in shape):
        raise ValueError(f"synthetic_images: shape={shape!r} must be (height, width, channels)")
    if int(classes) < 2:
        raise ValueError(f"synthetic_images: classes={classes!r} must be >= 2")
    h, w, c = (int(d) for d in shape)
    classes = int(classes)
    rule = np.random.default_rng([20240611, h, w, c, classes])  # the rule: independent of seed
    blobs = 2
    centres = rule.uniform(0.2, 0.8, (classes, blobs, 2)) * np.array([h - 1, w - 1])
    widths = rule.uniform(0.08, 0.16, (classes, blobs)) * min(h, w) + 0.5
    brightness = rule.uniform(0.5, 1.0, (classes, blobs, c))

    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    jitter = rng.uniform(-1.5, 1.5, (n, 2))
    contrast = rng.uniform(0.7, 1.0, n)
    rows = np.arange(h, dtype=np.float64)[None, :, None]
    cols = np.arange(w, dtype=np.float64)[None, None, :]
    x = np.zeros((n, h, w, c), np.float64)
    for b in range(blobs):
        cy = (centres[y, b, 0] + jitter[:, 0])[:, None, None]
        cx = (centres[y, b, 1] + jitter[:, 1])[:, None, None]
        s = widths[y, b][:, None, None]
        blob = np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * s * s))
        x += blob[..., None] * brightness[y, b][:, None, None, :]
    x *= contrast[:, None, None, None]
    x += rng.normal(0.0, noise, x.shape)
    return np.clip(x, 0.0, 1.0).astype(np.float32), y.astype(np.int64)
