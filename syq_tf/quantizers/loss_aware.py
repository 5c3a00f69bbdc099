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
                           until S_t = S_{t-1} or `iterations` steps; returned alpha = that of S_T
    LAT2 (two scales):     w+ = max(w, 0), w- = max(-w, 0), each an independent LAT problem with its
                           own sums (own alpha, own support):  Q = alpha+ [i in S+] - alpha- [i in S-]
    LAQ (m bits):          magnitude levels l_0 = 0 < l_1 < ... < l_k = 1,   k = 2^(m-1) - 1
                           linear: l_j = j / k           log: l_j = 2^-(k-j)  (j = 1..k)
                           b_i = sign(w_i) nearest_l(|w_i| / alpha),   alpha = sum d b w / sum d b^2
                           alternated from alpha_0 (default max|w|), at most `iterations` times

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
"""

import numpy as np
import tensorflow as tf

from syq_tf.quantizers._common import sign_pm1

MODES = ("binary", "ternary", "ternary_exact", "ternary_two_scale", "linear", "log")
LAQ_KINDS = ("linear", "log")
MIN_BITS, MAX_BITS = 2, 8


# ------------------------------------------------------------------------------------------------
# Argument checks (Python-level, static).


def _check_bits(bits, owner):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{owner}: bits={bits!r} must be an integer in {MIN_BITS}..{MAX_BITS} (k = 2^(bits-1) - 1 "
            "non-zero magnitudes per sign)."
        )


def _check_kind(kind, owner):
    if kind not in LAQ_KINDS:
        raise ValueError(f"{owner}: unknown level kind {kind!r}; allowed: {LAQ_KINDS}.")


def _check_iterations(iterations, minimum, owner):
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < minimum:
        raise ValueError(f"{owner}: iterations={iterations!r} must be an integer >= {minimum}.")


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
    """Exact ternary search on magnitudes a = |w| >= 0: (alpha [g, 1], support bool [g, n])."""
    order = tf.argsort(a, axis=-1, direction="DESCENDING", stable=True)
    a_sorted = tf.gather(a, order, axis=1, batch_dims=1)
    d_sorted = tf.gather(d, order, axis=1, batch_dims=1)
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
        tf.where(usable, score, tf.constant(-float("inf"), a.dtype)), axis=-1, output_type=tf.int32
    )[:, None]
    any_usable = tf.reduce_any(usable, axis=-1, keepdims=True)
    alpha = tf.where(any_usable, tf.gather(alpha_k, best, axis=1, batch_dims=1), tf.zeros_like(half[:, :1]))
    cut = tf.gather(a_sorted, best, axis=1, batch_dims=1)  # a_k of the chosen k
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


def lat_approx_project(w, d, support=None, iterations=10):
    """Approximate loss-aware ternarization: alternate alpha = sum_S d|w| / sum_S d and the threshold
    rule S = {|w| > alpha/2}, starting from ``support`` (bool [g, n]; default: w != 0, typically the
    previous step's support), at most ``iterations`` threshold steps, stopping at a fixed point.

    Returns (alpha [g, 1], Q [g, n], support bool [g, n]); alpha is the optimal scale of the returned
    support, Q = alpha sign(w) on it. ``iterations=0`` returns the starting point. The weighted error
    never increases along the iteration; at a fixed point the support equals {|w| > alpha/2}.
    """
    owner = "lat_approx_project"
    _check_iterations(iterations, 0, owner)
    w, d = _inputs(w, d, owner)
    a = tf.abs(w)
    if support is None:
        support = a > 0
    else:
        support = tf.convert_to_tensor(support)
        if not w.shape.is_compatible_with(support.shape):
            raise ValueError(f"{owner}: support has shape {support.shape} but w has shape {w.shape}.")
        support = tf.cast(support, tf.bool)

    if iterations > 0:

        def body(step, current, _changed):
            new = a > 0.5 * _support_scale(a, d, current)
            return step + 1, new, tf.reduce_any(tf.not_equal(new, current))

        _, support, _ = tf.while_loop(
            lambda _step, _current, changed: changed,
            body,
            (tf.constant(0), support, tf.constant(True)),
            maximum_iterations=iterations,
        )
    alpha = _support_scale(a, d, support)
    return alpha, _ternary_from_support(w, alpha, support), support


def lat2_project(w, d, exact=True, support=None, iterations=10):
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
    sides = tf.concat([tf.where(positive, w, zero), tf.where(negative, -w, zero)], axis=0)  # [2g, n]
    d2 = tf.concat([d, d], axis=0)
    if exact:
        alpha, support2 = _lat_exact_scale(sides, d2)
        q = tf.where(support2, alpha * tf.ones_like(sides), tf.zeros_like(sides))
    else:
        start = None
        if support is not None:
            support = tf.convert_to_tensor(support)
            if not w.shape.is_compatible_with(support.shape):
                raise ValueError(f"{owner}: support has shape {support.shape} but w has shape {w.shape}.")
            support = tf.cast(support, tf.bool)
            start = tf.concat([tf.logical_and(support, positive), tf.logical_and(support, negative)], axis=0)
        alpha, q, _ = lat_approx_project(sides, d2, support=start, iterations=iterations)
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


def laq_project(w, d, bits, kind="linear", iterations=10, alpha0=None):
    """Loss-aware m-bit quantization of every row of w [g, n] (curvature d [g, n], d > 0).

    Levels alpha * {0, +-l_1, ..., +-1} (:func:`laq_levels`). Starting from ``alpha0`` (scalar, [g] or
    [g, 1]; default and for rows where alpha0 <= 0: max|w| of the row), each step assigns every |w|/alpha
    to the nearest magnitude level (halfway -> the smaller one; sign from w) and then sets
    alpha = sum d b w / sum d b^2; at most ``iterations`` (>= 1) steps, stopping early at a fixed
    point. Returns (alpha [g, 1], Q [g, n]), Q = alpha b. The weighted error never increases.
    """
    owner = "laq_project"
    levels_np = laq_levels(bits, kind)
    _check_iterations(iterations, 1, owner)
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
        bounds = tf.broadcast_to(midpoints, tf.stack([tf.shape(a)[0], tf.size(midpoints)]))
        index = tf.searchsorted(bounds, u, side="left")  # number of midpoints strictly below u
        return tf.gather(levels, index)

    def body(step, scale, level, _changed):
        new_level = assign(scale)
        num = tf.reduce_sum(d * new_level * a, axis=-1, keepdims=True)  # sum d b w  (b w = l |w|)
        den = tf.reduce_sum(d * new_level * new_level, axis=-1, keepdims=True)  # sum d b^2
        new_scale = tf.where(den > 0, num / tf.where(den > 0, den, tf.ones_like(den)), scale)
        return step + 1, new_scale, new_level, tf.reduce_any(tf.not_equal(new_level, level))

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
            f"{owner}: mode {mode!r} has a fixed bit width; bits={bits!r} must not be given (bits are "
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
