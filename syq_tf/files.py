"""Writing files so that a failure never leaves a partial one: each file goes to a temporary name in
the same folder first, then is renamed over the target."""

import os


def write_atomic(path, data):
    """Write ``data`` (bytes) to ``path`` through a temporary file in the same folder and a rename."""
    write_all([(path, data)])


def write_all(files):
    """Write every ``(path, bytes)`` to a temporary name next to it, then rename them all; if anything
    fails, the temporary files and any file already renamed are removed (no partial output)."""
    tmps, done = [], []
    try:
        for path, data in files:
            tmp = f"{path}.tmp-{os.getpid()}"
            tmps.append(tmp)
            with open(tmp, "wb") as f:
                f.write(data)
        for (path, _), tmp in zip(files, tmps):
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        for name in done:
            if os.path.isfile(name):
                os.remove(name)
        raise
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)
