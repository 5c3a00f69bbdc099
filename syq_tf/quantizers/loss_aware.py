"""Loss-aware weight quantization (Hou & Kwok, ICLR 2017 / 2018): the projection step, pure math.

See ../shared/METHODS.md §4. Every step of loss-aware training projects the float weights w onto a
quantized set in the norm weighted by a diagonal curvature estimate d (d = sqrt(v) + eps, v Adam's
second moment of the gradient w.r.t. the quantized weights). This module holds only that projection,
as TF functions on 2-D tensors [groups, n] (one scale per row; d has the same shape, d > 0); the
optimizer / Keras integration lives elsewhere and calls these functions.

    objective (per row):   E(alpha, b) = sum_i d_i (alpha b_i - w_i)^2,   alpha >= 0,   Q = alpha b
    LAB (binary):          b = sign(w),   alpha = sum d|w| / sum d        (d constant: mean|w|)
    LAT, alpha fixed:      b_i = sign(w_i) if |w_i| > alpha/2 else 0     (threshold rule, strict)
    LAT, support S fixed:  alpha = sum_S d|w| / sum_S d                  (= sum d|b||w| / sum d|b|)
    LAT exact:             a = |w| sorted descending, d carried along (argsort + gather)
                           A_k = sum_{j<=k} d_j a_j,  D_k = sum_{j<=k} d_j,  alpha_k = A_k / D_k
                           E(top k, alpha_k) = sum d w^2 - A_k^2 / D_k
                           keep consistent k (a_k >= alpha_k/2 >= a_{k+1}, a_{n+1} := 0)
                           maximising F_k = A_k^2 / D_k
    LAT approximate:       S_0 given (default: w != 0)
                           alpha_t = sum_{S_{t-1}} d|w| / sum_{S_{t-1}} d,   S_t = {|w| > alpha_t / 2}
                           until S_t = S_{t-1}, or |alpha_t - alpha_{t-1}| < tol in every row (the
                           authors' rule, tol = 1e-6 in LossAware), or `iterations` steps;
                           returned alpha = that of S_T
    LAT2 (two scales):     w+ = max(w, 0), w- = max(-w, 0), each an independent LAT problem with its
                           own sums (own alpha, own support):  Q = alpha+ [i in S+] - alpha- [i in S-]
    LAQ (m bits):          magnitude levels l_0 = 0 < l_1 < ... < l_k = 1,   k = 2^(m-1) - 1
                           linear: l_j = j / k           log: l_j = 2^-(k-j)  (j = 1..k)
                           b_i = sign(w_i) nearest_l(|w_i| / alpha),   alpha = sum d b w / sum d b^2
                           alternated from alpha_0 (default max|w|), at most `iterations` times,
                           stopping at a fixed point or when alpha moves by less than `tol`

Why the exact LAT search is exact. For a fixed alpha > 0 each element's best choice is independent:
keeping i costs d_i (alpha - |w_i|)^2, dropping it costs d_i w_i^2, so keep iff |w_i| > alpha/2 (d
does not move the threshold). Hence some global optimum has a support {|w| > alpha/2}, i.e. the top k
of |w| for some k, and the best of the n prefixes (each with its own optimal alpha_k) is the global
minimum over all 2^n supports. More precisely, an optimal (k, alpha_k) is *strictly* consistent,
a_k > alpha_k/2 > a_{k+1}: if a_{k+1} = alpha_k/2 exactly, adding it costs nothing at alpha_k and
re-fitting alpha (which then moves) strictly lowers E; likewise for removing a_k = alpha_k/2. So an
optimum never splits a run of equal |w| (a_k = a_{k+1} would need a_k > alpha_k/2 > a_k). The search
therefore only scores k at the end of such a run (a_k > a_{k+1}), which also makes the tie order of the
sort irrelevant; the support is then {|w| >= a_k}. Zeros are never kept (a_k > a_{k+1} >= 0). The
consistency test is closed (tolerant to rounding of alpha_k); if rounding leaves no consistent k, the
best k among all run ends is taken (the unrestricted maximum of F is the optimum anyway). Among k with
exactly equal F the smallest (sparsest) is taken.

Tie rules.
  * sign(0) := +1 (sign_pm1). Zero weights never enter a support chosen by a rule (0 > alpha/2 is false;
    LAQ maps them to level 0), so this only matters for a support passed in by the caller.
  * LAT threshold rule is strict: |w| = alpha/2 -> 0. It never decides the exact optimum (above); in the
    approximate method an element exactly at alpha/2 is dropped.
  * LAQ nearest level: a value exactly half way between two levels goes to the smaller magnitude (same
    convention as the LAT rule, so m = 2 linear LAQ, levels {0, 1}, is the LAT iteration). "Exactly" is
    up to the rounding of |w| / alpha, which is compared with the level midpoints.
  * LAT2: w = 0 belongs to neither side; its Q is 0.

LAQ log levels: m bits give k + 1 = 2^(m-1) magnitudes {0, 2^-(k-1), ..., 1/2, 1}, i.e. 2^m - 1 signed
levels, the same count as linear (m = 2: {0, 1}, m = 3: {0, 1/4, 1/2, 1}, m = 4: {0, 2^-6, ..., 1}).
For m = 8 the smallest non-zero level is 2^-126 (float32's smallest normal number); levels below the
dtype's precision behave like 0 (a subnormal midpoint may be flushed to 0 under XLA) -- harmless, the
error differs by less than the dtype's resolution.

Descent. Each LAT / LAQ half-step minimises E over one block (alpha given b, or b given alpha), so E
never increases; the LAQ loop state after t steps is (b_t = assign(alpha_{t-1}), alpha_t = LS(b_t)), and
it stops early at a fixed point (b_t = b_{t-1}, hence alpha_t = alpha_{t-1} and b_t = assign(alpha_t)).
At a fixed point the assignment is the nearest level for the returned alpha and alpha is the weighted
least-squares optimum for that assignment. If an assignment is all zero (only from a caller's
alpha0 >= 2 max|w| / l_1; never from the default max|w|, whose largest element maps to level 1),
alpha is kept for that step.

Degenerate rows: an all-zero row (or a row with an empty support) gets alpha = 0 and Q = 0, never NaN
(every division is guarded). d is cast to w's dtype; float32 and float64 work, in eager, graph and XLA
(``tf.function(jit_compile=True)``). No stop_gradient is applied: the caller projects outside the tape.

Outside XLA the exact LAT search and the LAT alternation run as compiled TensorFlow CPU ops
(:mod:`syq_tf.quantizers.native`, loss_aware_search.cc: the same results; the exact search there
bins |w| instead of sorting it, the alternation takes one pass over the row a step); inside XLA,
or where the ops are not built, the TensorFlow functions below.
"""

import numpy as np
import tensorflow as tf

from syq_tf.quantizers import native
from syq_tf.quantizers._common import (
    NO_AGGREGATION,
    WeightQuantizer,
    owner_name,
    register,
    scale_shape,
    shown,
    sign_pm1,
    subgroup_reduce_axes,
    to_groups,
)

MODES = ("binary", "ternary", "ternary_exact", "ternary_two_scale", "linear", "log")
LAQ_KINDS = ("linear", "log")
MIN_BITS, MAX_BITS = 2, 8


# ------------------------------------------------------------------------------------------------
# Argument checks (Python-level, static).


def _check_bits(bits, owner):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{owner}: bits={shown(bits)!r} must be an integer in {MIN_BITS}..{MAX_BITS} (k = 2^(bits-1) - 1 "
            "non-zero magnitudes per sign)."
        )


def _check_kind(kind, owner):
    if kind not in LAQ_KINDS:
        raise ValueError(f"{owner}: unknown level kind {kind!r}; allowed: {LAQ_KINDS}.")


def _check_tol(tol, owner):
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)) or not 0 <= tol < np.inf:
        raise ValueError(f"{owner}: tol={shown(tol)!r} must be a finite number >= 0 (0: iterate to a fixed point).")


def _check_iterations(iterations, minimum, owner):
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < minimum:
        raise ValueError(f"{owner}: iterations={shown(iterations)!r} must be an integer >= {minimum}.")


def _inputs(w, d, owner):
    """w and d as tensors of w's (floating) dtype, both of rank 2 and the same static shape."""
    w = tf.convert_to_tensor(w)
    if not w.dtype.is_floating:
        raise ValueError(f"{owner}: w has dtype {w.dtype.name}; expected a floating dtype.")
    d = tf.cast(tf.convert_to_tensor(d, dtype_hint=w.dtype), w.dtype)
    if w.shape.rank is not None and w.shape.rank != 2:
        raise ValueError(f"{owner}: w has shape {w.shape}; expected a 2-D tensor [groups, n].")
    if not w.shape.is_compatible_with(d.shape):
        raise ValueError(
            f"{owner}: d has shape {d.shape} but w has shape {w.shape}; d (the curvature estimate) must "
            "have the shape of w."
        )
    return w, d


# ------------------------------------------------------------------------------------------------
# Helpers on [g, n] tensors.


def _safe_div(num, den):
    """num / den where den > 0, else 0 (no NaN, no inf, also in the unused branch)."""
    ok = den > 0
    return tf.where(ok, num / tf.where(ok, den, tf.ones_like(den)), tf.zeros_like(num))


def _support_scale(a, d, support):
    """alpha = sum_S d|w| / sum_S d per row ([g, 1]); 0 for an empty support. ``a`` = |w|."""
    s = tf.cast(support, a.dtype)
    return _safe_div(
        tf.reduce_sum(d * a * s, axis=-1, keepdims=True), tf.reduce_sum(d * s, axis=-1, keepdims=True)
    )


def _ternary_from_support(w, alpha, support):
    return tf.where(support, alpha * sign_pm1(w), tf.zeros_like(w))


# ------------------------------------------------------------------------------------------------
# LAB


def lab_project(w, d):
    """Loss-aware binarization of every row of w [g, n] with curvature d [g, n] (d > 0).

    alpha = sum d|w| / sum d (shape [g, 1]), Q = alpha sign(w) with sign(0) := +1. Returns (alpha, Q).
    """
    w, d = _inputs(w, d, "lab_project")
    alpha = _safe_div(
        tf.reduce_sum(d * tf.abs(w), axis=-1, keepdims=True), tf.reduce_sum(d, axis=-1, keepdims=True)
    )
    return alpha, alpha * sign_pm1(w)


# ------------------------------------------------------------------------------------------------
# LAT


def _lat_exact_scale(a, d):
    """Exact ternary search on magnitudes a = |w| >= 0: (alpha [g, 1], support bool [g, n]).

    The cuts are scored in float64 (any input float type): neighbouring cuts' scores differ by less
    than float32's rounding of the prefix sums (in float32 the search picked a cut with a higher
    weighted error than the optimum on 3000 float32 weights). Outside XLA the compiled op
    (:mod:`syq_tf.quantizers.native`) finds the same cut without sorting the row."""
    if native.usable(a):
        alpha, cut = native.lat_exact(a, tf.cast(d, a.dtype))
        return alpha, a >= cut
    order = tf.argsort(a, axis=-1, direction="DESCENDING", stable=True)
    a_kept = tf.gather(a, order, axis=1, batch_dims=1)
    a_sorted = tf.cast(a_kept, tf.float64)
    d_sorted = tf.cast(tf.gather(d, order, axis=1, batch_dims=1), tf.float64)
    prefix_a = tf.cumsum(d_sorted * a_sorted, axis=-1)  # A_k, k = 1..n
    prefix_d = tf.cumsum(d_sorted, axis=-1)  # D_k
    alpha_k = _safe_div(prefix_a, prefix_d)
    score = _safe_div(prefix_a * prefix_a, prefix_d)  # F_k
    following = tf.concat([a_sorted[:, 1:], tf.zeros_like(a_sorted[:, :1])], axis=-1)  # a_{k+1}
    run_end = a_sorted > following  # k ends a run of equal |w| (and a_k > 0)
    half = 0.5 * alpha_k
    consistent = tf.logical_and(a_sorted >= half, half >= following)
    valid = tf.logical_and(run_end, consistent)
    usable = tf.where(tf.reduce_any(valid, axis=-1, keepdims=True), valid, run_end)
    best = tf.argmax(
        tf.where(usable, score, tf.constant(-float("inf"), score.dtype)), axis=-1, output_type=tf.int32
    )[:, None]
    any_usable = tf.reduce_any(usable, axis=-1, keepdims=True)
    alpha = tf.where(any_usable, tf.gather(alpha_k, best, axis=1, batch_dims=1), tf.zeros_like(half[:, :1]))
    alpha = tf.cast(alpha, a.dtype)
    cut = tf.gather(a_kept, best, axis=1, batch_dims=1)  # a_k of the chosen k
    support = tf.logical_and(any_usable, a >= cut)
    return alpha, support


def lat_exact_project(w, d):
    """Exact loss-aware ternarization of every row of w [g, n] (curvature d [g, n], d > 0).

    Minimises sum d (alpha b - w)^2 over alpha >= 0 and b in {-1, 0, 1}^n with b = sign(w) on the
    support, by a sort of |w| and prefix sums (module docstring). Returns (alpha [g, 1], Q [g, n]);
    Q is strictly self-consistent: Q_i != 0 iff |w_i| > alpha/2 (up to rounding at exact ties).
    """
    w, d = _inputs(w, d, "lat_exact_project")
    alpha, support = _lat_exact_scale(tf.abs(w), d)
    return alpha, _ternary_from_support(w, alpha, support)


def lat_approx_project(w, d, support=None, iterations=10, tol=0.0):
    """Approximate loss-aware ternarization: alternate alpha = sum_S d|w| / sum_S d and the threshold
    rule S = {|w| > alpha/2}, starting from ``support`` (bool [g, n]; default: w != 0, typically the
    previous step's support), at most ``iterations`` threshold steps, stopping at a fixed point.

    Returns (alpha [g, 1], Q [g, n], support bool [g, n]); alpha is the optimal scale of the returned
    support, Q = alpha sign(w) on it. ``iterations=0`` returns the starting point. The weighted error
    never increases along the iteration; at a fixed point the support equals {|w| > alpha/2}.
    ``tol`` > 0 also stops once every row's alpha moved by less than ``tol`` (the authors' rule).
    """
    owner = "lat_approx_project"
    _check_iterations(iterations, 0, owner)
    _check_tol(tol, owner)
    w, d = _inputs(w, d, owner)
    a = tf.abs(w)
    if support is None:
        support = a > 0
    else:
        support = tf.convert_to_tensor(support)
        if not w.shape.is_compatible_with(support.shape):
            raise ValueError(f"{owner}: support has shape {support.shape} but w has shape {w.shape}.")
        support = tf.cast(support, tf.bool)

    if iterations > 0 and native.usable(a):  # the same alternation, compiled: one pass a step
        alpha, threshold = native.lat_approx(w, d, support, iterations, tol)
        support = a > threshold
        return alpha, _ternary_from_support(w, alpha, support), support
    if iterations > 0:

        def body(step, current, alpha, _go):
            new_alpha = _support_scale(a, d, current)
            new = a > 0.5 * new_alpha
            go = tf.reduce_any(tf.not_equal(new, current))
            if tol > 0:
                go = tf.logical_and(go, tf.reduce_any(tf.abs(new_alpha - alpha) >= tol))
            return step + 1, new, new_alpha, go

        no_alpha = tf.fill(tf.shape(a[:, :1]), tf.constant(-np.inf, a.dtype))  # first step never stops
        _, support, _, _ = tf.while_loop(
            lambda _step, _current, _alpha, go: go,
            body,
            (tf.constant(0), support, no_alpha, tf.constant(True)),
            maximum_iterations=iterations,
        )
    alpha = _support_scale(a, d, support)
    return alpha, _ternary_from_support(w, alpha, support), support


def lat2_project(w, d, exact=True, support=None, iterations=10, tol=0.0):
    """Loss-aware ternarization with two scales per row: {-alpha_neg, 0, alpha_pos}.

    The positive weights and the negative weights are two independent ternary problems, each with its
    own sums (the other side's elements are 0 for it, so never in its support); solved exactly
    (``exact=True``) or by the approximate alternation (``exact=False``, starting from ``support``
    restricted to each side, default w != 0, at most ``iterations`` steps). Returns (alpha_pos [g, 1],
    alpha_neg [g, 1], Q [g, n]) with Q = alpha_pos on the positive support, -alpha_neg on the negative
    support, 0 elsewhere (a side without weights gets alpha 0). The support is Q != 0.
    """
    owner = "lat2_project"
    w, d = _inputs(w, d, owner)
    positive, negative = w > 0, w < 0
    zero = tf.zeros_like(w)
    if support is not None:
        support = tf.convert_to_tensor(support)
        if not w.shape.is_compatible_with(support.shape):
            raise ValueError(f"{owner}: support has shape {support.shape} but w has shape {w.shape}.")
        support = tf.cast(support, tf.bool)
    if not exact:
        _check_iterations(iterations, 0, owner)
        _check_tol(tol, owner)
    if not exact and iterations > 0 and native.usable(w):  # both sides in one pass over w, no copies
        alpha, threshold = native.lat_approx(w, d, tf.not_equal(w, 0) if support is None else support,
                                             iterations, tol, two_scales=True)
        (alpha_pos, alpha_neg), (t_pos, t_neg) = tf.split(alpha, 2, axis=0), tf.split(threshold, 2, axis=0)
        q = tf.where(w > t_pos, alpha_pos * tf.ones_like(w), zero) - tf.where(-w > t_neg, alpha_neg * tf.ones_like(w), zero)
        return alpha_pos, alpha_neg, q
    sides = tf.concat([tf.where(positive, w, zero), tf.where(negative, -w, zero)], axis=0)  # [2g, n]
    d2 = tf.concat([d, d], axis=0)
    if exact:
        alpha, support2 = _lat_exact_scale(sides, d2)
        q = tf.where(support2, alpha * tf.ones_like(sides), tf.zeros_like(sides))
    else:
        start = None
        if support is not None:
            start = tf.concat([tf.logical_and(support, positive), tf.logical_and(support, negative)], axis=0)
        alpha, q, _ = lat_approx_project(sides, d2, support=start, iterations=iterations, tol=tol)
    alpha_pos, alpha_neg = tf.split(alpha, 2, axis=0)
    q_pos, q_neg = tf.split(q, 2, axis=0)
    return alpha_pos, alpha_neg, q_pos - q_neg


# ------------------------------------------------------------------------------------------------
# LAQ


def laq_levels(bits, kind="linear"):
    """Sorted non-negative magnitude levels (numpy float64, length 2^(bits-1)) of m-bit LAQ.

    k = 2^(bits-1) - 1.  "linear": 0, 1/k, 2/k, ..., 1.  "log": 0, 2^-(k-1), ..., 1/4, 1/2, 1.
    The quantized values are alpha * (+-level); bits in 2..8, else ValueError.
    """
    _check_bits(bits, "laq_levels")
    _check_kind(kind, "laq_levels")
    k = 2 ** (int(bits) - 1) - 1
    if kind == "linear":
        return np.arange(k + 1, dtype=np.float64) / k
    return np.concatenate([[0.0], 2.0 ** -np.arange(k - 1, -1, -1, dtype=np.float64)])


def laq_project(w, d, bits, kind="linear", iterations=10, alpha0=None, tol=0.0):
    """Loss-aware m-bit quantization of every row of w [g, n] (curvature d [g, n], d > 0).

    Levels alpha * {0, +-l_1, ..., +-1} (:func:`laq_levels`). Starting from ``alpha0`` (scalar, [g] or
    [g, 1]; default and for rows where alpha0 <= 0: max|w| of the row), each step assigns every |w|/alpha
    to the nearest magnitude level (halfway -> the smaller one; sign from w) and then sets
    alpha = sum d b w / sum d b^2; at most ``iterations`` (>= 1) steps, stopping early at a fixed
    point, or (``tol`` > 0, the authors' rule) once every row's alpha moved by less than ``tol``.
    Returns (alpha [g, 1], Q [g, n]), Q = alpha b. The weighted error never increases.
    """
    owner = "laq_project"
    levels_np = laq_levels(bits, kind)
    _check_iterations(iterations, 1, owner)
    _check_tol(tol, owner)
    w, d = _inputs(w, d, owner)
    dtype = w.dtype
    a = tf.abs(w)
    top = tf.reduce_max(a, axis=-1, keepdims=True)
    if alpha0 is None:
        alpha = top
    else:
        alpha0 = tf.cast(tf.convert_to_tensor(alpha0, dtype_hint=dtype), dtype)
        if alpha0.shape.rank == 1:
            alpha0 = alpha0[:, None]
        alpha0 = alpha0 * tf.ones_like(top)
        alpha = tf.where(alpha0 > 0, alpha0, top)
    levels = tf.constant(levels_np, dtype)
    midpoints = tf.constant(0.5 * (levels_np[1:] + levels_np[:-1]), dtype)

    def assign(scale):
        """Nearest magnitude level of |w| / scale (ties to the smaller); 0 where scale is 0."""
        u = _safe_div(a, scale)
        if len(levels_np) <= 16:  # a few comparisons are much cheaper than searchsorted
            return _nearest_level(u, levels_np)
        bounds = tf.broadcast_to(midpoints, tf.stack([tf.shape(a)[0], tf.size(midpoints)]))
        index = tf.searchsorted(bounds, u, side="left")  # number of midpoints strictly below u
        return tf.gather(levels, index)

    def body(step, scale, level, _changed):
        new_level = assign(scale)
        num = tf.reduce_sum(d * new_level * a, axis=-1, keepdims=True)  # sum d b w  (b w = l |w|)
        den = tf.reduce_sum(d * new_level * new_level, axis=-1, keepdims=True)  # sum d b^2
        new_scale = tf.where(den > 0, num / tf.where(den > 0, den, tf.ones_like(den)), scale)
        go = tf.reduce_any(tf.not_equal(new_level, level))
        if tol > 0:
            go = tf.logical_and(go, tf.reduce_any(tf.abs(new_scale - scale) >= tol))
        return step + 1, new_scale, new_level, go

    _, alpha, level, _ = tf.while_loop(
        lambda _step, _scale, _level, changed: changed,
        body,
        (tf.constant(0), alpha, -tf.ones_like(a), tf.constant(True)),  # -1: no assignment yet
        maximum_iterations=iterations,
    )
    return alpha, alpha * level * sign_pm1(w)


# ------------------------------------------------------------------------------------------------
# Dispatch


def loss_aware_project(w, d, mode, bits=None, **kw):
    """Project w [g, n] in the d-weighted norm for ``mode`` (one of MODES). Returns:

        binary             lab_project(w, d)                        -> (alpha, Q)
        ternary            lat_approx_project(w, d, **kw)           -> (alpha, Q, support)
        ternary_exact      lat_exact_project(w, d)                  -> (alpha, Q)
        ternary_two_scale  lat2_project(w, d, **kw)                 -> (alpha_pos, alpha_neg, Q)
        linear / log       laq_project(w, d, bits, mode, **kw)      -> (alpha, Q)

    ``bits`` (2..8) is required for linear / log and must not be given for the binary / ternary modes
    (their bit width is fixed). ValueError for an unknown mode, bad bits, d of another shape than w,
    and (eagerly only; inside tf.function the values are not known) d with a non-positive entry.
    """
    owner = "loss_aware_project"
    if mode not in MODES:
        raise ValueError(f"{owner}: unknown mode {mode!r}; allowed: {MODES}.")
    if mode in LAQ_KINDS:
        if bits is None:
            raise ValueError(f"{owner}: mode {mode!r} needs bits (an integer in {MIN_BITS}..{MAX_BITS}).")
        _check_bits(bits, f"{owner} (mode {mode!r})")
    elif bits is not None:
        raise ValueError(
            f"{owner}: mode {mode!r} has a fixed bit width; bits={shown(bits)!r} must not be given (bits are "
            "for the 'linear' and 'log' modes)."
        )
    w, d = _inputs(w, d, owner)
    if tf.executing_eagerly() and not bool(tf.reduce_all(d > 0)):
        raise ValueError(f"{owner}: d must be > 0 everywhere (d = sqrt(v) + eps); got min(d) = "
                         f"{float(tf.reduce_min(d))}.")
    if mode == "binary":
        return lab_project(w, d, **kw)
    if mode == "ternary":
        return lat_approx_project(w, d, **kw)
    if mode == "ternary_exact":
        return lat_exact_project(w, d, **kw)
    if mode == "ternary_two_scale":
        return lat2_project(w, d, **kw)
    return laq_project(w, d, bits, kind=mode, **kw)


# ------------------------------------------------------------------------------------------------
# Codebook rules at a given scale: the quantized kernel as a function of (w, alpha).
#
# The projection above returns a scale per row; the rule below maps every weight to its level at
# that scale (the "assignment" half-step, which never increases the weighted error). The Keras
# quantizer stores only the scales, so training, inference, saved models and export all compute the
# kernel with these rules from (w, alpha) -- no curvature needed at inference.


def assign_levels(w, mode, alpha, alpha_neg=None, bits=None):
    """Q(w) at fixed scales (alpha broadcastable to w, >= 0):

        binary             alpha sign(w)
        ternary*           alpha sign(w) [|w| > alpha/2]
        ternary_two_scale  alpha [w > alpha/2] - alpha_neg [-w > alpha_neg/2]
        linear / log       alpha sign(w) nearest_level(|w| / alpha)   (ties to the smaller level)
    A zero scale gives 0.
    """
    zero = tf.zeros_like(w)
    if mode == "binary":
        return alpha * sign_pm1(w)
    if mode in ("ternary", "ternary_exact"):
        return tf.where(tf.abs(w) > 0.5 * alpha, alpha * sign_pm1(w), zero)
    if mode == "ternary_two_scale":
        positive = tf.where(w > 0.5 * alpha, alpha * tf.ones_like(w), zero)
        negative = tf.where(-w > 0.5 * alpha_neg, alpha_neg * tf.ones_like(w), zero)
        return positive - negative
    levels_np = laq_levels(bits, mode)
    alpha = alpha * tf.ones_like(w)
    u = _safe_div(tf.abs(w), alpha)
    if len(levels_np) <= 16:  # a few comparisons are much cheaper than searchsorted
        return alpha * _nearest_level(u, levels_np) * sign_pm1(w)
    levels = tf.constant(levels_np, w.dtype)
    midpoints = tf.constant(0.5 * (levels_np[1:] + levels_np[:-1]), w.dtype)
    index = tf.searchsorted(midpoints, tf.reshape(u, [-1]), side="left")  # midpoints strictly below u
    level = tf.reshape(tf.gather(levels, index), tf.shape(w))
    return alpha * level * sign_pm1(w)


def _nearest_level(u, levels_np):
    """The level l_j nearest to u >= 0 (ties to the smaller: the largest j with u > midpoint j-1),
    by one comparison per midpoint -- the same result as searchsorted(midpoints, u, "left")."""
    midpoints = 0.5 * (levels_np[1:] + levels_np[:-1])
    level = tf.zeros_like(u)
    for j in range(1, len(levels_np)):
        mid = tf.constant(midpoints[j - 1], u.dtype)
        level = tf.where(u > mid, tf.constant(levels_np[j], u.dtype), level)
    return level


# Compiled with XLA for the Keras quantizer: the level rules and the LAQ alternation are chains of
# elementwise ops over the whole kernel, which XLA fuses into one pass (on the loss-aware papers'
# 2048-wide MLP the LAQ level rule runs about 10x and the alternation 2-3x faster than unfused).
# Small kernels (the CNN's) run unfused: there the launch of a compiled function costs more than it
# saves. XLA_MIN_SIZE: kernels with at least this many weights use the compiled functions.
XLA_MIN_SIZE = 65536
_assign_levels_xla = tf.function(assign_levels, jit_compile=True)
_laq_project_xla = tf.function(laq_project, jit_compile=True)
_lat_approx_project_xla = tf.function(lat_approx_project, jit_compile=True)
_lat2_project_xla = tf.function(lat2_project, jit_compile=True)


def use_xla(shape):
    """True if a kernel of this (static) shape is large enough for the compiled functions."""
    size = tf.TensorShape(shape).num_elements()
    return size is not None and size >= XLA_MIN_SIZE


# ------------------------------------------------------------------------------------------------
# The Keras quantizer.

CURVATURES = ("optimizer", "constant")
LOSS_AWARE_GRANULARITIES = ("layer", "channel")
_PRECISION = {"binary": 1, "ternary": 2, "ternary_exact": 2, "ternary_two_scale": 2}


def _straight_through(w, q, check=None):
    """Q in the forward pass (exactly: no w + (q - w) rounding), identity gradient to w. ``check``:
    (bool variable, message): the gradient fails (InvalidArgumentError: message) unless it is True."""
    q = tf.stop_gradient(q)

    @tf.custom_gradient
    def ste(w):
        def grad(dy):
            if check is None:
                return dy
            bound, message = check
            ok = bound.read_value()
            assertion = tf.debugging.Assert(ok, [message])
            with tf.control_dependencies([assertion]):
                # XLA (jit_compile=True) drops Assert: there the gradient turns NaN instead, so the
                # mistake still cannot train silently (CheckFinite names the layer).
                return tf.where(ok, dy, tf.fill(tf.shape(dy), tf.constant(float("nan"), dy.dtype)))

        return tf.identity(q), grad

    return ste(w)


@register(alias="loss_aware")
class LossAware(WeightQuantizer):
    """Loss-aware weight quantizer (LAB / LAT / LAQ), ``mode`` one of :data:`MODES`.

    Q = alpha b with alpha the minimiser of sum d (alpha b - w)^2 (module docstring), one scale per
    kernel (``granularity="layer"``, the papers' choice) or per output channel (``"channel"``;
    ``transposed=True``, set by ``syq_tf.quantize``, for a transposed convolution's axis -2).

    ``curvature="optimizer"`` (default, the paper's method): d = sqrt(v_hat) + eps comes from Adam's
    second moments, so the model must be trained with :class:`syq_tf.optimizers.LossAwareAdam`. That
    optimizer, after each Adam update of the float kernel, clips it to [-1, 1] and projects it with
    the new d, storing the scales in this quantizer's ``alpha`` (and ``alpha_neg`` for two scales)
    variables; the forward pass maps w to its levels at the stored scales (:func:`assign_levels`).
    Before the first projection the scales are set from the weights with d = 1 (Adam's v starts at 0,
    so the paper's first step is the unweighted projection). Training such a kernel with another
    optimizer fails at the first gradient with a message naming this quantizer.

    ``curvature="constant"``: d = 1, explicitly: the projection is recomputed from w in every call
    (no variables), and any optimizer works (LossAwareAdam still clips the weights to [-1, 1]).

    ``bits`` (2..8) only for the LAQ modes "linear" / "log"; ``iterations`` bounds the approximate
    LAT and the LAQ alternations, which also stop once the scale moves by less than ``tol`` (default
    1e-6, the authors' rule; 0: only at a fixed point or after ``iterations``). In the optimizer's
    projections, which start from the previous step's scale and support (the weights move little
    between steps), at most ``warm_iterations`` alternation steps run: None runs up to
    ``iterations``, as the authors' code; 1 runs one step per training step, the alternation
    continuing across steps. The default ``"auto"`` is 1 for LAQ ("linear", "log") and None for the
    others, from measurements (README, Fidelity 8): with one step LAQ-3 trains the loss-aware papers'
    2048-wide MLP at 1.25x a float step instead of 2.56x and lost no accuracy (3 seeds, their MLP
    and VGG-like CNN), while approximate LAT lost 1.8 points on the CNN. Gradient: identity (the
    gradient at the quantized weights is applied to the float weights).
    """

    def __init__(self, mode="binary", bits=None, granularity="layer", curvature="optimizer",
                 iterations=10, depthwise=False, tol=1e-6, warm_iterations="auto", transposed=False,
                 **kwargs):
        owner = owner_name("LossAware", kwargs)
        if mode not in MODES:
            raise ValueError(f"{owner}: unknown mode {mode!r}; allowed: {MODES}.")
        if mode in LAQ_KINDS:
            if bits is None:
                raise ValueError(
                    f"{owner}: mode {mode!r} (m-bit LAQ) needs bits, an integer in {MIN_BITS}..{MAX_BITS}."
                )
            _check_bits(bits, f"{owner} (mode {mode!r})")
        elif bits is not None and bits != _PRECISION[mode]:
            raise ValueError(
                f"{owner}: mode {mode!r} has a fixed bit width ({_PRECISION[mode]}); bits={shown(bits)!r} is "
                "only for the LAQ modes 'linear' and 'log'."
            )
        if granularity not in LOSS_AWARE_GRANULARITIES:
            raise ValueError(
                f"{owner}: unknown granularity {granularity!r}; allowed: {LOSS_AWARE_GRANULARITIES}."
            )
        if curvature not in CURVATURES:
            raise ValueError(
                f"{owner}: curvature={curvature!r}; allowed: 'optimizer' (d from LossAwareAdam's second "
                "moments) or 'constant' (d = 1, any optimizer)."
            )
        _check_iterations(iterations, 1, owner)
        _check_tol(tol, owner)
        if isinstance(warm_iterations, str) and warm_iterations == "auto":
            warm_iterations = 1 if mode in LAQ_KINDS else None
        elif warm_iterations is not None and (
                isinstance(warm_iterations, bool) or not isinstance(warm_iterations, (int, np.integer))
                or warm_iterations < 1):
            raise ValueError(f"{owner}: warm_iterations={shown(warm_iterations)!r}; allowed: 'auto' (1 for LAQ, "
                             "None otherwise), None (up to iterations, the authors' rule) or an integer >= 1.")
        super().__init__(**kwargs)
        self.mode = mode
        self.bits = int(bits) if mode in LAQ_KINDS else _PRECISION[mode]
        self.precision = self.bits
        self.granularity = granularity
        self.curvature = curvature
        self.iterations = int(iterations)
        self.tol = float(tol)
        self.warm_iterations = None if warm_iterations is None else int(warm_iterations)
        self.depthwise = bool(depthwise)
        self.transposed = bool(transposed)
        object.__setattr__(self, "_bound", None)

    # -- shapes -----------------------------------------------------------------------------------

    def reduce_axes(self, kernel_shape):
        return subgroup_reduce_axes(
            self.granularity, kernel_shape, self.depthwise, owner=f"LossAware quantizer '{self.name}'",
            transposed=self.transposed,
        )

    @property
    def two_scales(self):
        return self.mode == "ternary_two_scale"

    def build(self, input_shape):
        self._kernel_shape = tf.TensorShape(input_shape)
        self._reduce_axes = self.reduce_axes(input_shape)
        if self.curvature == "optimizer":
            shape = scale_shape(input_shape, self._reduce_axes)
            # Every replica computes the same scales from the same (mirrored) weights and curvature:
            # each writes its own copy (no cross-replica merge, which tf.cond would not allow).
            first = NO_AGGREGATION
            self.alpha = self.add_weight(
                name="alpha", shape=shape, initializer="zeros", trainable=False, aggregation=first
            )
            if self.two_scales:
                self.alpha_neg = self.add_weight(
                    name="alpha_neg", shape=shape, initializer="zeros", trainable=False,
                    aggregation=first,
                )
            self.alpha_initialized = self.add_weight(
                name="alpha_initialized", shape=(), dtype=tf.bool, initializer="zeros",
                trainable=False, aggregation=first,
            )
            # Set by LossAwareAdam when it takes this kernel over. Not a Keras weight, so h5 files
            # and get_weights() leave it out (a model reloaded from h5 and trained with another
            # optimizer fails again); tracked as a plain dependency because the gradient reads it
            # and a SavedModel must reach every variable its functions capture.
            with tf.init_scope():
                bound = tf.Variable(False, trainable=False, name="bound")
            object.__setattr__(self, "_bound", bound)
            self._track_trackable(bound, name="loss_aware_bound")
        super().build(input_shape)

    # -- the projection ---------------------------------------------------------------------------

    def project(self, w, d=None, previous=None):
        """Scales of the d-weighted projection of kernel ``w`` (d: kernel-shaped, > 0; None -> 1).

        Returns a tuple of scale tensors in the variables' shape ((alpha,) or (alpha, alpha_neg)).
        ``previous``: the kernel of the last step, whose support {|w| > alpha/2} at the stored
        scales starts the approximate LAT iteration (the paper's warm start); for LAQ any value
        other than None marks a warm start (from the stored scale).
        """
        # no gradient flows through a projection; stopped here so that a tape never records the
        # compiled functions (XLA cannot return the while loops' gradient accumulators)
        w = tf.stop_gradient(tf.convert_to_tensor(w))
        w2d, _ = to_groups(w, self._reduce_axes)
        d2d = tf.ones_like(w2d) if d is None else to_groups(tf.stop_gradient(tf.cast(d, w.dtype)), self._reduce_axes)[0]
        shape = scale_shape(w.shape, self._reduce_axes)
        # large kernels: the compiled functions (XLA), or for LAT / LAT2 the native op where it can
        # run (lat_approx_project calls it; XLA could not compile it)
        xla = use_xla(w.shape)
        lat_xla = xla and not native.usable(w)
        iterations = self.iterations
        if previous is not None and self.warm_iterations is not None:
            iterations = min(self.warm_iterations, self.iterations)
        if self.mode == "binary":
            alpha, _ = lab_project(w2d, d2d)
        elif self.mode == "ternary_exact":
            alpha, _ = lat_exact_project(w2d, d2d)
        elif (self.mode in ("ternary", "ternary_two_scale") and previous is not None and iterations > 0
              and native.usable(w)):
            # warm start inside the op: the support of the previous kernel's levels, {|w| > alpha/2}
            # at the stored scales (two scales: w > alpha/2 or -w > alpha_neg/2), without
            # materializing the levels (assign_levels, then != 0, as below)
            halves = [tf.where(s > 0, 0.5 * s, tf.constant(np.inf, w.dtype))  # a zero scale keeps nothing
                      for s in (tf.reshape(tf.cast(v, w.dtype), [-1, 1]) for v in self._scales())]
            alpha, _ = native.lat_approx(w2d, d2d, to_groups(tf.stop_gradient(tf.convert_to_tensor(previous)),
                                                             self._reduce_axes)[0],
                                         iterations, self.tol, two_scales=self.two_scales,
                                         start_threshold=tf.concat(halves, axis=0))
            if self.two_scales:
                alpha, alpha_neg = tf.split(alpha, 2, axis=0)
                return tf.reshape(alpha, shape), tf.reshape(alpha_neg, shape)
        elif self.mode == "ternary":
            start = None
            if previous is not None:
                start = to_groups(tf.not_equal(self._levels(previous), 0), self._reduce_axes)[0]
            alpha, _, _ = (_lat_approx_project_xla if lat_xla else lat_approx_project)(
                w2d, d2d, support=start, iterations=iterations, tol=self.tol)
        elif self.mode == "ternary_two_scale":
            start = None
            if previous is not None:
                start = to_groups(tf.not_equal(self._levels(previous), 0), self._reduce_axes)[0]
            alpha, alpha_neg, _ = (_lat2_project_xla if lat_xla else lat2_project)(
                w2d, d2d, exact=False, support=start, iterations=iterations, tol=self.tol
            )
            return tf.reshape(alpha, shape), tf.reshape(alpha_neg, shape)
        else:
            alpha0 = None
            if previous is not None and self.curvature == "optimizer":
                alpha0 = tf.reshape(self.alpha, [-1, 1])  # warm start from the last scale
            alpha, _ = (_laq_project_xla if xla else laq_project)(w2d, d2d, self.bits, self.mode, iterations, alpha0=alpha0,
                                        tol=self.tol)
        return (tf.reshape(alpha, shape),)

    def initialize_from(self, kernel):
        """Set the stored scales from the given float kernel with d = 1 (e.g. after loading float
        weights; the next LossAwareAdam step replaces them with the curvature-weighted projection)."""
        kernel = tf.convert_to_tensor(kernel, dtype=self.dtype)
        if not self.built:
            self.build(kernel.shape)
        self._check_shape(kernel.shape)
        if self.curvature == "optimizer":
            self.set_scales(self.project(kernel))

    def _scales(self):
        return (self.alpha, self.alpha_neg) if self.two_scales else (self.alpha,)

    def set_scales(self, scales):
        """Store projected scales (from :meth:`project`); returns the assign op of the last one."""
        op = None
        for variable, value in zip(self._scales(), scales):
            op = variable.assign(value)
        self.alpha_initialized.assign(True)
        return op

    def _levels(self, w, scales=None):
        if scales is None:
            scales = tuple(tf.convert_to_tensor(s) for s in self._scales())
        alpha_neg = scales[1] if self.two_scales else None
        if self.mode == "binary" or not use_xla(w.shape):  # binary: one op either way
            return assign_levels(w, self.mode, scales[0], alpha_neg, self.bits)
        scales = [tf.stop_gradient(s) for s in scales]
        alpha_neg = scales[1] if self.two_scales else None
        return _assign_levels_xla(tf.stop_gradient(w), self.mode, scales[0], alpha_neg, self.bits)

    def scales_for(self, w):
        """The stored scales, set from ``w`` with d = 1 the first time (eager and graph mode)."""

        def init():
            self.set_scales(self.project(w))
            return tf.constant(True)

        if tf.executing_eagerly():
            if not bool(self.alpha_initialized.numpy()):
                init()
            return tuple(tf.identity(s) for s in self._scales())
        ready = tf.cond(tf.convert_to_tensor(self.alpha_initialized), lambda: tf.constant(True), init)
        with tf.control_dependencies([ready]):
            return tuple(tf.identity(s) for s in self._scales())

    # -- Keras ------------------------------------------------------------------------------------

    def call(self, inputs):
        w = tf.convert_to_tensor(inputs)
        self._check_shape(w.shape)
        if self.curvature == "constant":
            return _straight_through(w, self._levels(w, self.project(w)))
        q = self._levels(w, self.scales_for(w))
        message = (
            f"LossAware quantizer '{self.name}' (mode {self.mode!r}, curvature='optimizer') is being "
            "trained without syq_tf.optimizers.LossAwareAdam, which supplies its curvature and "
            "projects its weights: compile the model with LossAwareAdam(...), or use "
            "LossAware(..., curvature='constant') for the unweighted (d = 1) projection."
        )
        return _straight_through(w, q, (self._bound, message))

    def get_config(self):
        return {
            **super().get_config(),
            "mode": self.mode,
            "bits": self.bits if self.mode in LAQ_KINDS else None,
            "granularity": self.granularity,
            "curvature": self.curvature,
            "iterations": self.iterations,
            "tol": self.tol,
            "warm_iterations": self.warm_iterations,
            "depthwise": self.depthwise,
            "transposed": self.transposed,
        }
