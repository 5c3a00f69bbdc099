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
    python_requires=">=3.11,<3.12",
    install_requires=[
        "tensorflow==2.21.*",
        "tf-keras==2.21.*",
        "tensorflow-model-optimization==0.8.*",
        "larq==0.14.*",
        "larq-compute-engine==0.16.*",
        "ai-edge-litert==2.3.*",
        "tensorflow-datasets",
        "importlib-resources",  # tensorflow-datasets' builders import it (etils) without requiring it
        "absl-py",
        "tensorboard",  # tf.summary's writer (syq_tf.callbacks.QuantizerLogger)
        "matplotlib",  # syq_tf.plots (codebook histograms, training curves, benchmark plot)
        "numpy<2",
    ],
    # tflite-micro: TFLite Micro's Python runtime (benchmarks/kernels.py compares with its int8
    # reference kernels); the exact nightly is pinned in constraints.txt.
    # bench: QKeras, the optional peer of benchmarks/accuracy.py. Its own requirements pull in
    # keras-tuner and scikit-learn, which only its AutoQKeras part uses, so the README installs it
    # with --no-deps plus the one it imports (networkx); pyparsing comes with matplotlib.
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "tflite-micro"]},
    entry_points={"console_scripts": ["syq-tf=syq_tf.cli:run"]},
    ext_modules=[SYQ_KERNELS],
)
