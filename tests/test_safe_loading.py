"""Loading a model never runs code stored in it unless asked: a Lambda layer (its function creates a
file here), a module outside Keras / syq_tf / larq / tfmot, a foreign registered class are refused
by syq_tf.load_model and by `syq-tf inspect` / `export` before anything is deserialized (the file is
never created), naming the layer and the opt-in; `--unsafe` / safe_mode=False load it. The .keras
format round-trips syq_tf's quantized layers without a scope."""

import json
import os
import zipfile

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import run_python
from syq_tf import cli
from syq_tf.errors import UnsafeModelError

OPT_IN = "If you trust this file: --unsafe on the syq-tf command line, safe_mode=False in syq_tf.saving.load_model"


def _lambda_model(marker):
    inp = tf.keras.Input((4,))
    x = tf.keras.layers.Dense(2, name="dense")(inp)
    out = tf.keras.layers.Lambda(lambda t, path=str(marker): (open(path, "w").close(), t)[1], name="evil")(x)
    return tf.keras.Model(inp, out, name="hostile")


@pytest.fixture(scope="module", params=["h5", "keras", "savedmodel"])
def hostile(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"hostile_{request.param}")
    marker = folder / "code_ran"
    model = _lambda_model(marker)
    path = folder / {"h5": "lam.h5", "keras": "lam.keras", "savedmodel": "lam_savedmodel"}[request.param]
    if request.param == "savedmodel":
        model.save(str(path), save_format="tf")
    else:
        syq_tf.save_model(model, path)
    os.remove(marker)  # building the model ran the lambda once, here
    return path, marker


def test_api_refuses_a_lambda_before_running_it(hostile):
    path, marker = hostile
    with pytest.raises(UnsafeModelError) as err:
        syq_tf.load_model(path)
    assert str(err.value) == (
        f"{path}: refused to load (safe mode): layer 'evil' (Lambda) is a Lambda layer: its function is Python "
        f"code stored in the file; loading it would run code. Nothing was deserialized. {OPT_IN}")
    assert isinstance(err.value, ValueError) and not marker.exists()


def test_cli_inspect_and_export_refuse_it_and_unsafe_loads_it(hostile, capsys):
    path, marker = hostile
    for argv in (["inspect", "--model", str(path)], ["export", "--model", str(path), "--dataset", "synthetic"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"syq-tf {argv[0]}: error: {path}: refused to load (safe mode): "
                                                   "layer 'evil' (Lambda)"), err
        assert err[0].endswith("If you trust this file: pass --unsafe")
        assert not marker.exists()
    assert cli.main(["inspect", "--model", str(path), "--unsafe"]) == 0
    assert "Keras model 'hostile'" in capsys.readouterr().out
    assert marker.exists()  # the opt-in really loads (and runs) it
    os.remove(marker)


def _rewrite_keras(source, target, edit):
    with zipfile.ZipFile(source) as z:
        parts = {name: z.read(name) for name in z.namelist()}
    config = json.loads(parts["config.json"])
    edit(config["config"]["layers"][1])
    parts["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(target, "w") as z:
        for name, data in parts.items():
            z.writestr(name, data)


@pytest.mark.parametrize("edit, reason", [
    (lambda layer: layer.update(module="os"), "names the Python module 'os', outside keras, tf_keras, tensorflow, "
     "syq_tf, larq, tensorflow_model_optimization"),
    (lambda layer: layer.update(registered_name="evil_pkg>Dense"), "is a class of the package 'evil_pkg' "
     "(registered_name 'evil_pkg>Dense'), outside keras"),
    (lambda layer: layer["config"].update(activation={"class_name": "__lambda__", "config": {"value": "x"}}),
     "holds a serialized Python lambda"),
])
def test_foreign_modules_classes_and_lambdas_anywhere_are_refused(tmp_path, edit, reason):
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2, name="fc")])
    good = syq_tf.save_model(model, tmp_path / "good.keras")
    assert syq_tf.load_model(good).get_layer("fc").units == 2
    bad = tmp_path / "bad.keras"
    _rewrite_keras(good, bad, edit)
    with pytest.raises(UnsafeModelError, match=r"^" + str(bad) + r": refused to load \(safe mode\): layer 'fc' "
                       r"\(Dense\) " + reason.replace("(", r"\(").replace(")", r"\)")):
        syq_tf.load_model(bad)


def test_named_pipes_and_unknown_files_are_refused_without_reading(tmp_path, capsys):
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)  # opening it for reading would block forever
    assert cli.main(["inspect", "--model", str(fifo)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"syq-tf inspect: error: {fifo}: not a regular file (a named pipe, device or socket); inspect reads a "
        "model file or a SavedModel directory")
    with pytest.raises(ValueError, match="a named pipe, not a regular file"):
        syq_tf.load_model(fifo)
    assert cli.main(["export", "--model", str(fifo), "--dataset", "synthetic"]) == 1
    assert "a named pipe, not a regular file" in capsys.readouterr().err
    text = tmp_path / "notes.keras"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a Keras model file"):
        syq_tf.load_model(text)


def test_keras_format_round_trips_quantized_layers_without_a_scope(tmp_path):
    from test_saving import make_model  # noqa: PLC0415

    model, x = make_model()
    path = syq_tf.save_model(model, tmp_path / "model.keras")
    assert os.listdir(tmp_path) == ["model.keras"]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    code = f"""
import syq_tf, numpy as np
m = syq_tf.load_model({str(path)!r})
np.testing.assert_array_equal(m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0), np.load({str(tmp_path / 'y.npy')!r}))
print(type(m.get_layer("conv").kernel_quantizer).__name__, m.get_layer("conv").kernel_quantizer.eta)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["SYQ", "0.1"]
    with pytest.raises(ValueError, match=r"must end with one of \('.keras', '.h5'\)"):
        syq_tf.save_model(model, tmp_path / "model.tf")


def test_safe_mode_accepts_tfmot_models_in_h5(tmp_path):
    import syq_tf.tfmot as st  # noqa: PLC0415
    from test_tfmot import resnet_like  # noqa: PLC0415

    model = st.quantize_model(resnet_like(), "syq-w2a8")
    path = syq_tf.save_model(model, tmp_path / "tfmot.h5")
    assert syq_tf.saving.check_model_file(path) == "h5"
    with st.quantize_scope():
        loaded = syq_tf.load_model(path)
    x = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), model(x))


def test_tf_functions_touching_files_or_python_are_refused(tmp_path):
    inp = tf.keras.Input((3,))
    out = tf.reshape(tf.math.add(tf.keras.layers.Dense(2, name="fc")(inp), 1.0), (-1, 2))
    good = syq_tf.save_model(tf.keras.Model(inp, out), tmp_path / "ops.keras")
    assert syq_tf.load_model(good).layers[2].name == "tf.math.add"  # plain tf functions load

    def to_write_file(layer):
        layer["config"]["function"] = "io.write_file"

    bad = tmp_path / "io.keras"
    with zipfile.ZipFile(good) as z:
        parts = {name: z.read(name) for name in z.namelist()}
    config = json.loads(parts["config.json"])
    to_write_file(next(layer for layer in config["config"]["layers"] if layer["class_name"] == "TFOpLambda"))
    with zipfile.ZipFile(bad, "w") as z:
        for name, data in {**parts, "config.json": json.dumps(config).encode()}.items():
            z.writestr(name, data)
    with pytest.raises(UnsafeModelError, match=r"layer 'tf.math.add' \(TFOpLambda\) calls tf.io.write_file, which "
                                               r"can read or write files or run Python"):
        syq_tf.load_model(bad)
