"""Whole-model quantization for Keras 3 (placeholder until written below)."""


def quantize_model(model, scheme="syq-w2a8", **kwargs):
    raise NotImplementedError
