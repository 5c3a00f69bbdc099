"""Least-squares binary quantization (Pouransari, Tu, Tuzel, CVPR-W 2020).

See ../shared/METHODS.md §3. A row x (length n) is approximated by sum_i v_i b_i, b_i in {-1,+1}^n,
v_i > 0. The scalars are recomputed in closed form from the current tensor at every step and get no
gradient (tf.stop_gradient). sign(0) := +1. Rows are subgroups: [groups, n].

    ls1 (1 bit):   v = mean|x|                               Q = v sign(x)
    gf-k (k bits): r_0 = x;  v_i = mean|r_{i-1}|,  b_i = sign(r_{i-1}),  r_i = r_{i-1} - v_i b_i
                   Q = sum_i v_i b_i                         (greedy, foldable; modes gf2, gf3, gf4)
    ls2 (2 bits):  b1 = sign(x),  b2 = b1 sign(|x| - v1)     Q = v1 b1 + v2 b2
                   magnitude levels: |x| >= v1 -> v1 + v2,  |x| < v1 -> v1 - v2
    lsT (ternary): Q = 0 where |x| < v,  2v sign(x) where |x| >= v      (levels {0, +-2v})

Optimal ls2 / lsT scalars, O(n log n): a = sort(|x|) ascending, S_i = a_1 + ... + a_i (S_0 = 0).
A split i puts a_1..a_i in the low cluster, a_{i+1}..a_n in the high one:

    m_lo(i) = S_i / i,   m_hi(i) = (S_n - S_i) / (n - i)
    ls2 candidates:  v1 = (m_lo + m_hi)/2, v2 = (m_hi - m_lo)/2     for i = 1..n-1
                     v1 = v2 = m_hi/2  (low level 0, boundary v1 = v2)  for i = 0..n-1
    lsT candidates:  v = m_hi/2                                      for i = 0..n-1
    consistent split: a_i < v1 <= a_{i+1}   (lsT: a_i < v <= a_{i+1}; a_0 = -inf, a_{n+1} = +inf)
    squared error at split i with magnitude levels L (low), H (high):
        E = ||x||^2 - 2 L S_i + i L^2 - 2 H (S_n - S_i) + (n - i) H^2
    keep consistent candidates, pick the least E (||x||^2 is common to all candidates and is left
    out of the comparison, so no prefix sums of squares are needed)

Robustness: consistency is tested as a_i <= v1 <= a_{i+1} (closed); at an exact tie a_i = v1 the
point is at distance v2 from both levels, so E is still the true error, and the closed test
tolerates float rounding of v1 at a tie. The rule assigns every |x| to the nearer of its two
magnitude levels (threshold at their midpoint), so the true error of any candidate is at most its E;
the least E is the optimum, and the chosen candidate attains it. Hence if rounding leaves a row
without a consistent candidate, the least-E candidate among all is taken (a safety net, still
optimal up to rounding). Candidates with v2 <= 0 (lsT: v <= 0) are invalid; a row with no valid
candidate at all is all zeros: scalars 0, Q = 0 (no division by zero, no NaN). An all-equal row c
gets v1 = v2 = |c|/2 (lsT: v = |c|/2), so Q = x (up to float rounding of the cluster means).

ls2 tie rule: the paper's bit is b2 = sign(x - v1 b1); it differs from b1 sign(|x| - v1) only when
|x| = v1 exactly and x < 0. At such a tie both levels are at distance v2, so the error is the same;
the form above keeps Q odd (Q(-x) = -Q(x)) and matches the split used in the search ("|x| >= v1 is
high").

Straight-through estimators (the forward uses the closed-form scalars, backward ignores them):
    backward="ste" (default):
    weights:      dL/dw = g                                              (identity)
    activations:  x_c = clip(x, -c, c),  dL/dx = g where -c <= x <= c, 0 outside
                  c = 2 for ls1 / lsT, 3 for ls2 / gf-k (default; ``clip=`` overrides)
    backward="official" (the authors' code: Q = sum_i v_i b_i, a straight-through sign per term,
    each scaled by its v_i and zero outside [-1, 1]), weights and activations alike:
                  dL/dx = (sum_i v_i) g where |x| <= 1, 0 outside
                  sum_i v_i: ls1 v, ls2 v1 + v2, lsT 2v (two terms v b1 + v b2), gf-k v_1 + ... + v_k

Subgroups: weights share one set of scalars per output channel (``granularity="channel"``) or per
kernel (``"layer"``); activations one set per sample (all non-batch axes).
"""

import tensorflow as tf

from syq_tf.quantizers._common import (
    is_int,
    is_real,
    ActivationQuantizer,
    WeightQuantizer,
    register,
    from_groups,
    shown,
    sign_pm1,
    subgroup_reduce_axes,
    to_groups,
)

MODES = ("ls1", "ls2", "lsT", "gf2", "gf3", "gf4")
GRANULARITIES = ("layer", "channel")
# bit width of a mode (lsT is ternary: 2 bits of storage)
MODE_BITS = {"ls1": 1, "ls2": 2, "lsT": 2, "gf2": 2, "gf3": 3, "gf4": 4}
# number of scalars per subgroup: ls1 (v,), ls2 (v1, v2), lsT (v,), gf-k (v_1..v_k)
NUM_SCALARS = {"ls1": 1, "ls2": 2, "lsT": 1, "gf2": 2, "gf3": 3, "gf4": 4}
# default activation clip c (the window [-c, c])
DEFAULT_CLIP = {"ls1": 2.0, "lsT": 2.0, "ls2": 3.0, "gf2": 3.0, "gf3": 3.0, "gf4": 3.0}


def _check_mode(mode, owner="least_squares"):
    if mode not in MODES:
        raise ValueError(f"{owner}: unknown mode {mode!r}; allowed: {MODES}.")


# ------------------------------------------------------------------------------------------------
# Closed-form scalars on 2-D tensors [groups, n]; no gradient.


def ls1_scalars(x2d):
    """Optimal 1-bit scalar per row: v = mean|x|, shape [g, 1]."""
    x2d = tf.stop_gradient(tf.convert_to_tensor(x2d))
    return tf.reduce_mean(tf.abs(x2d), axis=-1, keepdims=True)


def greedy_scalars(x2d, k):
    """Greedy foldable scalars v_1..v_k per row (gf-k), shape [g, k]."""
    if not is_int(k) or k < 1:
        raise ValueError(f"greedy_scalars: k={k!r} must be a positive integer (number of bits).")
    r = tf.stop_gradient(tf.convert_to_tensor(x2d))
    scalars = []
    for _ in range(k):  # loop over bits, not elements
        v = tf.reduce_mean(tf.abs(r), axis=-1, keepdims=True)
        r = r - v * sign_pm1(r)
        scalars.append(v)
    return tf.concat(scalars, axis=-1)


def _sorted_prefix(x2d):
    """a = sort(|x|) ascending [g, n]; S = [0, cumsum(a)] [g, n+1]; n (scalar int32 tensor)."""
    a = tf.sort(tf.abs(tf.stop_gradient(tf.convert_to_tensor(x2d))), axis=-1)
    s = tf.concat([tf.zeros_like(a[:, :1]), tf.cumsum(a, axis=-1)], axis=-1)
    return a, s, tf.shape(a)[-1]


def _split_means(s, n):
    """Split index i = 0..n, cluster means m_lo(i), m_hi(i) (0 where a cluster is empty)."""
    dtype = s.dtype
    i = tf.range(n + 1)
    count_lo = tf.cast(i, dtype)
    count_hi = tf.cast(n - i, dtype)
    total = s[:, -1:]
    m_lo = s / tf.maximum(count_lo, 1.0)
    m_hi = (total - s) / tf.maximum(count_hi, 1.0)
    return i, m_lo, m_hi


def _split_objective(s, n, i, low, high):
    """Squared error minus ||x||^2 of magnitude levels ``low`` (a_1..a_i) and ``high`` (a_{i+1}..a_n)
    at split i: -2 L S_i + i L^2 - 2 H (S_n - S_i) + (n - i) H^2 (the sum of squares cancels)."""
    count_lo = tf.cast(i, s.dtype)
    count_hi = tf.cast(n - i, s.dtype)
    total = s[:, -1:]
    return -2.0 * low * s + count_lo * low * low - 2.0 * high * (total - s) + count_hi * high * high


def _consistent(a, threshold):
    """a_i <= threshold <= a_{i+1} for split i = 0..n (a_0 = -inf, a_{n+1} = +inf), [g, n+1]."""
    inf = tf.fill(tf.shape(a[:, :1]), tf.constant(float("inf"), a.dtype))
    below = tf.concat([-inf, a], axis=-1)
    above = tf.concat([a, inf], axis=-1)
    return tf.logical_and(below <= threshold, threshold <= above)


def _best(objective, valid, fallback, values):
    """Per row, the entries of each tensor in ``values`` [g, m] at the candidate of least objective
    among ``valid`` ones, or among ``fallback`` ones if no candidate of the row is valid; 0 for rows
    with neither (all-zero rows). Each result has shape [g, 1]."""
    inf = tf.constant(float("inf"), objective.dtype)
    any_valid = tf.reduce_any(valid, axis=-1, keepdims=True)
    usable = tf.where(any_valid, valid, fallback)
    idx = tf.argmin(tf.where(usable, objective, inf), axis=-1, output_type=tf.int32)[:, None]
    any_usable = tf.reduce_any(usable, axis=-1, keepdims=True)
    return [
        tf.where(any_usable, tf.gather(v, idx, axis=1, batch_dims=1), tf.zeros_like(v[:, :1]))
        for v in values
    ]


def ls2_scalars(x2d):
    """Optimal 2-bit scalars (v1, v2) per row, shape [g, 2] (module docstring)."""
    a, s, n = _sorted_prefix(x2d)
    i, m_lo, m_hi = _split_means(s, n)
    interior = tf.logical_and(i >= 1, i <= n - 1)[None, :]  # both clusters non-empty
    boundary = (i <= n - 1)[None, :]  # high cluster non-empty, low level 0 (v1 = v2); i = 0 included
    candidates = []
    for low, defined in ((m_lo, interior), (tf.zeros_like(m_lo), boundary)):
        v1 = 0.5 * (low + m_hi)
        v2 = 0.5 * (m_hi - low)
        usable = tf.logical_and(defined, v2 > 0)
        candidates.append(
            (v1, v2, tf.logical_and(usable, _consistent(a, v1)), usable, _split_objective(s, n, i, low, m_hi))
        )
    v1, v2, valid, fallback, objective = (tf.concat(parts, axis=-1) for parts in zip(*candidates))
    best_v1, best_v2 = _best(objective, valid, fallback, [v1, v2])
    return tf.concat([best_v1, best_v2], axis=-1)


def lsT_scalars(x2d):  # noqa: N802  (mode name)
    """Optimal ternary scalar v per row (levels {0, +-2v}), shape [g, 1] (module docstring)."""
    a, s, n = _sorted_prefix(x2d)
    i, _, m_hi = _split_means(s, n)
    v = 0.5 * m_hi
    usable = tf.logical_and((i <= n - 1)[None, :], v > 0)
    valid = tf.logical_and(usable, _consistent(a, v))
    objective = _split_objective(s, n, i, tf.zeros_like(m_hi), m_hi)
    (best_v,) = _best(objective, valid, usable, [v])
    return best_v


# ---- the same optimum without sorting whole rows (long rows: per-sample activations) -----------
#
# Both searches pick the split i (low cluster = the i smallest |x|) maximising
#     ls2:  F(i) = S_i^2 / i + (S_n - S_i)^2 / (n - i)      (i = 0: the v1 = v2 boundary)
#     lsT:  F(i) = (S_n - S_i)^2 / (n - i)
# which is minimising the squared error E = ||x||^2 - F. An optimal split is consistent (a_i <=
# v1 <= a_{i+1}), and v1(i) = (m_lo + m_hi)/2 (lsT: m_hi/2) never decreases with i. So after a
# histogram of |x| (counts, sums, min and max per bin; bins are contiguous runs of the sorted
# values) every split between bins is scored exactly from the bin prefix sums, and a split inside
# bin j can only be optimal if [v1 at the bin's first split, v1 at its last split] meets
# the bin's value range [j, j+1] / scale. Only the run of such bins is sorted (top_k of the masked
# row). If that run holds more than ``kmax`` values the full sort runs instead (tf.cond), so the
# result is the exact optimum either way.

HIST_MIN_N = 2048  # rows at least this long use the histogram search ("auto")
HIST_BINS = 4096


def _split_score(s, i, total, n, mode):
    """F(i) from prefix sum s and (float) count i; -inf where the split is not allowed."""
    n_hi = n - i
    hi = total - s
    score = hi * hi / tf.maximum(n_hi, 1.0)
    if mode == "ls2":
        score += s * s / tf.maximum(i, 1.0)
    return tf.where(n_hi > 0, score, tf.constant(-float("inf"), s.dtype))


def _level_at(s, i, total, n, mode):
    """v1 (ls2) or v (lsT) of split (s, i) (m_lo := 0 for an empty low cluster)."""
    m_hi = (total - s) / tf.maximum(n - i, 1.0)
    if mode == "lsT":
        return 0.5 * m_hi
    return 0.5 * (s / tf.maximum(i, 1.0) + m_hi)


def _scalars_from_split(s, i, total, n, mode):
    m_lo = s / tf.maximum(i, 1.0)
    m_hi = (total - s) / tf.maximum(n - i, 1.0)
    if mode == "lsT":
        return 0.5 * m_hi
    return tf.concat([0.5 * (m_lo + m_hi), 0.5 * (m_hi - m_lo)], axis=-1)


def _histogram_search(x2d, mode, bins=HIST_BINS, kmax=None):
    """(scalars, ok): the optimum over splits between histogram bins and inside the run of bins
    that can hold a consistent split; ok is False if that run held more than ``kmax`` values."""
    a = tf.abs(tf.stop_gradient(tf.convert_to_tensor(x2d)))
    dtype = a.dtype
    n_int = int(a.shape[-1])
    n = tf.constant(float(n_int), dtype)
    if kmax is None:
        kmax = max(256, 16 * -(-n_int // bins))
    kmax = min(kmax, n_int)
    g = tf.shape(a)[0]
    top = tf.reduce_max(a, axis=-1, keepdims=True)
    scale = tf.where(top > 0, bins / tf.where(top > 0, top, tf.ones_like(top)), tf.zeros_like(top))
    b = tf.minimum(tf.cast(tf.floor(a * scale), tf.int32), bins - 1)  # nondecreasing in |x|
    seg = b + tf.range(g)[:, None] * bins
    counts = tf.reshape(tf.math.unsorted_segment_sum(tf.ones_like(a), seg, g * bins), [g, bins])
    sums = tf.reshape(tf.math.unsorted_segment_sum(a, seg, g * bins), [g, bins])
    total = tf.reduce_sum(sums, axis=-1, keepdims=True)
    start_i = tf.cumsum(counts, axis=-1, exclusive=True)  # split before bin j
    start_s = tf.cumsum(sums, axis=-1, exclusive=True)
    end_i, end_s = start_i + counts, start_s + sums  # split after bin j

    # Bins that may hold the optimal split inside them: their values lie in [j, j+1] / scale.
    index = tf.range(bins)[None, :]
    width = tf.where(scale > 0, 1.0 / tf.where(scale > 0, scale, tf.ones_like(scale)), tf.zeros_like(scale))
    slack = 1e-5 * top
    low = tf.cast(index, dtype) * width - slack
    high = tf.cast(index + 1, dtype) * width + slack
    v_first = _level_at(start_s, start_i, total, n, mode)
    # last split inside the bin: before its largest value (the row maximum, for the last bin)
    v_last = tf.where(end_i < n, _level_at(end_s, end_i, total, n, mode),
                      _level_at(total - top, n - 1.0, total, n, mode))
    inside = (counts >= 2) & (v_first <= high) & (v_last >= low)
    any_inside = tf.reduce_any(inside, axis=-1)
    j_lo = tf.reduce_min(tf.where(inside, index, bins), axis=-1)
    j_hi = tf.reduce_max(tf.where(inside, index, -1), axis=-1)
    j_lo, j_hi = tf.where(any_inside, j_lo, 0), tf.where(any_inside, j_hi, 0)
    run_start_i = tf.gather(start_i, j_lo[:, None], batch_dims=1)
    run_start_s = tf.gather(start_s, j_lo[:, None], batch_dims=1)
    run_count = tf.gather(end_i, j_hi[:, None], batch_dims=1) - run_start_i
    run_count = tf.where(any_inside[:, None], run_count, tf.zeros_like(run_count))
    ok = tf.reduce_all(run_count <= kmax)

    # Sort only the run (its kmax smallest values, ascending) and score every split inside it.
    member = (b >= j_lo[:, None]) & (b <= j_hi[:, None]) & any_inside[:, None]
    neg_inf = tf.fill(tf.shape(a), tf.constant(-float("inf"), dtype))
    smallest = -tf.math.top_k(tf.where(member, -a, neg_inf), k=kmax).values
    k = tf.range(1, kmax + 1, dtype=dtype)[None, :]
    real = k <= run_count
    prefix = tf.cumsum(tf.where(real, smallest, tf.zeros_like(smallest)), axis=-1)
    s_in = tf.where(real, run_start_s + prefix, tf.zeros_like(prefix))
    i_in = tf.where(real, run_start_i + k, tf.fill(tf.shape(prefix), tf.cast(n, dtype)))  # i = n: no split

    # ... together with every split between bins (scored exactly from the bin prefix sums)
    s_all = tf.concat([start_s, s_in], axis=-1)
    i_all = tf.concat([start_i, i_in], axis=-1)
    best = tf.argmax(_split_score(s_all, i_all, total, n, mode), axis=-1, output_type=tf.int32)[:, None]
    s_best = tf.gather(s_all, best, batch_dims=1)
    i_best = tf.gather(i_all, best, batch_dims=1)
    return _scalars_from_split(s_best, i_best, total, n, mode), ok


def _use_histogram(x2d, search):
    if search not in ("auto", "sort", "histogram"):
        raise ValueError(f"least_squares: search={search!r}; allowed: 'auto', 'sort', 'histogram'.")
    n = tf.TensorShape(x2d.shape)[-1]
    if search == "sort" or n is None:
        return False
    return search == "histogram" or n >= HIST_MIN_N


def _optimal_scalars(x2d, mode, search, sorted_search):
    x2d = tf.convert_to_tensor(x2d)
    if not _use_histogram(x2d, search):
        return sorted_search(x2d)
    scalars, ok = _histogram_search(x2d, mode)
    return tf.cond(ok, lambda: scalars, lambda: sorted_search(x2d))


def least_squares_scalars(x2d, mode, search="auto"):
    """The scalars of ``mode`` for every row of ``x2d`` [g, n]: shape [g, NUM_SCALARS[mode]].

    ``search`` (ls2, lsT): "sort" sorts every row; "histogram" brackets the optimum with a
    histogram and sorts only the bins that can hold it (falling back to "sort" when that cannot
    be decided); both give the exact optimum. "auto" uses the histogram for rows of at least
    HIST_MIN_N values."""
    _check_mode(mode)
    if mode == "ls1":
        return ls1_scalars(x2d)
    if mode == "ls2":
        return _optimal_scalars(x2d, mode, search, ls2_scalars)
    if mode == "lsT":
        return _optimal_scalars(x2d, mode, search, lsT_scalars)
    return greedy_scalars(x2d, MODE_BITS[mode])


def reconstruct(x2d, scalars, mode):
    """Apply the bit-assignment rule of ``mode`` with given scalars [g or 1, k] to x2d [g, n]."""
    _check_mode(mode)
    x2d = tf.convert_to_tensor(x2d)
    scalars = tf.cast(scalars, x2d.dtype)
    sign = sign_pm1(x2d)
    if mode == "ls1":
        return scalars[:, 0:1] * sign
    if mode == "lsT":
        v = scalars[:, 0:1]
        return tf.where(tf.abs(x2d) < v, tf.zeros_like(x2d), 2.0 * v * sign)
    if mode == "ls2":
        v1, v2 = scalars[:, 0:1], scalars[:, 1:2]
        b2 = sign * sign_pm1(tf.abs(x2d) - v1)
        return v1 * sign + v2 * b2
    # gf-k: greedy residual signs with fixed v_i
    r = x2d
    q = tf.zeros_like(x2d)
    for bit in range(MODE_BITS[mode]):
        step = scalars[:, bit : bit + 1] * sign_pm1(r)
        q = q + step
        r = r - step
    return q


def least_squares_quantize(x2d, mode):
    """Forward only: Q of every row of x2d [g, n] with its own closed-form scalars."""
    return reconstruct(x2d, least_squares_scalars(x2d, mode), mode)


BACKWARDS = ("ste", "official")


def _check_backward(backward, owner):
    if backward not in BACKWARDS:
        raise ValueError(
            f"{owner}: backward={backward!r}; allowed: 'ste' (g, inside the clip window for activations) "
            "or 'official' ((sum of the scalars) * g where |x| <= 1, the authors' code)."
        )


def term_scale(scalars, mode):
    """sum_i v_i of Q = sum_i v_i b_i per row, [g, 1]: ls1 v, ls2 v1 + v2, lsT 2v, gf-k v_1 + ... + v_k."""
    if mode == "lsT":
        return 2.0 * scalars[:, 0:1]
    return tf.reduce_sum(scalars, axis=-1, keepdims=True)


def least_squares_ste(x2d, mode, clip=None, scalars=None, backward="ste"):
    """Q with a straight-through gradient.

    ``backward="ste"``: ``clip=None`` (weights): dL/dx = g. ``clip=c`` (activations): x is clipped to
    [-c, c] first and dL/dx = g inside the window, 0 outside. ``backward="official"``:
    dL/dx = (sum_i v_i) g where |x| <= 1, 0 outside (:func:`term_scale`; the forward still clips to
    [-c, c]). ``scalars`` [g or 1, k] are used instead of the per-row closed form when given (e.g.
    moving averages). No gradient reaches the scalars either way.
    """
    _check_mode(mode)
    _check_backward(backward, "least_squares_ste")
    x2d = tf.convert_to_tensor(x2d)
    if clip is not None:
        clip = tf.cast(clip, x2d.dtype)
    if scalars is None:
        clipped = x2d if clip is None else tf.clip_by_value(x2d, -clip, clip)
        scalars = least_squares_scalars(clipped, mode)
    scalars = tf.stop_gradient(tf.cast(scalars, x2d.dtype))

    @tf.custom_gradient
    def _ste(x, v):
        xc = x if clip is None else tf.clip_by_value(x, -clip, clip)
        q = reconstruct(xc, v, mode)

        def grad(g):
            if backward == "official":
                window = tf.abs(x) <= tf.cast(1.0, x.dtype)
                return tf.where(window, term_scale(v, mode) * g, tf.zeros_like(g)), tf.zeros_like(v)
            if clip is None:
                return g, tf.zeros_like(v)
            inside = tf.abs(x) <= clip
            return tf.where(inside, g, tf.zeros_like(g)), tf.zeros_like(v)

        return q, grad

    return _ste(x2d, scalars)


# ------------------------------------------------------------------------------------------------
# Reshaping to / from rows.


# ------------------------------------------------------------------------------------------------
# Keras quantizers.


@register(alias="least_squares")
class LeastSquares(WeightQuantizer):
    """Least-squares weight quantizer, ``mode`` in ls1, ls2, lsT, gf2, gf3, gf4 (module docstring).

    One set of closed-form scalars per output channel (``granularity="channel"``, default) or per
    kernel (``"layer"``); nothing is trained, so there are no weights. Straight-through (identity)
    gradient (``backward="ste"``, default) or the authors' (``backward="official"``: the sum of the
    scalars times g where |w| <= 1; README, Fidelity). ``depthwise=True`` marks a DepthwiseConv2D
    kernel ``[kh, kw, c_in, mult]`` so that ``channel`` means one set per (c_in, mult);
    ``transposed=True`` a Conv1DTranspose / Conv2DTranspose kernel ``[.., c_out, c_in]`` (one set per
    c_out, axis -2). ``syq_tf.quantize`` and ``quantize_model`` set both.
    """

    def __init__(self, mode="ls1", granularity="channel", depthwise=False, backward="ste", transposed=False,
                 **kwargs):
        name = kwargs.get("name", "")
        _check_mode(mode, owner=f"LeastSquares {name!s}")
        _check_backward(backward, f"LeastSquares {name!s}".rstrip())
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"LeastSquares {name!s}: unknown granularity {granularity!r}; allowed: "
                f"{GRANULARITIES} (least-squares scalars are per output channel or per layer)."
            )
        super().__init__(**kwargs)
        self.mode = mode
        self.granularity = granularity
        self.depthwise = bool(depthwise)
        self.transposed = bool(transposed)
        self.backward = backward
        self.bits = MODE_BITS[mode]
        self.precision = MODE_BITS[mode]

    def reduce_axes(self, kernel_shape):
        return subgroup_reduce_axes(
            self.granularity, kernel_shape, self.depthwise, owner=f"LeastSquares quantizer '{self.name}'",
            transposed=self.transposed,
        )

    def call(self, inputs):
        w = tf.convert_to_tensor(inputs)
        reduce_axes = self.reduce_axes(w.shape)
        w2d, perm = to_groups(w, reduce_axes)
        q2d = least_squares_ste(w2d, self.mode, backward=self.backward)
        return from_groups(q2d, w.shape, perm)

    def get_config(self):
        return {
            **super().get_config(),
            "mode": self.mode,
            "granularity": self.granularity,
            "depthwise": self.depthwise,
            "transposed": self.transposed,
            "backward": self.backward,
        }


@register(alias="least_squares_activation")
class LeastSquaresActivation(ActivationQuantizer):
    """Least-squares activation quantizer: clip to [-c, c], then one set of scalars per sample.

    ``clip``: c > 0 (default 2 for ls1 / lsT, 3 for ls2 / gf-k). Gradient (``backward="ste"``,
    default): identity inside [-c, c], 0 outside; ``backward="official"``: the sum of the scalars
    times g where |x| <= 1 (the authors' code; README, Fidelity).

    ``momentum=None`` (default): per-sample scalars always, in training and inference.
    ``momentum`` in (0, 1): in training, per-sample scalars are used and the batch mean of them
    updates ``moving_scalars`` (shape [k]) as ``moving = momentum * moving + (1 - momentum) * mean``
    (Keras BatchNorm convention); the first training batch assigns the mean directly, and
    ``moving_initialized`` turns True. At inference (training False/None) the moving averages are
    used with the same bit-assignment rule (ls2: levels v1 +- v2 split at v1; gf-k: greedy residual
    signs with fixed v_i; lsT: 0 if |x| < v else +-2v). Before any training batch has been seen,
    inference falls back to per-sample scalars (so a fresh model never quantizes with zeros).

    :meth:`export_range` is the clip window (-c, c): the int8 export replaces the least-squares
    levels by an int8 grid on that window (an approximation). ls1 / ls2 / lsT levels lie inside
    the window; gf-k levels sum_i v_i can exceed c slightly (at most 2c).
    """

    def __init__(self, mode="ls1", clip=None, momentum=None, backward="ste", **kwargs):
        name = kwargs.get("name", "")
        owner = f"LeastSquaresActivation {name!s}"
        _check_mode(mode, owner=owner)
        _check_backward(backward, owner.rstrip())
        if clip is None:
            clip = DEFAULT_CLIP[mode]
        if (
            not is_real(clip)
            or not 0.0 < float(clip) < float("inf")
        ):
            raise ValueError(f"{owner}: clip={shown(clip)!r} must be a finite number > 0 (window [-clip, clip]).")
        if momentum is not None and (
            not is_real(momentum)
            or not 0.0 < float(momentum) < 1.0
        ):
            raise ValueError(
                f"{owner}: momentum={shown(momentum)!r} must be None (per-sample scalars always) or a number "
                "in (0, 1) (moving average of the scalars for inference)."
            )
        super().__init__(**kwargs)
        self.mode = mode
        self.clip = float(clip)
        self.momentum = None if momentum is None else float(momentum)
        self.backward = backward
        self.bits = MODE_BITS[mode]
        self.precision = MODE_BITS[mode]
        self.num_scalars = NUM_SCALARS[mode]

    def build(self, input_shape):
        if self.momentum is not None:
            self.moving_scalars = self.add_weight(
                name="moving_scalars", shape=(self.num_scalars,), initializer="zeros", trainable=False
            )
            self.moving_initialized = self.add_weight(
                name="moving_initialized", shape=(), dtype=tf.bool, initializer="zeros", trainable=False
            )
        super().build(input_shape)

    def _per_sample(self, x2d):
        return least_squares_scalars(tf.clip_by_value(x2d, -self.clip, self.clip), self.mode)

    def _training_scalars(self, x2d):
        scalars = self._per_sample(x2d)
        batch_mean = tf.cast(tf.reduce_mean(scalars, axis=0), self.moving_scalars.dtype)
        updated = tf.where(
            self.moving_initialized,
            self.momentum * self.moving_scalars + (1.0 - self.momentum) * batch_mean,
            batch_mean,
        )
        update = self.moving_scalars.assign(updated)
        flag = self.moving_initialized.assign(True)
        with tf.control_dependencies([update, flag]):
            return tf.identity(scalars)

    def _inference_scalars(self, x2d):
        def moving():
            return tf.cast(self.moving_scalars, x2d.dtype)[None, :] * tf.ones_like(x2d[:, :1])

        return tf.cond(tf.convert_to_tensor(self.moving_initialized), moving, lambda: self._per_sample(x2d))

    def call(self, inputs, training=None):
        x = tf.convert_to_tensor(inputs)
        shape = tf.shape(x)
        features = x.shape[1:].num_elements()  # static when known: the search picks its method by it
        x2d = tf.reshape(x, [-1, features] if features else tf.stack([shape[0], -1]))
        if self.momentum is None:
            scalars = None
        elif training is None or not tf.is_tensor(training):
            scalars = (self._training_scalars if bool(training) else self._inference_scalars)(x2d)
        else:
            scalars = tf.cond(
                tf.cast(training, tf.bool),
                lambda: self._training_scalars(x2d),
                lambda: self._inference_scalars(x2d),
            )
        q2d = least_squares_ste(x2d, self.mode, clip=self.clip, scalars=scalars, backward=self.backward)
        return tf.reshape(q2d, shape)

    def export_range(self):
        return -self.clip, self.clip

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "clip": self.clip, "momentum": self.momentum,
                "backward": self.backward}
