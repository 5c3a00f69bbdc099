from setuptools import Extension, find_packages, setup

# Packed binary/ternary kernels (tflite/, C99): a plain shared library loaded with ctypes by
# syq_tf.kernels; compiled by `pip install -e .` with the system C compiler.
SYQ_KERNELS = Extension(
    "syq_tf.kernels._libsyq",
    sources=["tflite/src/syq_common.c", "tflite/src/syq_opt.c", "tflite/src/syq_neon.c", "tflite/src/syq_cm.c"],
    include_dirs=["tflite/include"],
    depends=["tflite/include/syq_kernels.h", "tflite/src/syq_internal.h"],
    extra_compile_args=["-std=c99", "-O3"],
)

setup(
    name="syq_tf",
    version="0.1.0",
    description="Low-precision (binary/ternary/2-8 bit) quantization for Keras 2, larq and TFLite",
    packages=find_packages(include=["syq_tf", "syq_tf.*"]),
    python_requires=">=3.11,<3.14",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
    # Python 3.13: numpy 2 (numpy 1.26 has no cp313 wheels, and TF's ml_dtypes / dm-tree require
    # numpy>=2.1 there). larq 0.14.0 declares numpy<2 without using anything numpy 2 removed, so on
    # 3.13 scripts/setup.sh installs it with --no-deps (the test suite runs it with numpy 2).
    # larq-compute-engine 0.16.0 publishes no cp313 wheel: on 3.13 it is the optional extra "lce"
    # and to_tflite(target="lce") says why it is unavailable.
    install_requires=[
        "tensorflow==2.21.*",
        "tf-keras==2.21.*",
        "tensorflow-model-optimization==0.8.*",
        'larq==0.14.*; python_version < "3.13"',
        'larq-compute-engine==0.16.*; python_version < "3.13"',
        "ai-edge-litert==2.3.*",
        "tensorflow-datasets",
        "importlib-resources",  # tensorflow-datasets' builders import it (etils) without requiring it
        "absl-py",
        "tensorboard",  # tf.summary's writer (syq_tf.callbacks.QuantizerLogger)
        "matplotlib",  # syq_tf.plots (codebook histograms, training curves, benchmark plot)
        'numpy<2; python_version < "3.13"',
        'numpy>=2.1; python_version >= "3.13"',
    ],
    # tflite-micro: TFLite Micro's Python runtime (benchmarks/kernels.py compares with its int8
    # reference kernels); the exact nightly is pinned in constraints.txt.
    # bench: QKeras, the optional peer of benchmarks/accuracy.py. Its own requirements pull in
    # keras-tuner and scikit-learn, which only its AutoQKeras part uses, so the README installs it
    # with --no-deps plus the one it imports (networkx); pyparsing comes with matplotlib.
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "tflite-micro"],
                    "lce": ["larq-compute-engine==0.16.*"]},
    entry_points={"console_scripts": ["syq-tf=syq_tf.cli:run"]},
    ext_modules=[SYQ_KERNELS],
)
