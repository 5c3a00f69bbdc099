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

from syq_tf.quantizers import native
from syq_tf.quantizers._common import (
    is_int,
    is_real,
    ActivationQuantizer,
    WeightQuantizer,
    owner_name,
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
    """a = sort(|x|) ascending [g, n]; S = [0, cumsum(a)] [g, n+1]; n (scalar int32 tensor).

    In float64 (any input float type): the objectives of neighbouring splits differ by far less
    than float32's rounding of S (a float32 cumsum picked a split with a higher error than the
    optimum on 700 N(0, 1) values), and the histogram search scores in float64 too."""
    a = tf.sort(tf.abs(tf.cast(tf.stop_gradient(tf.convert_to_tensor(x2d)), tf.float64)), axis=-1)
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
    x2d = tf.convert_to_tensor(x2d)
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
    return tf.cast(tf.concat([best_v1, best_v2], axis=-1), x2d.dtype)


def lsT_scalars(x2d):  # noqa: N802  (mode name)
    """Optimal ternary scalar v per row (levels {0, +-2v}), shape [g, 1] (module docstring)."""
    x2d = tf.convert_to_tensor(x2d)
    a, s, n = _sorted_prefix(x2d)
    i, _, m_hi = _split_means(s, n)
    v = 0.5 * m_hi
    usable = tf.logical_and((i <= n - 1)[None, :], v > 0)
    valid = tf.logical_and(usable, _consistent(a, v))
    objective = _split_objective(s, n, i, tf.zeros_like(m_hi), m_hi)
    (best_v,) = _best(objective, valid, usable, [v])
    return tf.cast(best_v, x2d.dtype)


# ---- the same optimum without sorting (long rows: per-sample activations) ---------------------
#
# Both searches pick the split i (low cluster = the i smallest |x|) maximising
#     ls2:  F(i, S_i) = S_i^2 / i + (S_n - S_i)^2 / (n - i)      (i = 0: the v1 = v2 boundary)
#     lsT:  F(i, S_i) = (S_n - S_i)^2 / (n - i)
# which is minimising the squared error E = ||x||^2 - F (the optimal split is consistent, so no
# consistency test is needed). F is jointly convex in (i, s) (each term is the perspective of a
# square). No row is sorted; two histograms (each one scatter pass over the row; count and sum
# accumulated in float64, so the prefix sums are exact for float32 data up to float64 rounding):
#   1. ``bins`` equal bins on [0, max|x|] (n // 16, 256 to 2048). Bins are contiguous runs of
#      the sorted values, so every split between bins is scored exactly from the prefix sums.
#      Inside bin j (start split (i0, s0), count c, sum t, values in [lo, hi]) the points
#      (i, S_i) lie in the triangle (i0, s0), (i0 + c, s0 + t), P, where P is where the lines
#      s0 + (i - i0) lo and s0 + t - (i0 + c - i) hi meet (S_i is convex in i: sorted values).
#      A convex function is largest at a vertex, so F(P) bounds every split inside the bin. Bins
#      whose bound is below the best split between bins (less a rounding margin) cannot hold the
#      optimum; the rest (one to three neighbouring bins on the benchmark data) span the run.
#   2. ``subbins`` equal sub-bins over the run's values (count, sum and max per sub-bin; the run
#      starts at the split before its first bin): every split between sub-bins and the one
#      before each sub-bin's largest value is scored exactly. That is every split inside a
#      sub-bin of at most 2 values, or of equal values (F is convex along their line);
#      otherwise the same triangle bound (values in [lower edge, max]) must be below the best
#      split found.
# A row that is not decided that way (a sub-bin of several distinct values close enough to the
# optimum to matter; never seen on the benchmark CNN's activations) makes the whole batch use the
# full sort (tf.cond), so the result is the exact optimum either way. Both passes are compiled
# with XLA (``HIST_XLA``), which fuses each into one loop over the data.
#
# The native op (syq_tf/quantizers/native/least_squares_search.cc, search="native", and "auto"
# wherever it can run) is the same bracketing in C++ with the bins' exact min and max as the
# triangle's edges; instead of a second histogram it gathers and sorts the values of the bins
# that may hold the optimum, and scans their splits (never undecided). XLA's CPU scatter-add
# costs about 3.5 ns a value and pass; the op's loop about 1 ns, with rows on TF's worker threads.

HIST_MIN_N = 512  # rows at least this long use the histogram search ("auto"); shorter ones sort
# (measured, batch 128: the histogram is 2-5x faster than the sort from 512 values on, slower at 64)
HIST_BINS = 2048  # at most; rows get n // 16 bins, at least 256
HIST_SUBBINS = 256
HIST_XLA = True
_MARGIN = 1e-10  # relative: the rounding of the float64 scores and bounds is far below it


def _split_score(s, i, total, n, mode):
    """F(i, s) at an exact split; -inf where the split is not allowed (empty high cluster)."""
    n_hi = n - i
    hi = total - s
    score = hi * hi / tf.maximum(n_hi, 1.0)
    if mode == "ls2":
        score += s * s / tf.maximum(i, 1.0)
    return tf.where(n_hi > 0, score, tf.constant(-float("inf"), s.dtype))


def _triangle_bound(i0, s0, count, total_in, lo, hi, total, n, mode):
    """Upper bound of F over the splits strictly inside a run of ``count`` values (sum
    ``total_in``, all in [lo, hi]) that starts at split (i0, s0): F at the vertex P (0/0 terms
    count as 0)."""
    width = hi - lo
    u = tf.math.divide_no_nan(count * hi - total_in, width)
    u = tf.where(width > 0, tf.clip_by_value(u, 0.0, tf.maximum(count, 0.0)), tf.zeros_like(u))
    s, i = s0 + u * lo, i0 + u
    score = tf.math.divide_no_nan(tf.square(total - s), tf.maximum(n - i, 0.0))
    if mode == "ls2":
        score += tf.math.divide_no_nan(tf.square(s), tf.maximum(i, 0.0))
    return score


def _scalars_from_split(s, i, total, n, mode):
    m_lo = s / tf.maximum(i, 1.0)
    m_hi = (total - s) / tf.maximum(n - i, 1.0)
    if mode == "lsT":
        return 0.5 * m_hi
    return tf.concat([0.5 * (m_lo + m_hi), 0.5 * (m_hi - m_lo)], axis=-1)


def _row_histogram(ids, values, g, bins, with_max=False):
    """Per-row count and sum (float64) of ``values`` [g, n] by bin ``ids`` [g, n] in 0..bins-1
    (negative: left out), [g, bins] each (and the max, in the values' dtype, where ``with_max``).
    Separate scatters: cheaper under XLA than one of stacked statistics."""
    seg = tf.where(ids >= 0, ids + tf.range(g)[:, None] * bins, -1)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(values), seg, g * bins)
    sums = tf.math.unsorted_segment_sum(tf.cast(values, tf.float64), seg, g * bins)
    out = [tf.reshape(tf.cast(counts, tf.float64), [g, bins]), tf.reshape(sums, [g, bins])]
    if with_max:
        out.append(tf.reshape(tf.math.unsorted_segment_max(values, seg, g * bins), [g, bins]))
    return out


def _histogram_search_impl(x2d, mode, bins, subbins):
    a = tf.abs(tf.stop_gradient(x2d))
    out_dtype = a.dtype
    if a.dtype in (tf.float16, tf.bfloat16):
        a = tf.cast(a, tf.float32)
    dtype = a.dtype
    f64 = tf.float64
    eps = 2.0**-23 if dtype == tf.float32 else 2.0**-52
    n = tf.constant(float(int(a.shape[-1])), f64)
    g = tf.shape(a)[0]

    # 1. bins of width top / bins on [0, top] (the row maximum goes to the last bin)
    top = tf.reduce_max(a, axis=-1, keepdims=True)
    scale = tf.where(top > 0, bins / tf.where(top > 0, top, tf.ones_like(top)), tf.zeros_like(top))
    b = tf.minimum(tf.cast(tf.floor(a * scale), tf.int32), bins - 1)  # nondecreasing in |x|
    counts, sums = _row_histogram(b, a, g, bins)
    total = tf.reduce_sum(sums, axis=-1, keepdims=True)
    start_i = tf.cumsum(counts, axis=-1, exclusive=True)  # split before bin j
    start_s = tf.cumsum(sums, axis=-1, exclusive=True)
    between = _split_score(start_s, start_i, total, n, mode)
    best = tf.reduce_max(between, axis=-1, keepdims=True)
    top64 = tf.cast(top, f64)
    slack = 8.0 * eps * top64  # the binning's rounding
    index = tf.range(bins)
    lo = tf.maximum(tf.cast(index, f64) * (top64 / bins) - slack, 0.0)
    hi = tf.cast(index + 1, f64) * (top64 / bins) + slack
    bound = _triangle_bound(start_i, start_s, counts, sums, lo, hi, total, n, mode)
    inside = (counts >= 2) & (bound >= best - _MARGIN * tf.abs(best))
    j_lo = tf.reduce_min(tf.where(inside, index, bins), axis=-1, keepdims=True)
    j_hi = tf.reduce_max(tf.where(inside, index, -1), axis=-1, keepdims=True)  # j_hi < j_lo: no run

    # 2. sub-bins over the run: its members are the values of bins j_lo..j_hi (the others are
    # left out), so the run starts at the level-1 split before bin j_lo
    width = top / bins
    run_lo = tf.cast(tf.minimum(j_lo, bins), dtype) * width - 8.0 * eps * top
    run_width = tf.cast(tf.maximum(j_hi + 1 - j_lo, 1), dtype) * width + 16.0 * eps * top
    sub_scale = tf.where(run_width > 0, subbins / tf.where(run_width > 0, run_width, tf.ones_like(run_width)),
                         tf.zeros_like(run_width))
    k = tf.clip_by_value(tf.cast(tf.floor((a - run_lo) * sub_scale), tf.int32), 0, subbins - 1)
    k = tf.where((b >= j_lo) & (b <= j_hi), k, -1)
    c2, s2, mx = _row_histogram(k, a, g, subbins, with_max=True)
    mx = tf.where(c2 > 0, tf.cast(mx, f64), tf.zeros_like(c2))
    run_start = tf.minimum(j_lo, bins - 1)
    i2 = tf.gather(start_i, run_start, batch_dims=1) + tf.cumsum(c2, axis=-1, exclusive=True)
    p2 = tf.gather(start_s, run_start, batch_dims=1) + tf.cumsum(s2, axis=-1, exclusive=True)
    several = c2 >= 2
    before_max_i, before_max_s = i2 + c2 - 1.0, p2 + s2 - mx
    neg_inf = tf.constant(-float("inf"), f64)
    s_all = tf.concat([start_s, p2, before_max_s], axis=-1)
    i_all = tf.concat([start_i, i2, before_max_i], axis=-1)
    f_all = tf.concat([between, tf.where(c2 > 0, _split_score(p2, i2, total, n, mode), neg_inf),
                       tf.where(several, _split_score(before_max_s, before_max_i, total, n, mode), neg_inf)], axis=-1)
    pick = tf.argmax(f_all, axis=-1, output_type=tf.int32)[:, None]
    best = tf.gather(f_all, pick, batch_dims=1)
    # sub-bins of 3+ values, not all equal: the other splits inside must be bounded below best
    sub_lo = tf.cast(run_lo, f64) + tf.cast(tf.range(subbins), f64) / tf.cast(sub_scale, f64) - slack
    sub_lo = tf.maximum(sub_lo, 0.0)
    inner = _triangle_bound(i2, p2, c2 - 1.0, s2 - mx, sub_lo, mx, total, n, mode)
    undecided = (c2 >= 3) & (c2 * mx != s2) & (inner >= best - _MARGIN * tf.abs(best))
    ok = tf.logical_not(tf.reduce_any(undecided))
    s_best = tf.gather(s_all, pick, batch_dims=1)
    i_best = tf.gather(i_all, pick, batch_dims=1)
    return tf.cast(_scalars_from_split(s_best, i_best, total, n, mode), out_dtype), ok


_histogram_search_xla = tf.function(_histogram_search_impl, jit_compile=True, reduce_retracing=False)


def _histogram_search(x2d, mode, bins=None, subbins=HIST_SUBBINS):
    """(scalars, ok): the exact optimum from two histograms (see above); ok is False if some row
    could not be decided (the caller then sorts). ``bins=None``: n // 16 within [256, HIST_BINS]
    (the per-bin work is that of about 16 values)."""
    x2d = tf.convert_to_tensor(x2d)
    if bins is None:
        bins = max(256, min(HIST_BINS, int(x2d.shape[-1]) // 16))
    impl = _histogram_search_xla if HIST_XLA else _histogram_search_impl
    return impl(x2d, mode, bins, subbins)


SEARCHES = ("auto", "sort", "histogram", "native")


def _use_native(x2d, search):
    """"native": the compiled op (RuntimeError naming why if it is not there, or inside XLA); "auto":
    the op wherever it can run (built, float32/float64, not inside XLA)."""
    if search == "native":
        if native.in_xla():
            raise RuntimeError("least_squares: search='native' cannot run inside XLA (jit_compile=True); "
                               "use search='auto' (there: the XLA histogram search).")
        return True
    return search == "auto" and native.usable(x2d)


def _use_histogram(x2d, search):
    n = tf.TensorShape(x2d.shape)[-1]
    if search == "sort" or n is None:
        return False
    return search == "histogram" or n >= HIST_MIN_N


def _optimal_scalars(x2d, mode, search, sorted_search):
    if search not in SEARCHES:
        raise ValueError(f"least_squares: search={search!r}; allowed: {', '.join(map(repr, SEARCHES))}.")
    x2d = tf.convert_to_tensor(x2d)
    if _use_native(x2d, search):
        return native.least_squares_search(tf.stop_gradient(x2d), mode)
    if not _use_histogram(x2d, search):
        return sorted_search(x2d)
    scalars, ok = _histogram_search(x2d, mode)
    return tf.cond(ok, lambda: scalars, lambda: sorted_search(x2d))


def least_squares_scalars(x2d, mode, search="auto"):
    """The scalars of ``mode`` for every row of ``x2d`` [g, n]: shape [g, NUM_SCALARS[mode]].

    ``search`` (ls2, lsT), all giving the exact optimum: "sort" sorts every row; "histogram"
    brackets the optimum with a histogram and sorts only the bins that can hold it (falling back
    to "sort" when that cannot be decided), compiled with XLA; "native" is the same bracketing as
    a compiled TensorFlow CPU op (:mod:`syq_tf.quantizers.native`: one pass of binned sums per row,
    then a sort of the values of the bins that can hold the optimum). "auto" uses the native op
    where it can run (built, float32/float64 rows, outside XLA), else the histogram for rows of at
    least HIST_MIN_N values and the sort for shorter ones."""
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
        owner = owner_name("LeastSquares", kwargs)
        _check_mode(mode, owner=owner)
        _check_backward(backward, owner)
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"{owner}: unknown granularity {granularity!r}; allowed: "
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
        owner = owner_name("LeastSquaresActivation", kwargs)
        _check_mode(mode, owner=owner)
        _check_backward(backward, owner)
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
