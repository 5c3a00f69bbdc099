"""The machine a benchmark ran on, for its report; the merged JSON of results; the float pre-training
or the model an earlier run kept (no TensorFlow import: shared by the Keras 2 and the Keras 3 benchmarks)."""

import fcntl
import json
import os
import platform
import time


def cpuinfo():
    """{field: value} of /proc/cpuinfo's first processor block (the first line of each field; {}
    where there is no /proc/cpuinfo)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name(detail=False):
    """The CPU's model name from /proc/cpuinfo (the platform's processor name elsewhere); ``detail``:
    with its family / model / stepping, e.g. "AMD EPYC (cpu family 25, model 17, stepping 1)"."""
    fields = cpuinfo()
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    extra = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    return f"{fields['model name']} ({extra})" if detail and extra else fields["model name"]


def write_json(path, data, **options):
    """``data`` as JSON at ``path``, whole or not at all: written to a temporary file of this
    process, synced to disk and renamed over ``path`` (an interrupted run leaves the old file).
    ``options`` go to ``json.dump`` (default ``indent=2``). Creates the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, **{"indent": 2, **options})
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_rows(path, meta, rows, models):
    """Merge a run's result rows (dicts with a "model") into the JSON at ``path``: the rows of the
    models this run measured replace the saved ones, ordered as in ``models``; ``meta`` is kept per
    model (runs of different models may be separate processes). Serialised by a lock on the folder
    (no lock file left behind) and written by :func:`write_json`. Returns the merged {"runs", "rows"}."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.load(open(path)) if os.path.exists(path) else {"runs": {}, "rows": []}
        measured = {r["model"] for r in rows}
        order = {m: i for i, m in enumerate(models)}
        merged_rows = sorted([r for r in old["rows"] if r["model"] not in measured] + rows,
                             key=lambda r: order.get(r["model"], len(order)))
        runs = {k: v for k, v in old.get("runs", {}).items() if k in {r["model"] for r in merged_rows}}
        runs.update({m: meta for m in measured})
        merged = {"runs": runs, "rows": merged_rows}
        write_json(path, merged)
    finally:
        os.close(lock)
    return merged


def float_pretraining(model, *, compile_model, fit, load, reuse=None, keep=None):
    """(model, fit seconds or None, the file loaded or None): the float pre-training of a benchmark
    model -- ``load(reuse)`` where an earlier run kept that file (``--reuse``), else ``fit(model)``,
    saved to ``keep`` if given (``--keep`` / ``--keep-models``); compiled either way."""
    if reuse and os.path.exists(reuse):
        model = load(reuse)
        compile_model(model)
        return model, None, reuse
    compile_model(model)
    t = time.perf_counter()
    fit(model)
    seconds = time.perf_counter() - t
    if keep:
        os.makedirs(os.path.dirname(os.path.abspath(keep)), exist_ok=True)
        model.save(keep)
    return model, seconds, None
