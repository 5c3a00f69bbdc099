"""Writing files so that a failure never leaves a partial one, and runs that do not step on each other.

Every file goes to a temporary name in the same folder first (``<name>.tmp-<pid>``, or
``<name>.tmp-<pid><ext>`` for writers that pick the format from the extension), is flushed and
``fsync``-ed, then renamed over the target (``os.replace``, atomic on POSIX), and the folder is
``fsync``-ed so the rename itself survives a power cut. On any exit -- an exception, Ctrl-C,
SIGTERM (see :func:`sigterm_raises`) -- the temporary file is removed. Only SIGKILL (or a crash of
the interpreter) can leave one behind: :func:`clean_stale` removes those of processes that no
longer run, and every write into a folder calls it first.

:func:`lock_folder` gives one run the exclusive use of a folder (``fcntl.flock`` on a lock file in
it, held while the run lasts; the kernel releases it when the process dies, even by SIGKILL).
"""

import contextlib
import fcntl
import os
import re
import shutil
import signal
import threading

LOCK_NAME = ".syq-tf.lock"
_TMP = re.compile(r"\.tmp-(\d+)(\.[A-Za-z0-9]{1,8})?$")


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM while :func:`sigterm_raises` is active, so that
    ``finally`` blocks (temporary files, locks) run as they do for Ctrl-C."""


class FolderLocked(RuntimeError):
    """Another process holds the folder's lock; ``pid`` is that process (None if unknown)."""

    def __init__(self, message, pid=None):
        super().__init__(message)
        self.pid = pid


def temp_name(path, keep_extension=False):
    """The temporary name used for ``path`` by this process (same folder)."""
    suffix = os.path.splitext(path)[1] if keep_extension else ""
    return f"{path}.tmp-{os.getpid()}{suffix}"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(folder):
    """Remove the temporary files (``*.tmp-<pid>[.ext]``) that dead processes left in ``folder``
    (killed while writing); returns their paths. Those of running processes are kept."""
    removed = []
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return removed
    for name in names:
        match = _TMP.search(name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def fsync_dir(folder):
    """``fsync`` a folder (makes the renames and removals in it durable); no-op where unsupported."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _remove(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def atomic_path(path, keep_extension=False):
    """A temporary path next to ``path`` for a writer that only takes a file name (Keras'
    ``model.save``, matplotlib's ``savefig``): when the block ends normally the file written there
    is fsync-ed and renamed over ``path``; on any exception (Ctrl-C and SIGTERM included) it is
    removed and ``path`` keeps its old content. ``keep_extension``: the temporary name ends with
    ``path``'s extension (for writers that choose the format from it)."""
    folder = os.path.dirname(path)
    clean_stale(folder)
    tmp = temp_name(path, keep_extension)
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise FileNotFoundError(f"{path}: the writer did not create {tmp}")
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def write_atomic(path, data):
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` through a temporary file in the same
    folder, fsync and a rename."""
    write_all([(path, data)])


def write_all(files):
    """Write every ``(path, bytes)`` to a temporary name next to it (flushed and fsync-ed), then
    rename them all and fsync their folders; if anything fails, the temporary files and any file
    already renamed are removed (no partial output)."""
    tmps, done = [], []
    folders = []
    for path, _ in files:
        folder = os.path.dirname(path)
        if folder not in folders:
            folders.append(folder)
            clean_stale(folder)
    try:
        for path, data in files:
            tmp = temp_name(path)
            tmps.append(tmp)
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        for (path, _), tmp in zip(files, tmps):
            os.replace(tmp, path)
            done.append(path)
        for folder in folders:
            fsync_dir(folder)
    except BaseException:
        for name in done:
            if os.path.isfile(name):
                os.remove(name)
        raise
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


def remove_files(paths):
    """Remove files and folders (missing ones are fine), then fsync their folders."""
    folders = set()
    for path in paths:
        if os.path.lexists(path):
            _remove(path)
            folders.add(os.path.dirname(path))
    for folder in folders:
        fsync_dir(folder)


@contextlib.contextmanager
def lock_folder(folder, what="another run"):
    """Hold the exclusive lock of ``folder`` (``fcntl.flock`` on ``<folder>/.syq-tf.lock``, which
    records the holder's PID) for the block. Raises :class:`FolderLocked` at once, naming the
    holder's PID, when another process holds it. The lock file stays (removing it would race)."""
    path = os.path.join(folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = int(os.pread(fd, 32, 0).decode().strip() or "x")
            except ValueError:
                pid = None
            holder = f"{what} (PID {pid})" if pid is not None else what
            raise FolderLocked(f"{folder} is in use by {holder}; wait for it to finish or choose another "
                               "folder", pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def sigterm_raises():
    """While the block runs (in the main thread), SIGTERM raises :class:`Terminated` instead of
    ending the process at once, so temporary files are removed and locks released; the previous
    handler comes back afterwards. Elsewhere (another thread) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
