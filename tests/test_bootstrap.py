"""Import order: syq_tf selects Keras 2 itself and refuses to run on top of Keras 3."""

from conftest import run_python


def test_import_selects_keras2():
    r = run_python("import syq_tf, os, tensorflow as tf; print(os.environ['TF_USE_LEGACY_KERAS'], tf.keras.layers.Layer.__module__.split('.')[0])")
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.split() == ["1", "tf_keras"]


def test_keras3_loaded_first_is_a_clear_error():
    r = run_python("import keras\nimport syq_tf")
    assert r.returncode != 0
    assert "ImportError: syq_tf was imported after Keras 3" in r.stderr
    assert "Import syq_tf before TensorFlow or Keras" in r.stderr


def test_tensorflow_first_without_flag_is_a_clear_error():
    r = run_python("import tensorflow\nimport syq_tf")
    assert r.returncode != 0 and "TF_USE_LEGACY_KERAS=1" in r.stderr


def test_tensorflow_first_with_flag_is_fine():
    r = run_python("import tensorflow as tf\nimport syq_tf\nprint(tf.keras.layers.Layer.__module__)", {"TF_USE_LEGACY_KERAS": "1"})
    assert r.returncode == 0, r.stderr[-1500:]
    assert "tf_keras" in r.stdout


def test_flag_selecting_keras3_is_refused():
    r = run_python("import syq_tf", {"TF_USE_LEGACY_KERAS": "0"})
    assert r.returncode != 0 and "TF_USE_LEGACY_KERAS='0' selects Keras 3" in r.stderr


def test_keras3_layer_is_refused_by_quantize():
    r = run_python(
        "import os; os.environ['TF_USE_LEGACY_KERAS']='1'\n"
        "import syq_tf, keras\n"
        "syq_tf.quantize(keras.layers.Dense(2), kernel_quantizer=syq_tf.quantizers.SYQ())"
    )
    assert r.returncode != 0
    assert "Dense comes from Keras 3" in r.stderr


def test_tf_keras_already_resolved_to_keras3_is_refused():
    r = run_python(
        "import tensorflow as tf\n"
        "tf.keras.layers.Dense\n"  # resolves tf.keras to Keras 3
        "import os; os.environ['TF_USE_LEGACY_KERAS'] = '1'\n"
        "import syq_tf"
    )
    assert r.returncode != 0
    assert "tf.keras resolves to keras" in r.stderr and "not tf_keras (Keras 2)" in r.stderr


def test_keras3_frontend_selects_keras3_even_first():
    r = run_python("import syq_tf.keras3 as syq, os, tensorflow as tf, keras\n"
                   "print(os.environ.get('TF_USE_LEGACY_KERAS'), tf.keras.layers.Layer.__module__.split('.')[0], "
                   "keras.__version__.split('.')[0], type(syq.quantizers.SYQ()).__mro__[4].__module__.split('.')[0])")
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.split() == ["None", "keras", "3", "keras"]


def test_keras3_after_keras2_is_refused():
    r = run_python("import syq_tf\nimport syq_tf.keras3")
    assert r.returncode != 0
    assert "syq_tf.keras3 needs Keras 3, but this process already uses Keras 2" in r.stderr


def test_keras2_api_in_a_keras3_process_is_refused():
    r = run_python("import syq_tf.keras3\nimport syq_tf\nsyq_tf.quantize_model")
    assert r.returncode != 0
    assert "syq_tf.quantize_model is the Keras 2 API; this process uses syq_tf.keras3 (Keras 3)" in r.stderr
    r = run_python("import syq_tf.keras3\nimport syq_tf.tfmot")
    assert r.returncode != 0 and "this process uses syq_tf.keras3 (Keras 3)" in r.stderr


def test_larq_in_a_keras3_process_is_one_line():
    r = run_python("import syq_tf.keras3\nimport larq")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        "ImportError: larq supports Keras 2 only, and this process uses Keras 3 (syq_tf.keras3): run Keras 2 "
        "code (import syq_tf) in a process of its own.")


def test_keras3_with_the_legacy_flag_is_refused():
    r = run_python("import syq_tf.keras3", {"TF_USE_LEGACY_KERAS": "1"})
    assert r.returncode != 0 and "TF_USE_LEGACY_KERAS='1' selects Keras 2" in r.stderr


def test_keras3_needs_the_tensorflow_backend():
    r = run_python("import syq_tf.keras3", {"KERAS_BACKEND": "jax"})
    assert r.returncode != 0 and "KERAS_BACKEND='jax'" in r.stderr
