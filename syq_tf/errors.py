"""The exceptions syq_tf raises for bad files and refused models (all ``ValueError`` subclasses, so
code written against the documented ``ValueError`` keeps working).

A well-formed file that uses an op the packed-kernel runner does not implement is a different
refusal: ``syq_tf.kernels.runner.UnsupportedOp`` (a ``NotImplementedError``)."""


class MalformedModelError(ValueError):
    """A model file (.tflite flatbuffer, TFLM C array, ...) is malformed or inconsistent: an index out
    of range, data of the wrong size, a non-finite or non-positive scale, a shape the kernels cannot
    take. The message names the op and tensor where it can."""


class UnsafeModelError(ValueError):
    """Loading a model file would run code (a Lambda layer, Python bytecode, a class outside Keras,
    syq_tf, larq and tfmot); refused before anything executes. The message names the layer and the
    opt-in for trusted files."""
