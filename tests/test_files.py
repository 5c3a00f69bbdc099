"""syq_tf.files: atomic writes (fsync, rename, temporaries removed on any exit), stale temporaries of
killed processes cleaned, the folder lock between processes, and SIGKILL at random points of a save
never losing the last good file."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import syq_tf
from conftest import REPO
from syq_tf import files


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_write_atomic_fsyncs_the_file_and_the_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    target = tmp_path / "a.json"
    target.write_text("old")
    files.write_atomic(str(target), "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.json"]
    assert synced == [f"{target}.tmp-{os.getpid()}", str(tmp_path)]


@pytest.mark.parametrize("error", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    with pytest.raises(type(error)):
        with files.atomic_path(str(target), keep_extension=True) as tmp:
            assert tmp == f"{target}.tmp-{os.getpid()}.png"
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise error
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["plot.png"]


def test_sigterm_unwinds_like_ctrl_c_and_the_handler_comes_back(tmp_path):
    target = tmp_path / "m.keras"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(files.Terminated, match="terminated by SIGTERM"):
        with files.sigterm_raises(), files.atomic_path(str(target), keep_extension=True) as tmp:
            open(tmp, "wb").write(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_stale_temporaries_of_dead_processes_are_cleaned_by_the_next_write(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    names = {f"model.keras.tmp-{dead}.keras": False, f"metrics.json.tmp-{dead}": False,
             f"m.tflite.tmp-{alive}": True, f"own.tmp-{os.getpid()}": True, "notes.tmp-abc": True,
             "model.keras": True}
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f"dir.tmp-{dead}").mkdir()
    files.write_atomic(str(tmp_path / "metrics.json"), b"{}")
    assert sorted(os.listdir(tmp_path)) == sorted([n for n, keep in names.items() if keep] + ["metrics.json"])


_HOLD = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("files", {path!r})
files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)
with files.lock_folder(sys.argv[1], "the holder"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_the_folder_lock_excludes_a_second_process_until_the_first_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD.format(path=files.__file__), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(files.FolderLocked) as err:
            with files.lock_folder(str(tmp_path), "another syq-tf train"):
                pass
        assert err.value.pid == holder.pid
        assert str(err.value) == (f"{tmp_path} is in use by another syq-tf train (PID {holder.pid}); wait for it to "
                                  "finish or choose another folder")
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    with files.lock_folder(str(tmp_path)) as lock:
        assert open(lock).read() == f"{os.getpid()}\n"


# ---- SIGKILL at random points of a save ----------------------------------------------------------

_WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("files", {path!r})
files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)
target = sys.argv[1]
for i in range(1, 100000):
    block = bytes([i % 251]) * 65536
    with files.atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            for _ in range(64):  # 4 MB in 64 writes: a kill lands inside a write, the fsync or the rename
                f.write(block)
    print(i, flush=True)
"""


def test_sigkill_during_atomic_writes_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "big.bin"
    rng = random.Random(18)
    for _ in range(8):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER.format(path=files.__file__), str(target)],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "1"
        time.sleep(rng.uniform(0.0, 0.15))
        writer.kill()
        writer.wait()
        data = target.read_bytes()
        assert len(data) == 4 << 20 and data == data[:1] * len(data)  # one whole version
    files.clean_stale(str(tmp_path))
    assert os.listdir(tmp_path) == ["big.bin"]


_SAVER = """
import sys, numpy as np, tensorflow as tf, syq_tf
path = sys.argv[1]
model = tf.keras.Sequential([tf.keras.Input((512,)), tf.keras.layers.Dense(1024), tf.keras.layers.Dense(512)])
for i in range(1, 100000):
    model.set_weights([np.full(w.shape, i, w.dtype) for w in model.get_weights()])
    syq_tf.save_model(model, path)
    print(i, flush=True)
"""


@pytest.mark.parametrize("name", ["model.keras", "model.h5"])
def test_sigkill_during_model_saves_keeps_the_last_good_model(tmp_path, name):
    path = tmp_path / name
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}
    saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert saver.stdout.readline().strip() == "1"
        t0 = time.monotonic()
        assert saver.stdout.readline().strip() == "2"
        period = time.monotonic() - t0
        time.sleep(random.Random(name).uniform(0.1, 0.9) * period)  # somewhere inside the third save
    finally:
        saver.kill()
        saver.wait()
    weights = syq_tf.load_model(path).get_weights()
    version = weights[0].flat[0]
    assert version >= 2 and all(np.all(w == version) for w in weights)  # one whole saved version
    syq_tf.save_model(tf_model_like(weights), path)  # the next save in the folder cleans what the kill left
    assert os.listdir(tmp_path) == [name]


def tf_model_like(weights):
    import tensorflow as tf  # noqa: PLC0415

    model = tf.keras.Sequential([tf.keras.Input((512,)), tf.keras.layers.Dense(1024), tf.keras.layers.Dense(512)])
    model.set_weights(weights)
    return model


def test_files_module_needs_only_the_standard_library():
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("files", {files.__file__!r})
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'numpy', 'syq_tf')))
    """)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
