"""The ``syq-tf`` command line end to end on the synthetic dataset.

One `syq-tf train` (tiny widths, one float and one quantized epoch) runs as a subprocess in the
background from the first test on, while the in-process tests of help texts and errors run; an
`syq-tf export --target litert` subprocess and an in-process `export --target tflm` of its model
follow, then `inspect` of the model and of both .tflite files. Help and bad command lines are
checked in-process with ``syq_tf.cli.main`` (the same code the console script runs) and, once,
through the installed console script."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import REPO
from syq_tf import cli
from syq_tf.quantizers import SYQ

_SCRIPT = shutil.which("syq-tf", path=os.path.dirname(sys.executable))
COMMAND = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "syq_tf.cli"]
WIDTHS = (4, 4, 8, 8, 16)
TRAIN = ["--dataset", "synthetic", "--widths", ",".join(map(str, WIDTHS)), "--train_limit", "192",
         "--test_limit", "96", "--batch_size", "64", "--float_epochs", "1", "--epochs", "1",
         "--method", "syq", "--bits", "2", "--granularity", "channel", "--seed", "1"]
TF_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} \d\d:)")


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}


def _start(args):
    return subprocess.Popen([*COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=REPO)


class _Run:
    """A background subprocess, waited for once."""

    def __init__(self, args):
        self.args = args
        self.proc = _start(args)
        self._done = None

    def result(self, timeout=600):
        if self._done is None:
            out, err = self.proc.communicate(timeout=timeout)
            self._done = (self.proc.returncode, out, err)
        return self._done


def _own_lines(stderr):
    """stderr without TensorFlow's C++ start-up log lines (written before Python runs our code)."""
    return [line for line in stderr.splitlines() if line.strip() and not TF_LOG.match(line)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module", autouse=True)
def background(workdir):
    """Started before the first test: the training run and a console-script error run."""
    runs = {
        "train": _Run(["train", *TRAIN, "--out", str(workdir / "run")]),
        "missing": _Run(["inspect", "--model", str(workdir / "no_such_model.h5")]),
    }
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


@pytest.fixture(scope="module")
def trained(background, workdir):
    code, out, err = background["train"].result()
    assert code == 0, f"syq-tf train failed ({code}):\n{out[-3000:]}\n{err[-3000:]}"
    return workdir / "run", out


@pytest.fixture(scope="module")
def exported(trained):
    """litert through the console script (subprocess) while tflm is exported in this process."""
    run_dir, _ = trained
    model = str(run_dir / "model.keras")
    common = ["--dataset", "synthetic", "--representative", "64", "--verify_limit", "96"]
    litert = _Run(["export", "--model", model, "--target", "litert", *common])
    tflm_out = run_dir / "firmware" / "net.tflite"
    code = cli.main(["export", "--model", model, "--target", "tflm", *common, "--out", str(tflm_out)])
    assert code == 0
    code, out, err = litert.result()
    assert code == 0, f"syq-tf export failed ({code}):\n{out[-3000:]}\n{err[-3000:]}"
    return {"litert": run_dir / "model_litert.tflite", "tflm": tflm_out, "litert_stdout": out}


# ---- help and command-line errors (in-process, no training needed) -------------------------------


def test_help_of_every_command_lists_its_flags(capsys):
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    assert top.startswith("usage: syq-tf <command>")
    for name in ("train", "export", "inspect", "bench"):
        assert re.search(rf"^  {name} +\S", top, re.M), name
    for name, command in cli.COMMANDS.items():
        assert cli.main([name, "--help"]) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: syq-tf {name} [--flag=value ...]")
        fv = command.flag_values()
        assert command.order[-1] == "debug" and len(command.order) >= 2
        for flag in command.order:
            header = f"  --[no]{flag}" if fv[flag].boolean else f"  --{flag}"
            assert re.search(rf"^{re.escape(header)}$", text, re.M), (name, flag)
            assert fv[flag].help and fv[flag].help.split(":")[-1].strip()[:12] in " ".join(text.split())
    assert cli.main(["train", "-h"]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "--widths" in text and "(default: 32,32,64,64,128)" in flat
    assert "<float|syq|uniq|ls|la>" in flat and "(default: syq)" in flat
    assert "(default: 2)" in flat and "(default: out/syq-tf-train)" in flat
    assert cli.main(["help", "export"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "<" + "|".join(syq_tf.export.TARGETS) + ">" in text  # the targets known at run time
    assert cli.main(["bench", "--help"]) == 0
    text = capsys.readouterr().out
    assert "[-- arguments]" in text and "--rows" in text and "--[no]quick" in text


@pytest.mark.parametrize("argv, where, message", [
    ([], "syq-tf", "no command given; commands: train, export, inspect, bench"),
    (["frob"], "syq-tf", "unknown command 'frob'"),
    (["--bits", "2"], "syq-tf", "unknown flag '--bits' before the command"),
    (["train", "--bits=x"], "syq-tf train", "flag --bits=x: invalid literal for int()"),
    (["train", "--bits=9"], "syq-tf train", "flag --bits=9: 9 is not an integer in the range [1, 8]"),
    (["train", "--method", "syq", "--bits", "3"], "syq-tf train", "SYQ has bits=1 (binary) or 2 (ternary), got 3"),
    (["train", "--method", "fancy"], "syq-tf train", "flag --method=fancy: value should be one of <float|syq"),
    (["train", "--widths", "4,4,8"], "syq-tf train", "--widths=4,4,8: five comma-separated positive integers"),
    (["train", "--widths", "4,4,a,8,8"], "syq-tf train", "--widths=4,4,a,8,8: five comma-separated"),
    (["train", "--nosuchflag"], "syq-tf train", "Unknown command line flag 'nosuchflag'"),
    (["train", "stray"], "syq-tf train", "unexpected argument(s) stray"),
    (["export"], "syq-tf export", "--model is required"),
    (["export", "--model", "m.h5", "--target", "nope"], "syq-tf export",
     "flag --target=nope: value should be one of <litert|tflm"),
    (["export", "--model", "m.h5", "--weights", "float32"], "syq-tf export",
     "--weights=float32 is for --target=lce (got --target=litert)"),
    (["export", "--model", "m.h5", "--target", "tflm", "--weights", "int4"], "syq-tf export",
     "--weights=int4 is for --target=litert (got --target=tflm)"),
    (["export", "--model", "m.h5", "--target", "lce", "--requantization", "double"], "syq-tf export",
     "--requantization=double is for --target=litert and tflm (got --target=lce)"),
    (["export", "--model", "m.h5", "--requantization", "triple"], "syq-tf export",
     "flag --requantization=triple: value should be one of <auto|single|double>"),
    (["inspect"], "syq-tf inspect", "--model is required"),
])
def test_usage_errors_are_one_line_exit_2(capsys, argv, where, message):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{where}: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_runtime_errors_are_one_line_exit_1(capsys, tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_text("not a model\n")
    bad_tflite = tmp_path / "bad.tflite"
    bad_tflite.write_bytes(b"\x00\x00\x00\x00TFL3" + b"\xff" * 40)
    cases = [
        (["inspect", "--model", str(tmp_path / "nope.h5")], f"{tmp_path / 'nope.h5'}: no such file or directory"),
        (["inspect", "--model", str(garbage)], "cannot load it as a Keras model"),
        (["inspect", "--model", str(bad_tflite)], "malformed TFLite flatbuffer"),
        (["export", "--model", str(tmp_path / "nope.h5"), "--dataset", "synthetic"], "no such file or directory"),
        (["bench", "--script", str(tmp_path / "accuracy.py")], "is not there: `syq-tf bench` runs benchmarks/accuracy.py"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 1, argv
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"syq-tf {argv[0]}: error: ") and message in lines[0], captured.err
    # --debug: the traceback instead
    with pytest.raises(cli.CliError, match="no such file or directory"):
        cli.main(["inspect", "--model", str(tmp_path / "nope.h5"), "--debug"])


def test_bench_runs_the_script_with_passthrough_arguments(capsys, tmp_path):
    assert cli.default_bench_script() == cli.Path(REPO) / "benchmarks" / "accuracy.py"
    fake = tmp_path / "accuracy.py"
    fake.write_text("import json, sys\njson.dump(sys.argv[1:], open(sys.argv[0] + '.args', 'w'))\n"
                    "sys.exit(3 if '--fail' in sys.argv else 0)\n")
    assert cli.main(["bench", "--script", str(fake), "--rows", "SYQ.*", "--out", "res", "--", "--seed", "1"]) == 0
    assert json.loads((tmp_path / "accuracy.py.args").read_text()) == ["--quick", "--out", "res", "--rows", "SYQ.*",
                                                                     "--seed", "1"]
    assert "running: " in capsys.readouterr().out
    assert cli.main(["bench", "--script", str(fake), "--noquick", "--", "--fail"]) == 3
    assert json.loads((tmp_path / "accuracy.py.args").read_text()) == ["--fail"]
    err = capsys.readouterr().err.splitlines()
    assert err == ["syq-tf bench: error: accuracy.py exited with status 3"]


# ---- a hand-checked model: summary and codebook numbers ------------------------------------------


def hand_model():
    """conv: 3x3x1x2 SYQ ternary, one scale 0.25; head: Dense 32 -> 3 SYQ binary per channel,
    scales 0.1, 0.2, 0.3."""
    inp = tf.keras.Input((6, 6, 1))
    x = syq_tf.quantize(tf.keras.layers.Conv2D(2, 3, use_bias=False, name="conv"),
                        kernel_quantizer=SYQ(2, "layer", eta=0.05))(inp)
    x = tf.keras.layers.Flatten()(x)
    out = syq_tf.quantize(tf.keras.layers.Dense(3, name="head"), kernel_quantizer=SYQ(1, "channel"))(x)
    model = tf.keras.Model(inp, out, name="hand")
    model(np.zeros((1, 6, 6, 1), np.float32))
    kernel = np.linspace(-0.4, 0.4, 18).reshape(3, 3, 1, 2).astype(np.float32)
    kernel[0, 0, 0, 0] = 0.01  # below eta = 0.05 * 0.4: quantized to 0
    model.get_layer("conv").set_weights([kernel if w.shape == kernel.shape else w.numpy()
                                         for w in model.get_layer("conv").weights])
    for name, alpha in (("conv", [0.25]), ("head", [0.1, 0.2, 0.3])):
        q = model.get_layer(name).kernel_quantizer
        q.alpha.assign(np.reshape(alpha, q.alpha.shape))
        q.alpha_initialized.assign(True)
    return model


@pytest.fixture(scope="module")
def hand_h5(workdir):
    path = str(workdir / "hand.h5")
    hand_model().save(path)
    return path


def _row(text, first):
    return next(line.split() for line in text.splitlines() if line.split()[:1] == [first])


def test_inspect_hand_checked_model(capsys, hand_h5):
    assert cli.main(["inspect", "--model", hand_h5]) == 0
    text = capsys.readouterr().out
    # summary: conv 18 weights at 2 bits + 1 float alpha; head 96 weights at 1 bit + 3 biases + 3 alphas
    conv, head = _row(text, "conv"), _row(text, "head")
    # layer type method bits granularity scales params bytes MACs binary ternary
    assert conv[2:] == ["SYQ", "2", "layer", "1", "19", f"{18 * 2 / 8 + 4:.1f}", str(16 * 18), "0", str(16 * 18)]
    assert head[2:] == ["SYQ", "1", "channel", "3", "102", f"{96 / 8 + 4 * 6:.1f}", "96", "96", "0"]
    assert "total: 121 params, 44.5 bytes at stored bit widths (10.9x smaller than float32)" in text
    codebooks = text[text.index("codebooks ("):]
    # layer quantizer bits granularity subgroups levels/subgroup distinct levels
    assert _row(codebooks, "conv") == ["conv", "SYQ", "2", "layer", "1", "3", "3", "-0.25", "0", "0.25"]
    assert _row(codebooks, "head") == ["head", "SYQ", "1", "channel", "3", "2", "6",
                                       "-0.3", "-0.2", "-0.1", "0.1", "0.2", "0.3"]


def test_export_refuses_a_dataset_of_another_shape(capsys, hand_h5):
    assert cli.main(["export", "--model", hand_h5, "--dataset", "fashion_mnist"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "the model takes (6, 6, 1) inputs with 3 classes" in err[0]
    assert "--dataset synthetic" in err[0]


# ---- the console script end to end ---------------------------------------------------------------


def test_console_script_error_is_one_line(background, workdir):
    code, out, err = background["missing"].result()
    assert code == 1
    assert out == ""
    assert "Traceback" not in err
    assert _own_lines(err) == [f"syq-tf inspect: error: {workdir / 'no_such_model.h5'}: no such file or directory"]


def test_train_writes_model_metrics_logs_and_plots(trained):
    run_dir, stdout = trained
    for name in ("model.keras", "metrics.json", "codebooks.png", "training.png"):
        assert (run_dir / name).is_file(), name
    for phase in ("float/train", "quantized/train", "quantizers"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "logs" / phase)), phase
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["label"] == "SYQ W2A8 channel"
    assert (metrics["method"], metrics["bits"], metrics["act_bits"], metrics["granularity"]) == ("syq", 2, 8, "channel")
    assert (metrics["train_examples"], metrics["test_examples"]) == (192, 96)
    assert metrics["config"]["widths"] == list(WIDTHS) and metrics["config"]["seed"] == 1
    assert set(metrics["history"]) == {"float", "quantized"}
    for phase in metrics["history"].values():
        assert set(phase) == {"loss", "accuracy", "test_loss", "test_accuracy"}
        assert all(len(v) == 1 for v in phase.values())
        assert all(np.isfinite(v[0]) for v in phase.values())
        assert 0 <= phase["accuracy"][0] <= 1 and 0 <= phase["test_accuracy"][0] <= 1
    # the last epoch's test metrics are the final evaluation (same weights, inference mode)
    assert metrics["test_accuracy"] == pytest.approx(metrics["history"]["quantized"]["test_accuracy"][-1], abs=1e-6)
    assert metrics["test_loss"] == pytest.approx(metrics["history"]["quantized"]["test_loss"][-1], rel=1e-4)
    assert metrics["float_test_accuracy"] == pytest.approx(metrics["history"]["float"]["test_accuracy"][-1], abs=1e-6)
    assert round(metrics["test_accuracy"] * 96) == pytest.approx(metrics["test_accuracy"] * 96, abs=1e-6)
    # parameters and bytes by hand (widths 4,4,8,8,16; conv1 and logits float; SYQ channel scales)
    c1, c2, c3, c4, d = WIDTHS
    kernels = 9 * c1 * c2 + 9 * c2 * c3 + 9 * c3 * c4 + 7 * 7 * c4 * d  # 2-bit kernels
    floats = 9 * c1 + 4 * (c1 + c2 + c3 + c4 + d) + (c2 + c3 + c4 + 1) + d * 10 + 10
    assert metrics["params"] == kernels + floats == 7667
    assert metrics["bytes_at_stored_bits"] == pytest.approx(kernels * 2 / 8 + 4 * floats)
    assert metrics["float32_bytes"] == 4 * metrics["params"]
    assert metrics["seconds"]["total"] >= metrics["seconds"]["float"] + metrics["seconds"]["quantized"] > 0
    assert "== float training: 1 epoch(s) on 192 synthetic images" in stdout
    assert "wrote: " in stdout and "total: 7667 params" in stdout

    import matplotlib.image  # noqa: PLC0415

    from syq_tf import plots  # noqa: PLC0415

    # four quantized kernels: a 3-wide grid of two rows
    assert matplotlib.image.imread(run_dir / "codebooks.png").shape[:2] == (
        round(2 * plots.PANEL_SIZE[1] * plots.DPI), round(3 * plots.PANEL_SIZE[0] * plots.DPI))
    assert matplotlib.image.imread(run_dir / "training.png").shape[:2] == (
        round(plots.TRAINING_SIZE[1] * plots.DPI), round(plots.TRAINING_SIZE[0] * plots.DPI))

    model = tf.keras.models.load_model(run_dir / "model.keras", compile=False)
    quantizers = {layer.name: q for layer, q, _ in syq_tf.quantized_kernels(model)}
    assert set(quantizers) == {"conv2", "conv3", "conv4", "fc1"}
    assert quantizers["conv2"].granularity == "channel" and quantizers["fc1"].granularity == "layer"


def test_export_litert_and_tflm(exported):
    litert, tflm = exported["litert"], exported["tflm"]
    assert "wrote: " in exported["litert_stdout"] and "verification: examples=96" in exported["litert_stdout"]
    for path in (litert, tflm):
        report = json.loads(open(f"{path}.json").read())
        assert report["model_bytes"] == os.path.getsize(path)
        layers = {r["layer"]: r for r in report["layers"]}
        assert list(layers) == ["conv1", "conv2", "conv3", "conv4", "fc1", "logits"]
        for name in ("conv2", "conv3", "conv4", "fc1"):
            assert layers[name]["stored_levels"] == 3 and layers[name]["exact"], layers[name]
        v = report["verification"]
        assert v["examples"] == 96 and v["top1_agreement"] >= 0.95
    assert json.loads(open(f"{litert}.json").read())["target"] == "litert"
    report = json.loads(open(f"{tflm}.json").read())
    assert report["target"] == "tflm" and report["tflm"]["flash_bytes"] == os.path.getsize(tflm)
    assert report["tflm"]["uncompressed_model_bytes"] > report["tflm"]["flash_bytes"]
    compressed = [t for t in report["tflm"]["compressed_tensors"] if t["compressed"]]
    assert [t["layer"] for t in compressed] == ["conv2", "conv3", "conv4", "fc1"]
    for t in compressed:
        assert t["bits"] == 2 and t["levels"] == 3
        assert t["index_bytes"] == math.ceil(2 * t["weights"] / 8)
        assert t["stored_bytes"] == t["index_bytes"] + t["table_bytes"]
    header, source = tflm.with_suffix(".h").read_text(), tflm.with_suffix(".cc").read_text()
    assert "extern const unsigned char g_model[];" in header
    assert f"const unsigned int g_model_len = {os.path.getsize(tflm)};" in source


def test_inspect_trained_model_and_tflite_files(trained, exported, capsys):
    run_dir, _ = trained
    assert cli.main(["inspect", "--model", str(run_dir / "model.keras")]) == 0
    text = capsys.readouterr().out
    codebooks = text[text.index("codebooks ("):]
    # ternary SYQ: 3 levels in every subgroup (one per output channel for the convs, one for fc1)
    for name, subgroups in (("conv2", 4), ("conv3", 8), ("conv4", 8), ("fc1", 1)):
        row = _row(codebooks, name)
        assert row[1:6] == ["SYQ", "2", "channel" if name != "fc1" else "layer", str(subgroups), "3"], row
    assert len(_row(codebooks, "fc1")) == 10  # ... distinct=3 and the three levels -a 0 a
    levels = [float(v) for v in _row(codebooks, "fc1")[7:]]
    assert levels[1] == 0 and levels[0] == pytest.approx(-levels[2])

    c1, c2, c3, c4, d = WIDTHS
    expected = {  # tensor name part -> (op, weights, levels, bits)
        "conv2": ("CONV_2D", 9 * c1 * c2, 3, 2), "conv3": ("CONV_2D", 9 * c2 * c3, 3, 2),
        "conv4": ("CONV_2D", 9 * c3 * c4, 3, 2),
    }
    assert cli.main(["inspect", "--model", str(exported["litert"])]) == 0
    text = capsys.readouterr().out
    assert f"TFLite model, {os.path.getsize(exported['litert'])} bytes" in text and "CONV_2D x4" in text
    rows = cli.tflite_weight_rows(exported["litert"].read_bytes())
    assert [r["op"] for r in rows] == ["CONV_2D"] * 4 + ["FULLY_CONNECTED"] * 2
    for r in rows:
        key = next((k for k in expected if f"/{k}/" in r["tensor"]), None)
        if key:
            op, weights, levels, bits = expected[key]
            assert (r["op"], r["weights"], r["levels"], r["bits"]) == (op, weights, levels, bits)
            assert r["stored_bytes"] == weights and r["packed_bytes"] == weights * bits // 8
            assert r["channels"] == int(r["shape"][0])
            line = next(line for line in text.splitlines() if line.split()[:2] == [r["op"], r["tensor"]])
            assert line.split()[3:] == ["INT8", str(r["channels"]), "3", "2", str(weights), str(weights),
                                        str(weights // 4), "4.0x"]
    fc1 = rows[4]  # fc1 (bn5 folded into its name by the converter): 7*7*c4 x d ternary
    assert (fc1["weights"], fc1["levels"], fc1["bits"]) == (7 * 7 * c4 * d, 3, 2)
    total_weights = sum(r["weights"] for r in rows)
    assert f"total: {total_weights} weights; stored {total_weights} bytes" in text

    assert cli.main(["inspect", "--model", str(exported["tflm"])]) == 0
    text = capsys.readouterr().out
    assert "TFLM_DECODE x4" in text
    rows = cli.tflite_weight_rows(exported["tflm"].read_bytes())
    decoded = [r for r in rows if r["op"] == "TFLM_DECODE"]
    report = json.loads(open(f"{exported['tflm']}.json").read())
    stored = {t["tensor"]: t["stored_bytes"] for t in report["tflm"]["compressed_tensors"] if t["compressed"]}
    assert {r["tensor"]: r["stored_bytes"] for r in decoded} == stored
    assert all((r["dtype"], r["levels"], r["bits"]) == ("LUT2", 3, 2) for r in decoded)
    assert [r["op"] for r in rows if r["op"] != "TFLM_DECODE"] == ["CONV_2D", "FULLY_CONNECTED"]  # float layers
