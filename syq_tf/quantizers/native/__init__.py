"""syq_tf's TensorFlow CPU ops, compiled from the C++ beside this file by scripts/build_native.py
(run by scripts/setup.sh). Each has a pure-TensorFlow twin that gives the same result; the op is a
faster path, never a different answer.

- ``least_squares_search(x2d, mode)``: the exact ls2 / lsT scalars of every row of ``x2d``
  (syq_tf.quantizers.least_squares; one pass of binned sums, a sort of the bins that can hold the
  optimum).
- ``lat_exact(w, d)``, ``lat_approx(w, d, support, iterations, tol)``: loss-aware ternarization
  (syq_tf.quantizers.loss_aware), the exact search (binned like the above) and the authors'
  alternation (one pass over the kernel per step).

:func:`available` says whether the ops are loaded; :func:`status` why not. ``SYQ_TF_NATIVE=0`` in
the environment turns them off (before/after measurements, or to rule them out); the library is
still loaded, so that SavedModels traced with the ops load. Inside XLA
(``jit_compile=True``) the callers use their TensorFlow twins: XLA cannot compile a custom op.
"""

import os
import pathlib
import sysconfig

import tensorflow as tf
from tensorflow.python.ops import control_flow_util

_HERE = pathlib.Path(__file__).resolve().parent
_LIBRARY = _HERE / ("_syq_ops" + sysconfig.get_config_var("EXT_SUFFIX"))
for _op in ("SyqLeastSquaresSearch", "SyqLatExact", "SyqLatApprox"):
    tf.no_gradient(_op)  # their callers stop the gradient; say so to the tape too


def _load():
    """(ops module or None, status line). Loaded when syq_tf is imported, so that a SavedModel
    traced with the ops loads in any process that imports syq_tf (also with SYQ_TF_NATIVE=0, which
    only keeps new traces from using them)."""
    if not _LIBRARY.is_file():
        return None, (f"not built ({_LIBRARY.name} is missing: run `make setup`, or "
                      "`python scripts/build_native.py` with a C++17 compiler)")
    built = _LIBRARY.stat().st_mtime
    if any(source.stat().st_mtime > built for pattern in ("*.cc", "*.h") for source in _HERE.glob(pattern)):
        return None, f"out of date ({_LIBRARY.name} is older than its source: run `make setup`)"
    try:
        return tf.load_op_library(str(_LIBRARY)), f"loaded ({_LIBRARY.name})"
    except (tf.errors.NotFoundError, OSError) as err:
        return None, f"cannot be loaded ({_LIBRARY.name}: {err})"


_ops, _status = _load()
_TURNED_OFF = os.environ.get("SYQ_TF_NATIVE", "1").strip() == "0"
if _TURNED_OFF:
    _status = f"turned off (SYQ_TF_NATIVE=0; the library: {_status})"


def available():
    """True if the compiled ops are loaded and not turned off."""
    return _ops is not None and not _TURNED_OFF


def in_xla():
    """True while tracing for XLA (``jit_compile=True``), which cannot compile these ops."""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def usable(x):
    """True if the ops can take tensor ``x`` here: loaded, float32/float64, not inside XLA."""
    return tf.as_dtype(x.dtype) in (tf.float32, tf.float64) and available() and not in_xla()


def status():
    """One line: loaded, turned off, not built, out of date, or the loader's error."""
    return _status


@tf.autograph.experimental.do_not_convert
def least_squares_search(x2d, mode, bins=0):
    """Exact ls2 ([g, 2]: v1, v2) or lsT ([g, 1]: v) scalars per row of ``x2d`` [g, n] (float32 or
    float64), in its dtype. ``bins=0``: the op's choice (rows of up to 256 values are sorted whole);
    ``bins`` 1 to 65536 forces that many bins (anything else: InvalidArgumentError). RuntimeError if
    the op is not available (:func:`status`)."""
    return _ops_or_raise().syq_least_squares_search(x2d, mode=mode, bins=int(bins))


@tf.autograph.experimental.do_not_convert
def lat_exact(w, d, bins=0):
    """Exact loss-aware ternarization of every row of ``w`` [g, n] with curvature ``d`` (same shape,
    > 0): (alpha [g, 1], cut [g, 1]); the support is |w| >= cut (cut = +inf: nothing kept).
    ``bins`` as in :func:`least_squares_search` (0: rows of up to 256 weights are sorted whole)."""
    return _ops_or_raise().syq_lat_exact(w, d, bins=int(bins))


@tf.autograph.experimental.do_not_convert
def lat_approx(w, d, support, iterations, tol, two_scales=False, start_threshold=None):
    """The authors' LAT alternation from a starting support, at most ``iterations`` (>= 1) steps,
    stopping when no row's support changes or (tol > 0) no row's alpha moves by ``tol``:
    (alpha [g, 1], threshold [g, 1]), the returned support being |w| > threshold. ``two_scales``
    (LAT2): the positive and the negative weights of each row as two problems, [2g, 1] each (every
    row's positive side first: support w > threshold[:g], -w > threshold[g:]).

    ``support``: bool, w's shape; or, with ``start_threshold`` ([g, 1], two scales [2g, 1]), values
    (a warm start: the previous kernel) whose support is |values| > start_threshold (two scales:
    values > the row's positive threshold or -values > its negative one; each side keeps its sign's
    weights of w)."""
    if start_threshold is None:
        support = tf.cast(support, w.dtype)
        rows = tf.shape(w)[:1] * (2 if two_scales else 1)
        start_threshold = tf.fill(tf.concat([rows, [1]], 0), tf.constant(0.5, w.dtype))
    return _ops_or_raise().syq_lat_approx(w, d, support, start_threshold, iterations=int(iterations),
                                          tol=float(tol), two_scales=bool(two_scales))


def _ops_or_raise():
    if not available():
        raise RuntimeError(f"syq_tf.quantizers.native: the compiled ops are {_status}.")
    return _ops
