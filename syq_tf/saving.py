"""Saving and loading Keras models safely: never run code stored in a file, never leave a partial one.

:func:`load_model` reads the model's configuration *before* Keras deserializes anything and
refuses (:class:`syq_tf.errors.UnsafeModelError`) a file that would run code when loaded:

- a ``Lambda`` layer, or any object carrying Python code: a serialized lambda (``__lambda__``,
  ``function_type`` / ``output_shape_type`` ``"lambda"``, marshalled bytecode);
- an object whose ``module`` or package-qualified ``registered_name`` lies outside Keras
  (``keras``, ``tf_keras``, ``tensorflow``), syq_tf, larq and tfmot (``tensorflow_model_optimization``):
  Keras imports such modules by name;
- a ``TFOpLambda`` / ``SlicingOpLambda`` layer (a TensorFlow function called in a functional
  model, stored by name) naming a function that touches files, runs Python or reaches raw ops:
  ``tf.io.*``, ``tf.raw_ops.*``, ``tf.py_function``, ``tf.numpy_function``, ``tf.print``,
  ``tf.summary.*``, ``tf.compat.*``, ... (:data:`UNSAFE_TF_FUNCTIONS`; ``tf.math.add`` and the
  like are fine);
- in a SavedModel directory, graph ops that call back into Python or write files (``PyFunc``,
  ``EagerPyFunc``, ``WriteFile``).

Formats: ``.keras`` (the Keras v3 zip: its ``config.json`` is checked, then Keras loads it with its
own safe mode on), ``.h5`` (the legacy HDF5 file: its ``model_config`` and ``training_config``
attributes are checked with h5py) and SavedModel directories (``keras_metadata.pb`` and the graph).
``safe_mode=False`` (``--unsafe`` on the command line) skips the checks, for files you trust.

:func:`save_model` writes ``.keras`` (default) or ``.h5`` atomically through a temporary file in the
same folder (:mod:`syq_tf.files`): the previous file at that path survives any interruption.
syq_tf's quantizers, layers and optimizers are registered when ``syq_tf`` is imported, so no
``custom_objects`` scope is needed for either format.
"""

import json
import os
import stat
import warnings
import zipfile

from syq_tf import files
from syq_tf.errors import UnsafeModelError

ALLOWED_PACKAGES = ("keras", "tf_keras", "tensorflow", "syq_tf", "larq", "tensorflow_model_optimization")
FORMATS = (".keras", ".h5")
UNSAFE_OPS = ("PyFunc", "PyFuncStateless", "EagerPyFunc", "WriteFile")
# first component of a TFOpLambda's tf function name: file I/O, Python callbacks, raw ops, state
UNSAFE_TF_FUNCTIONS = ("io", "raw_ops", "py_function", "numpy_function", "print", "summary", "compat", "saved_model",
                       "train", "data", "lite", "load_library", "load_op_library", "experimental", "distribute",
                       "config", "autograph", "sysconfig", "function", "Module", "Variable", "keras", "estimator")
_TF_OP_LAYERS = ("TFOpLambda", "SlicingOpLambda")
OPT_IN = "--unsafe on the syq-tf command line, safe_mode=False in syq_tf.saving.load_model"
MAX_CONFIG_BYTES = 64 << 20  # a model's JSON configuration larger than this is refused (a zip bomb)
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
_CODE_KEYS = ("function_type", "output_shape_type")  # Keras' Lambda: "lambda" = marshalled bytecode
_LAYER_KEYS = ("layers", "layer", "forward_layer", "backward_layer", "cell", "cells")


def _allowed_package(name):
    return str(name).split(".")[0] in ALLOWED_PACKAGES


def _custom_builtin(name):
    """Keras writes its own optimizers as 'Custom>Adam' in h5 training configs: allowed when the
    name is one of tf.keras's optimizers."""
    import tensorflow as tf  # noqa: PLC0415

    return isinstance(getattr(tf.keras.optimizers, name, None), type)


def unsafe_reason(config):
    """``None`` if the JSON configuration ``config`` (a Keras model / layer config, parsed) can be
    deserialized without running code stored in it, else ``(layer path, class name, reason)``."""
    found = []

    def walk(node, layer, key=None):
        if found:
            return
        if isinstance(node, list):
            for item in node:
                walk(item, layer, key)
            return
        if not isinstance(node, dict):
            return
        cls = node.get("class_name")
        inner = node.get("config")
        if isinstance(cls, str) and isinstance(inner, dict) and isinstance(inner.get("name"), str) and (
                layer is None or key in _LAYER_KEYS):
            # the model itself (top level) is not part of a layer's path: 'block/conv', not 'model/block/conv'
            top = layer is None or layer[2]
            layer = (f"{layer[0]}/{inner['name']}" if layer and not top else inner["name"], cls, layer is None)
        where = layer[:2] if layer else ("<model>", str(cls))
        if cls == "Lambda":
            found.append((*where, "is a Lambda layer: its function is Python code stored in the file"))
            return
        if cls in _TF_OP_LAYERS and isinstance(inner, dict):
            function = str(inner.get("function", ""))
            if function.split(".")[0] in UNSAFE_TF_FUNCTIONS or not function.replace(".", "").replace("_", "").isalnum():
                found.append((*where, f"calls tf.{function}, which can read or write files or run Python"))
                return
        if cls == "__lambda__":
            found.append((*where, "holds a serialized Python lambda"))
            return
        for code_key in _CODE_KEYS:
            if node.get(code_key) == "lambda":
                found.append((*where, f"holds Python bytecode ({code_key}: lambda)"))
                return
        module = node.get("module")
        if isinstance(module, str) and "class_name" in node and not _allowed_package(module):
            found.append((*where, f"names the Python module {module!r}, outside {', '.join(ALLOWED_PACKAGES)}"))
            return
        for name_key in ("registered_name", "class_name"):
            name = node.get(name_key)
            if isinstance(name, str) and ">" in name:
                package, _, short = name.partition(">")
                if not (_allowed_package(package) or (package == "Custom" and _custom_builtin(short))):
                    found.append((*where, f"is a class of the package {package!r} ({name_key} {name!r}), "
                                          f"outside {', '.join(ALLOWED_PACKAGES)}"))
                    return
        for k, value in node.items():
            walk(value, layer, k)

    walk(config, None)
    return found[0] if found else None


def _refuse(path, reason):
    layer, cls, why = reason
    raise UnsafeModelError(f"{path}: refused to load (safe mode): layer '{layer}' ({cls}) {why}; loading it "
                           f"would run code. Nothing was deserialized. If you trust this file: {OPT_IN}")


def _parse(path, text, what):
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path}: the {what} is not valid JSON ({err})") from None


def _h5_configs(path):
    import h5py  # noqa: PLC0415

    try:
        with h5py.File(path, "r") as f:
            attrs = {name: f.attrs[name] for name in ("model_config", "training_config") if name in f.attrs}
    except OSError as err:
        raise ValueError(f"{path}: cannot read it as an HDF5 file: {err}") from None
    if "model_config" not in attrs:
        raise ValueError(f"{path}: an HDF5 file without a model configuration (a weights-only file? "
                         "load_model needs a whole saved model)")
    configs = []
    for name, value in attrs.items():
        value = value.tobytes() if hasattr(value, "tobytes") and not isinstance(value, (str, bytes)) else value
        if len(value) > MAX_CONFIG_BYTES:
            raise ValueError(f"{path}: its {name} is {len(value)} bytes, over the {MAX_CONFIG_BYTES} allowed")
        configs.append(_parse(path, value, name))
    return configs


def _keras_configs(path):
    try:
        with zipfile.ZipFile(path) as z:
            try:
                info = z.getinfo("config.json")
            except KeyError:
                raise ValueError(f"{path}: a .keras file without config.json") from None
            if info.file_size > MAX_CONFIG_BYTES:
                raise ValueError(f"{path}: its config.json is {info.file_size} bytes, over the "
                                 f"{MAX_CONFIG_BYTES} allowed")
            return [_parse(path, z.read(info), "config.json")]
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path}: not a .keras file (a zip archive): {err}") from None


def _savedmodel_check(path):
    from tensorflow.core.protobuf import saved_model_pb2  # noqa: PLC0415

    metadata = os.path.join(path, "keras_metadata.pb")
    if os.path.isfile(metadata):
        from tf_keras.protobuf import saved_metadata_pb2  # noqa: PLC0415

        proto = saved_metadata_pb2.SavedMetadata()
        with open(metadata, "rb") as f:
            proto.ParseFromString(f.read())
        for node in proto.nodes:
            reason = unsafe_reason(_parse(path, node.metadata, f"metadata of {node.node_path}"))
            if reason:
                _refuse(path, reason)
    graph = os.path.join(path, "saved_model.pb")
    if os.path.isfile(graph):
        proto = saved_model_pb2.SavedModel()
        with open(graph, "rb") as f:
            proto.ParseFromString(f.read())
        for meta in proto.meta_graphs:
            nodes = [("graph", n) for n in meta.graph_def.node]
            nodes += [(fn.signature.name, n) for fn in meta.graph_def.library.function for n in fn.node_def]
            for where, node in nodes:
                if node.op in UNSAFE_OPS:
                    raise UnsafeModelError(
                        f"{path}: refused to load (safe mode): op '{node.name}' in {where} is {node.op}, which "
                        f"runs Python code or writes files. Nothing was loaded. If you trust this file: {OPT_IN}")


def check_path(path):
    """The kind of model at ``path``: 'keras', 'h5' or 'savedmodel'; a clear ``ValueError`` for
    anything else (missing, a named pipe or device, an unknown format) -- without reading a pipe."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file or directory") from None
    if stat.S_ISDIR(mode):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return "savedmodel"
        raise ValueError(f"{path}: a directory without saved_model.pb (not a SavedModel directory)")
    if not stat.S_ISREG(mode):
        kind = "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise ValueError(f"{path}: {kind}, not a regular file; a model file (.keras, .h5) or a SavedModel "
                         "directory is expected")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
        return "keras"
    if head == _HDF5_MAGIC:
        return "h5"
    raise ValueError(f"{path}: not a Keras model file (neither a .keras zip archive nor an HDF5 .h5 file)")


def check_model_file(path):
    """Raise :class:`UnsafeModelError` if loading the model at ``path`` would run code stored in
    it (module docstring); returns its kind ('keras', 'h5', 'savedmodel'). Reads, never executes."""
    kind = check_path(path)
    if kind == "savedmodel":
        _savedmodel_check(path)
        return kind
    for config in (_keras_configs(path) if kind == "keras" else _h5_configs(path)):
        reason = unsafe_reason(config)
        if reason:
            _refuse(path, reason)
    return kind


def load_model(path, safe_mode=True, compile=False, custom_objects=None):  # noqa: A002  (Keras' name)
    """Load a Keras model (``.keras``, ``.h5`` or SavedModel directory). With ``safe_mode`` (the
    default) the file's configuration is checked first and a model that would run code on load is
    refused with :class:`syq_tf.errors.UnsafeModelError` naming the layer; ``safe_mode=False`` loads
    files you trust as Keras does. ``compile``: restore the training configuration too (default
    False: inference, inspection and export need none)."""
    import tensorflow as tf  # noqa: PLC0415

    path = os.fspath(path)
    kind = check_model_file(path) if safe_mode else check_path(path)
    if kind == "keras":  # Keras' own safe mode as well (it refuses lambdas it meets while loading)
        return tf.keras.models.load_model(path, custom_objects=custom_objects, compile=compile,
                                          safe_mode=safe_mode)
    return tf.keras.models.load_model(path, custom_objects=custom_objects, compile=compile)


def save_model(model, path, include_optimizer=False):
    """Save ``model`` to ``path`` (``.keras``, the default format, or legacy ``.h5``) atomically: Keras
    writes a temporary file in the same folder, which is fsync-ed and renamed over ``path``; an
    interruption (Ctrl-C, SIGTERM, SIGKILL) leaves the previous file whole. Returns ``path``.
    ``include_optimizer`` applies to .h5 (a .keras file always holds the compile configuration)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1]
    if ext not in FORMATS:
        raise ValueError(f"save_model: {path!r} must end with one of {FORMATS} (.keras: the Keras format; "
                         ".h5: legacy HDF5)")
    with files.atomic_path(path, keep_extension=True) as tmp:
        if ext == ".h5":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")
                model.save(tmp, include_optimizer=include_optimizer)
        else:
            model.save(tmp)
    return path
