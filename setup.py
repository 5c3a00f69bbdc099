from setuptools import find_packages, setup

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
        "absl-py",
        "numpy<2",
    ],
    extras_require={"test": ["pytest"]},
)
