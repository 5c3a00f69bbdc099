"""`syq-tf train` runs that are interrupted, resumed, run twice at once or run into an old --out.

- An interrupted run (an exception after an epoch's checkpoint, or SIGKILL after the checkpoint
  between the phases) resumed with ``--resume`` reaches bit-identical weights, and the same
  per-epoch history, as an uninterrupted run.
- Two runs into one --out: the second fails at once naming the first's PID; SIGTERM ends the first
  cleanly (exit 143, no temporary file left, the lock released).
- Files of an earlier run that this run does not write are removed and listed in metrics.json.
- Bad flags and unusable --out folders are one-line errors before any training.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import syq_tf
from conftest import REPO
from syq_tf import cli, files

TINY = ["--dataset", "synthetic", "--widths", "2,2,4,4,8", "--train_limit", "96", "--test_limit", "32",
        "--batch_size", "32", "--verbose", "0", "--seed", "5"]


def _train(out, *args):
    return cli.main(["train", *TINY, *args, "--out", str(out)])


def _weights(path):
    return syq_tf.load_model(path).get_weights()


def _leftovers(folder):
    return [n for n in os.listdir(folder) if ".tmp-" in n]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 2 + 2 epoch runs of SYQ and UniQ (calibrated activations)."""
    runs = {}
    for method in ("syq", "uniq"):
        out = tmp_path_factory.mktemp(f"ref_{method}")
        assert _train(out, "--method", method, "--float_epochs", "2", "--epochs", "2") == 0
        runs[method] = out
    return runs


@pytest.mark.parametrize("method, phase, epoch", [
    ("syq", "float", 1),  # after the first float epoch
    ("uniq", "quantized", 1),  # after the first quantized epoch: optimizer, scales and steps restored
])
def test_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch, capsys, reference, method,
                                                            phase, epoch):
    write = cli._write_checkpoint  # noqa: SLF001

    def write_then_stop(path, state, arrays):
        write(path, state, arrays)
        if (state["phase"], state["epoch"]) == (phase, epoch):
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(cli, "_write_checkpoint", write_then_stop)
        assert _train(out, "--method", method, "--float_epochs", "2", "--epochs", "2") == 130
    assert capsys.readouterr().err.strip().endswith("syq-tf train: error: interrupted")
    assert sorted(os.listdir(out)) == [".syq-tf.lock", cli.CHECKPOINT, "logs"]  # no model yet, no temp file
    # --resume alone: every other flag comes from the checkpoint
    assert cli.main(["train", "--resume", "--verbose", "0", "--out", str(out)]) == 0
    ref = reference[method]
    for a, b in zip(_weights(out / "model.keras"), _weights(ref / "model.keras"), strict=True):
        assert np.array_equal(a, b)
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert metrics["history"] == expected["history"]  # every epoch's loss and accuracy, bit for bit
    assert metrics["resumed"] is True and metrics["test_accuracy"] == expected["test_accuracy"]
    assert not (out / cli.CHECKPOINT).exists() and not _leftovers(out)


def test_a_run_killed_with_sigkill_in_the_quantized_phase_resumes_to_the_same_weights(tmp_path, reference):
    out = tmp_path / "killed"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}
    run = subprocess.Popen([sys.executable, "-m", "syq_tf.cli", "train", *TINY, "--method", "syq",
                            "--float_epochs", "2", "--epochs", "2", "--out", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 180
        while True:  # until the checkpoint taken between the phases appears
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            try:
                with np.load(out / cli.CHECKPOINT) as data:
                    if json.loads(data["state"].tobytes())["phase"] == "quantized":
                        break
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.02)
        time.sleep(0.3)  # somewhere in the calibration or the first quantized epoch
    finally:
        run.kill()
        run.wait()
    assert not (out / "model.keras").exists()
    assert cli.main(["train", "--resume", "--verbose", "0", "--out", str(out)]) == 0
    for a, b in zip(_weights(out / "model.keras"), _weights(reference["syq"] / "model.keras"), strict=True):
        assert np.array_equal(a, b)
    assert not _leftovers(out)


def test_resume_refuses_other_flags_and_a_missing_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    write = cli._write_checkpoint  # noqa: SLF001

    def stop(path, state, arrays):
        write(path, state, arrays)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_write_checkpoint", stop)
    assert _train(out, "--method", "float", "--float_epochs", "2", "--epochs", "0") == 130
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--seed", "6", "--method", "float", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "syq-tf train: error: --resume: flags differ from the interrupted run's: --seed=6 (checkpoint: 5); leave "
        "them out (or start a new run without --resume)")
    # the flags are checked against the checkpoint's (method float), not the defaults' (SYQ takes 1 or 2 bits)
    assert cli.main(["train", "--resume", "--bits", "4", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith("flags differ from the interrupted run's: --bits=4 "
                                                    "(checkpoint: 2); leave them out (or start a new run without "
                                                    "--resume)")
    saved = (out / cli.CHECKPOINT).read_bytes()
    (out / cli.CHECKPOINT).write_bytes(saved[: len(saved) // 2])  # damaged outside syq-tf
    assert cli.main(["train", "--resume", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"syq-tf train: error: {out / cli.CHECKPOINT}: cannot read the checkpoint: ") and "\n" not in err
    empty = tmp_path / "empty"
    assert cli.main(["train", "--resume", "--out", str(empty)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"syq-tf train: error: --resume: no {cli.CHECKPOINT} in {empty} (nothing to resume: the run finished, or "
        "never completed an epoch)")


def test_a_second_run_into_a_busy_out_fails_at_once_and_sigterm_cleans_up(tmp_path, capsys):
    out = tmp_path / "busy"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}
    first = subprocess.Popen([sys.executable, "-m", "syq_tf.cli", "train", *TINY, "--float_epochs", "50",
                              "--epochs", "0", "--method", "float", "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        lock = out / files.LOCK_NAME
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        started = time.monotonic()
        assert _train(out, "--method", "float") == 1
        assert time.monotonic() - started < 5
        assert capsys.readouterr().err.strip() == (
            f"syq-tf train: error: --out={out} is in use by another syq-tf train (PID {first.pid}); wait for it to "
            "finish or choose another folder")
        while not (out / cli.CHECKPOINT).exists():  # training: let it write its first checkpoint
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 143
    assert err.strip().splitlines()[-1] == "syq-tf train: error: terminated (SIGTERM)"
    assert not _leftovers(out)
    with files.lock_folder(str(out)):  # released by the terminated run
        pass


def test_files_of_an_earlier_run_are_removed_and_listed(tmp_path):
    out = tmp_path / "old"
    (out / "logs" / "quantizers").mkdir(parents=True)
    for name in ("codebooks.png", "model.h5", "notes.txt"):
        (out / name).write_bytes(b"from an earlier run")
    old_events = out / "logs" / "quantizers" / "events.out.tfevents.1.old.1.v2"
    old_events.write_bytes(b"")
    assert _train(out, "--method", "float", "--float_epochs", "1", "--epochs", "0") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["removed"] == ["codebooks.png", os.path.join("logs", "quantizers", old_events.name), "model.h5"]
    assert not (out / "codebooks.png").exists() and not (out / "model.h5").exists() and not old_events.exists()
    assert (out / "notes.txt").exists()  # not a file syq-tf train writes: never touched
    assert set(metrics["files"].values()) == {"model.keras", "metrics.json", "logs", "training.png"}
    assert all((out / name).exists() for name in metrics["files"].values())


@pytest.mark.parametrize("flag, value", [("lr", "nan"), ("lr", "inf"), ("lr", "0"), ("float_lr", "-1e-3")])
def test_learning_rate_must_be_finite_and_positive(capsys, flag, value):
    assert cli.main(["train", f"--{flag}={value}"]) == 2
    shown = {"nan": "nan", "inf": "inf", "0": "0.0", "-1e-3": "-0.001"}[value]
    assert capsys.readouterr().err.strip() == (
        f"syq-tf train: error: --{flag}={shown}: the learning rate must be a finite number > 0")


def test_unusable_out_is_a_one_line_error_before_training(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert _train(a_file) == 1
    assert capsys.readouterr().err.strip() == f"syq-tf train: error: --out={a_file} exists and is not a directory"
    assert _train(a_file / "sub") == 1
    assert capsys.readouterr().err.strip() == (
        f"syq-tf train: error: --out={a_file / 'sub'}: cannot create the output directory: Not a directory")
    # a folder without write permission (simulated: the tests may run as root, who may write anywhere)
    locked = tmp_path / "readonly"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    monkeypatch.setattr(cli, "load_dataset", lambda *a, **k: pytest.fail("trained despite the bad --out"))
    assert _train(locked) == 1
    assert capsys.readouterr().err.strip() == (
        f"syq-tf train: error: --out={locked}: {locked} is not writable (permission denied); choose another --out")


def test_non_finite_training_data_is_refused(tmp_path, capsys, monkeypatch):
    real = cli.load_dataset

    def nan_train(name, split, *args, **kwargs):
        x, y = real(name, split, *args, **kwargs)
        return (np.full_like(x, np.nan) if split == "train" else x), y

    monkeypatch.setattr(cli, "load_dataset", nan_train)
    assert _train(tmp_path / "nan", "--method", "float") == 1
    assert capsys.readouterr().err.strip() == (
        "syq-tf train: error: the training images (--dataset synthetic) hold 75264 non-finite value(s) (NaN or "
        "Inf) of 75264; training on them would give a model of NaN weights")
