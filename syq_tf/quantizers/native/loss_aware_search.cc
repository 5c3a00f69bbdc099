// Loss-aware ternarization (syq_tf/quantizers/loss_aware.py, Hou & Kwok) as TensorFlow CPU ops,
// the same results as the pure-TensorFlow functions there, per row of a = |w| [g, n] with the
// curvature d [g, n] (d > 0):
//
// SyqLatExact: the exact search. Keeping the k largest |w| with scale alpha_k = A_k / D_k
//     (A_k = sum of d |w|, D_k = sum of d over them) leaves the weighted error
//     sum d w^2 - F_k, F_k = A_k^2 / D_k; the optimum is the k (ending a run of equal |w|, a_k > 0)
//     of largest F_k that is consistent (a_k >= alpha_k / 2 >= a_{k+1}), else the largest F_k among
//     run ends; among equal F the smallest k. Outputs alpha and the cut a_k (support: |w| >= cut;
//     +inf when nothing is kept). Not sorted whole: |w| is binned (count, sum d, sum d|w|, min,
//     max per bin), every cut between bins is scored from the prefix sums, and inside a bin the
//     points (D, A) lie in the triangle spanned by its first and last cut and P, where the line of
//     slope max|w| from the first meets the line of slope min|w| into the last (the path (D_k, A_k)
//     is concave: slopes |w| decrease); F = A^2 / D is convex, so F(P) bounds the cuts inside. The
//     bins that may beat the best cut between bins are gathered, sorted and scanned. Rows run in
//     parallel; a few long rows (granularity "layer") are each cut into parts that are scanned,
//     binned and gathered on the worker threads at once, the parts' bins then added up.
//
// SyqLatApprox: the approximate alternation from a starting support S_0 (the authors' method):
//     alpha_t = sum_{S_{t-1}} d|w| / sum_{S_{t-1}} d,  S_t = {|w| > alpha_t / 2},
//     repeated while some row's support changed (and, tol > 0, some row's alpha moved by >= tol),
//     at most `iterations` times; the result is alpha of the last support and that support's
//     threshold theta (S_T = {|w| > theta}). two_scales: LAT2, the positive weights (w+) and the
//     negative ones (w-) as two problems per row with their own alpha and threshold, outputs
//     [2g, 1] (all rows' positive sides, then the negative ones), both sides in the same pass.
//     The loop runs over all rows together, as the TensorFlow while_loop does (one stop decision
//     for the tensor). One pass over (|w|, d) per step: the sums for the new threshold and the
//     comparison with the previous one together.
//
// Sums are float64; alpha and thresholds are rounded to the input type where the TensorFlow
// functions compute them in it. The exact op gives a row with a non-finite weight or curvature
// NaN; in the approximate one, as in TensorFlow, a NaN weight is in no support (NaN > t is false).

#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

namespace syq_tf {
namespace {

constexpr int64_t kPiece = 1 << 16;  // weights of one row per unit of parallel work (at least, exact)
constexpr int64_t kBlock = 256;      // weights summed in the input type before the float64 sums

// ---- exact ----------------------------------------------------------------------------------

struct Cut {
  double score = -kInf;
  double k = 0.0;  // number of kept weights
  double a = 0.0;  // a_k, the smallest kept |w|
  double A = 0.0, D = 0.0;
  // higher F first, then the smaller k (cuts are not visited in the order of k)
  bool Beaten(double f, double count) const { return f > score || (f == score && count < k); }
};

struct ExactBest {
  Cut any, valid;
  // the cut keeping k weights, the smallest a_k (> next, the largest |w| below it; 0 if none),
  // with sums (A, D)
  void Consider(double k, double a_k, double next, double A, double D) {
    const double f = A * A / D;
    if (any.Beaten(f, k)) any = Cut{f, k, a_k, A, D};
    const double half = 0.5 * (A / D);
    if (a_k >= half && half >= next && valid.Beaten(f, k)) valid = Cut{f, k, a_k, A, D};
  }
  const Cut& Best() const { return valid.score > -kInf ? valid : any; }
};

struct Bin {
  double count = 0.0, d = 0.0, da = 0.0;  // weights, sum d, sum d|w|
  double lo = kInf, hi = 0.0;             // smallest and largest |w| (hi = 0: empty)
  void Add(const Bin& o) {
    count += o.count, d += o.d, da += o.da;
    lo = std::min(lo, o.lo), hi = std::max(hi, o.hi);
  }
};

struct ExactScratch {
  std::vector<std::vector<Bin>> part_bins;                    // each part's; the row's in part 0
  std::vector<std::vector<std::pair<double, double>>> part_kept;
  std::vector<std::pair<double, double>> kept;                // (|w|, d), the candidates
  std::vector<uint8_t> candidate;
};

// The row [0, n) is cut into `parts` contiguous parts; run(parts, fn) calls fn(part, lo, hi) for
// every part, in any order and possibly at once (one row spread over the worker threads), or
// one after the other (rows in parallel).
using PartRunner = std::function<void(int64_t, const std::function<void(int64_t, int64_t, int64_t)>&)>;

template <typename T>
void LatExactRow(const T* w, const T* d, int64_t n, int64_t bins, int64_t parts, const PartRunner& run,
                 ExactScratch* s, T* alpha, T* cut) {
  // the largest |w|, and whether every w and d is finite
  std::vector<T> part_top(parts, T(0));
  std::vector<uint8_t> part_finite(parts, 1);
  run(parts, [&](int64_t p, int64_t lo, int64_t hi) { part_finite[p] = MaxAbsIfFinite(w, d, lo, hi, &part_top[p]); });
  const double top = static_cast<double>(*std::max_element(part_top.begin(), part_top.end()));
  if (std::find(part_finite.begin(), part_finite.end(), 0) != part_finite.end()) {
    *alpha = *cut = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  if (top == 0.0) {  // nothing to keep
    *alpha = T(0);
    *cut = std::numeric_limits<T>::infinity();
    return;
  }
  ExactBest best;
  auto& kept = s->kept;
  kept.clear();
  auto by_magnitude_desc = [](const std::pair<double, double>& x, const std::pair<double, double>& y) {
    return x.first > y.first;
  };
  // scan sorted (|w|, d) from index `begin` to `end` (exclusive) with sums (A, D) before it; the cut
  // after the last element is scored only if `score_last` (next: the |w| after the range)
  auto scan = [&](size_t begin, size_t end, double k, double A, double D, double after, bool score_last) {
    for (size_t m = begin; m < end; ++m) {
      A += kept[m].second * kept[m].first;
      D += kept[m].second;
      k += 1.0;
      const bool last = m + 1 == end;
      const double next = last ? after : kept[m + 1].first;
      if ((!last || score_last) && kept[m].first > next) best.Consider(k, kept[m].first, next, A, D);
    }
  };

  if (bins <= 0 && n <= kSortBelow) {
    for (int64_t j = 0; j < n; ++j) {
      const double a = std::fabs(static_cast<double>(w[j]));
      if (a > 0.0) kept.emplace_back(a, static_cast<double>(d[j]));
    }
    std::sort(kept.begin(), kept.end(), by_magnitude_desc);
    scan(0, kept.size(), 0.0, 0.0, 0.0, 0.0, true);
  } else {
    if (bins <= 0) bins = AutoBins(n);
    const EqualBins bin_of(bins, top);
    // every part bins its weights (count, sums, min, max per bin), then the parts' bins are added
    s->part_bins.resize(std::max<size_t>(s->part_bins.size(), parts));
    run(parts, [&](int64_t p, int64_t lo, int64_t hi) {
      std::vector<Bin>& own = s->part_bins[p];
      own.assign(bins, Bin{});
      for (int64_t j = lo; j < hi; ++j) {
        const double a = std::fabs(static_cast<double>(w[j]));
        if (a == 0.0) continue;  // zeros are never kept
        const double dj = static_cast<double>(d[j]);
        Bin& bin = own[bin_of(a)];
        bin.count += 1.0;
        bin.d += dj;
        bin.da += dj * a;
        bin.lo = std::min(bin.lo, a);
        bin.hi = std::max(bin.hi, a);
      }
    });
    std::vector<Bin>& all = s->part_bins[0];
    for (int64_t p = 1; p < parts; ++p)
      for (int64_t b = 0; b < bins; ++b) all[b].Add(s->part_bins[p][b]);
    // the cut after each non-empty bin, from the top: a_k = the bin's min, next = the next bin's max
    double A = 0.0, D = 0.0, k = 0.0;
    for (int64_t b = bins - 1; b >= 0; --b) {
      if (all[b].hi == 0.0) continue;
      A += all[b].da;
      D += all[b].d;
      k += all[b].count;
      int64_t c = b - 1;
      while (c >= 0 && all[c].hi == 0.0) --c;
      best.Consider(k, all[b].lo, c >= 0 ? all[c].hi : 0.0, A, D);
    }
    // bins whose inside may hold a better cut
    const double margin = 1e-12 * std::fabs(best.any.score);
    s->candidate.assign(bins, 0);
    bool any = false;
    A = D = 0.0;
    for (int64_t b = bins - 1; b >= 0; --b) {
      const Bin& bin = all[b];
      if (bin.hi == 0.0) continue;
      if (bin.hi > bin.lo) {
        const double x = std::min(std::max((bin.da - bin.lo * bin.d) / (bin.hi - bin.lo), 0.0), bin.d);
        const double ap = A + bin.hi * x, dp = D + x;
        if (dp > 0.0 && ap * ap / dp >= best.any.score - margin) {
          s->candidate[b] = 1;
          any = true;
        }
      }
      A += bin.da;
      D += bin.d;
    }
    if (any) {  // the candidates' weights
      s->part_kept.resize(std::max<size_t>(s->part_kept.size(), parts));
      run(parts, [&](int64_t p, int64_t lo, int64_t hi) {
        auto& own = s->part_kept[p];
        own.clear();
        for (int64_t j = lo; j < hi; ++j) {
          const double a = std::fabs(static_cast<double>(w[j]));
          if (a > 0.0 && s->candidate[bin_of(a)]) own.emplace_back(a, static_cast<double>(d[j]));
        }
      });
      for (int64_t p = 0; p < parts; ++p) kept.insert(kept.end(), s->part_kept[p].begin(), s->part_kept[p].end());
      std::sort(kept.begin(), kept.end(), by_magnitude_desc);
      size_t next = 0;
      A = D = k = 0.0;
      for (int64_t b = bins - 1; b >= 0; --b) {
        const Bin& bin = all[b];
        if (bin.hi == 0.0) continue;
        if (s->candidate[b]) {
          const size_t end = next + static_cast<size_t>(bin.count);
          scan(next, end, k, A, D, 0.0, false);  // the cut after the bin's last value: scored above
          next = end;
        }
        A += bin.da;
        D += bin.d;
        k += bin.count;
      }
    }
  }
  const Cut& c = best.Best();
  if (c.score == -kInf) {
    *alpha = T(0);
    *cut = std::numeric_limits<T>::infinity();
    return;
  }
  *alpha = static_cast<T>(c.A / c.D);
  *cut = static_cast<T>(c.a);
}

template <typename T>
class LatExactOp : public OpKernel {
 public:
  explicit LatExactOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("bins", &bins_));
    OP_REQUIRES_OK(ctx, CheckBins(bins_, "SyqLatExact"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& w = ctx->input(0);
    const Tensor& d = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckMatrix(w, "SyqLatExact", "w"));
    OP_REQUIRES_OK(ctx, CheckSameShape(w, d, "SyqLatExact", "d"));
    const int64_t g = w.dim_size(0), n = w.dim_size(1);
    Tensor *alpha = nullptr, *cut = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({g, 1}), &alpha));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({g, 1}), &cut));
    const T* ws = w.flat<T>().data();
    const T* ds = d.flat<T>().data();
    T* as = alpha->flat<T>().data();
    T* cs = cut->flat<T>().data();
    const int64_t bins = bins_;
    // (at least 2 parts, also on one thread: every machine runs the parted search)
    const int threads = std::max(2, ctx->device()->tensorflow_cpu_worker_threads()->num_threads);
    if (g < threads && n >= 2 * kPiece) {
      // few long rows (granularity "layer": one): each row's passes spread over the threads, in
      // parts of at least kPiece weights
      const int64_t parts = std::min<int64_t>(threads, n / kPiece);
      const PartRunner spread = [&](int64_t count, const std::function<void(int64_t, int64_t, int64_t)>& fn) {
        Parallel(ctx, count, 8 * (n / count), [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) fn(p, p * n / count, (p + 1) * n / count);
        });
      };
      ExactScratch scratch;
      for (int64_t r = 0; r < g; ++r) LatExactRow<T>(ws + r * n, ds + r * n, n, bins, parts, spread, &scratch, as + r, cs + r);
      return;
    }
    const PartRunner in_turn = [n](int64_t count, const std::function<void(int64_t, int64_t, int64_t)>& fn) {
      for (int64_t p = 0; p < count; ++p) fn(p, p * n / count, (p + 1) * n / count);
    };
    Parallel(ctx, g, 8 * n, [=, &in_turn](int64_t begin, int64_t end) {
      ExactScratch scratch;
      for (int64_t r = begin; r < end; ++r) LatExactRow<T>(ws + r * n, ds + r * n, n, bins, 1, in_turn, &scratch, as + r, cs + r);
    });
  }

 private:
  int64_t bins_ = 0;
};

// ---- approximate ------------------------------------------------------------------------------

// One piece of a pass: the sums over the new support of a side (|w| for one side; w+ = max(w, 0)
// and w- = max(-w, 0) for two) and whether it differs from the side's previous support. The
// starting support S_0 is given as values s and thresholds st: one side |s| > st[0]; two sides
// (s > st[0] or -s > st[1]) and of the side's sign in w. So a bool support is s = 0 / 1 with
// st = 1/2, and a warm start the previous kernel with half its scales (the support of its levels).
struct PieceSums {
  double a[2] = {0.0, 0.0}, d[2] = {0.0, 0.0};
  bool moved[2] = {false, false};
};

// Kind 0: the sums over S_0; 1: over S_1 and its comparison with S_0; 2: over S_t and its
// comparison with S_{t-1}, both thresholds (only kinds 0 and 1 read the start values).
//
// One side: an `omp simd` loop. Two sides: GCC vector extensions of 16 bytes (4 floats, 2
// doubles; SSE2 everywhere on x86-64), because g++ 12 left some of the two-sided `omp simd`
// loops scalar (the start pass ran 15x slower than the one-sided one, 47 vs 3 ms on 4M weights),
// and which of them depended on how the conditions were spelled.
template <typename T, int Kind>
struct TwoSidedBlock {
  typedef T V __attribute__((vector_size(16)));
  static constexpr int kLanes = 16 / sizeof(T);

  static V Load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }

  // sums over the block [b, e) into out (a, d per side, moved per side)
  static void Sum(const T* w, const T* d, const T* s, const T st[2], int64_t b, int64_t e, const T t[2],
                  const T tb[2], PieceSums* out) {
    const V zero = {}, one = zero + T(1);
    V pa = zero, pd = zero, na = zero, nd = zero, pm = zero, nm = zero;
    int64_t j = b;
    for (; j + kLanes <= e; j += kLanes) {
      const V x = Load(w + j), dj = Load(d + j);
      const V ap = x > zero ? x : zero, an = x < zero ? -x : zero;
      V sp = zero, sn = zero;  // the start support's sides, 1 / 0
      if constexpr (Kind < 2) {
        const V sj = Load(s + j);
        const auto start = (sj > st[0]) | (-sj > st[1]);
        sp = (start & (x > zero)) ? one : zero;
        sn = (start & (x < zero)) ? one : zero;
      }
      const V kp = Kind == 0 ? sp : (ap > t[0] ? one : zero);
      const V kn = Kind == 0 ? sn : (an > t[1] ? one : zero);
      pa += kp * dj * ap;
      pd += kp * dj;
      na += kn * dj * an;
      nd += kn * dj;
      if constexpr (Kind == 1) {
        pm += kp != sp ? one : zero;
        nm += kn != sn ? one : zero;
      }
      if constexpr (Kind == 2) {
        pm += kp != (ap > tb[0] ? one : zero) ? one : zero;
        nm += kn != (an > tb[1] ? one : zero) ? one : zero;
      }
    }
    T sa = 0, sd = 0, ta = 0, td = 0, m1 = 0, m2 = 0;
    for (int i = 0; i < kLanes; ++i) {
      sa += pa[i];
      sd += pd[i];
      ta += na[i];
      td += nd[i];
      m1 += pm[i];
      m2 += nm[i];
    }
    for (; j < e; ++j) {  // the block's last few weights
      const T x = w[j];
      const T ap = x > T(0) ? x : T(0), an = x < T(0) ? -x : T(0);
      bool sp = false, sn = false;
      if constexpr (Kind < 2) {
        const bool start = (s[j] > st[0]) | (-s[j] > st[1]);
        sp = start & (x > T(0));
        sn = start & (x < T(0));
      }
      const bool ip = Kind == 0 ? sp : ap > t[0], in = Kind == 0 ? sn : an > t[1];
      if (ip) sa += d[j] * ap, sd += d[j];
      if (in) ta += d[j] * an, td += d[j];
      if constexpr (Kind == 1) m1 += ip != sp, m2 += in != sn;
      if constexpr (Kind == 2) m1 += ip != (ap > tb[0]), m2 += in != (an > tb[1]);
    }
    out->a[0] += static_cast<double>(sa);
    out->d[0] += static_cast<double>(sd);
    out->a[1] += static_cast<double>(ta);
    out->d[1] += static_cast<double>(td);
    out->moved[0] |= m1 != 0;
    out->moved[1] |= m2 != 0;
  }
};

template <typename T, bool Two, int Kind>
PieceSums SumPiece(const T* w, const T* d, const T* s, const T* st, int64_t lo, int64_t hi, const T* t,
                   const T* tb) {
  PieceSums out;
  for (int64_t b = lo; b < hi; b += kBlock) {  // blocks summed in T, blocks in float64
    const int64_t e = std::min(hi, b + kBlock);
    if constexpr (Two) {
      TwoSidedBlock<T, Kind>::Sum(w, d, s, st, b, e, t, tb, &out);
    } else {
      T pa = 0, pd = 0;
      int pm = 0;
#pragma omp simd reduction(+ : pa, pd) reduction(| : pm)
      for (int64_t j = b; j < e; ++j) {
        const T a = std::fabs(w[j]);
        bool start = false;
        if constexpr (Kind < 2) start = std::fabs(s[j]) > st[0];
        const bool in = Kind == 0 ? start : a > t[0];
        const T keep = in ? T(1) : T(0);
        pa += keep * d[j] * a;
        pd += keep * d[j];
        if constexpr (Kind == 1) pm |= static_cast<int>(in != start);
        if constexpr (Kind == 2) pm |= static_cast<int>(in != (a > tb[0]));
      }
      out.a[0] += static_cast<double>(pa);
      out.d[0] += static_cast<double>(pd);
      out.moved[0] |= pm != 0;
    }
  }
  return out;
}

template <typename T, bool Two>
PieceSums SumPieceAt(int step, const T* w, const T* d, const T* s, const T* st, int64_t lo, int64_t hi,
                        const T* t, const T* tb) {
  if (step == 0) return SumPiece<T, Two, 0>(w, d, s, st, lo, hi, t, tb);
  if (step == 1) return SumPiece<T, Two, 1>(w, d, s, st, lo, hi, t, tb);
  return SumPiece<T, Two, 2>(w, d, s, st, lo, hi, t, tb);
}

template <typename T>
class LatApproxOp : public OpKernel {
 public:
  explicit LatApproxOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("iterations", &iterations_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("tol", &tol_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("two_scales", &two_));
    OP_REQUIRES(ctx, iterations_ >= 1, absl::InvalidArgumentError("SyqLatApprox: iterations must be >= 1"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& w = ctx->input(0);
    const Tensor& d = ctx->input(1);
    const Tensor& start = ctx->input(2);
    const Tensor& start_threshold = ctx->input(3);
    OP_REQUIRES_OK(ctx, CheckMatrix(w, "SyqLatApprox", "w"));
    OP_REQUIRES_OK(ctx, CheckSameShape(w, d, "SyqLatApprox", "d"));
    OP_REQUIRES_OK(ctx, CheckSameShape(w, start, "SyqLatApprox", "start"));
    const int64_t g = w.dim_size(0), n = w.dim_size(1);
    const int sides = two_ ? 2 : 1;
    const int64_t rows = sides * g;  // problem p = side * g + row (the TensorFlow concat's order)
    OP_REQUIRES(ctx, start_threshold.shape() == TensorShape({rows, 1}),
                absl::InvalidArgumentError(absl::StrCat("SyqLatApprox: start_threshold has shape ",
                                                        start_threshold.shape().DebugString(), ", expected [", rows,
                                                        ", 1] (one per row", two_ ? " and sign)" : ")")));
    Tensor *alpha_out = nullptr, *theta_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({rows, 1}), &alpha_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({rows, 1}), &theta_out));
    const T* ws = w.flat<T>().data();
    const T* ds = d.flat<T>().data();
    const T* s0 = start.flat<T>().data();
    const T* st0 = start_threshold.flat<T>().data();

    // per problem: alpha of the current step (alpha_t), of the one before, the thresholds of the
    // current and the previous support, and the sums over the newest threshold's support
    std::vector<T> alpha(rows), previous(rows, -std::numeric_limits<T>::infinity()), theta(rows), theta_before(rows);
    std::vector<double> sda(rows), sd(rows);
    std::vector<uint8_t> changed(rows);
    auto scale = [&](int64_t p) { return sd[p] > 0.0 ? static_cast<T>(sda[p] / sd[p]) : T(0); };
    // the work of a pass is cut into pieces of at most kPiece weights of one row, so that one big
    // kernel (granularity "layer": a single row) is spread over the worker threads too
    const int64_t pieces_per_row = std::max<int64_t>(1, (n + kPiece - 1) / kPiece);
    const int64_t pieces = g * pieces_per_row;
    std::vector<PieceSums> parts(pieces);
    auto pass = [&](int step) {
      Parallel(ctx, pieces, 4 * sides * kPiece, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t r = p / pieces_per_row, lo = (p % pieces_per_row) * kPiece, hi = std::min(n, lo + kPiece);
          const T t[2] = {theta[r], theta[two_ ? g + r : r]};
          const T tb[2] = {theta_before[r], theta_before[two_ ? g + r : r]};
          const T st[2] = {st0[r], st0[two_ ? g + r : r]};
          parts[p] = two_ ? SumPieceAt<T, true>(step, ws + r * n, ds + r * n, s0 + r * n, st, lo, hi, t, tb)
                          : SumPieceAt<T, false>(step, ws + r * n, ds + r * n, s0 + r * n, st, lo, hi, t, tb);
        }
      });
      for (int64_t r = 0; r < g; ++r) {
        for (int side = 0; side < sides; ++side) {
          double a_sum = 0.0, d_sum = 0.0;
          bool moved = false;
          for (int64_t p = r * pieces_per_row; p < (r + 1) * pieces_per_row; ++p) {
            a_sum += parts[p].a[side];
            d_sum += parts[p].d[side];
            moved |= parts[p].moved[side];
          }
          sda[side * g + r] = a_sum;
          sd[side * g + r] = d_sum;
          changed[side * g + r] = moved;
        }
      }
    };
    pass(0);
    for (int step = 1;; ++step) {
      // alpha_t from the sums over S_{t-1}; S_t = {|w| > alpha_t / 2}; one pass: sums over S_t
      // and whether S_t differs from S_{t-1} (S_0 as given, later a threshold)
      for (int64_t p = 0; p < rows; ++p) {
        alpha[p] = scale(p);
        theta_before[p] = theta[p];
        theta[p] = static_cast<T>(T(0.5) * alpha[p]);
      }
      pass(step);
      bool go = std::any_of(changed.begin(), changed.end(), [](uint8_t c) { return c != 0; });
      if (go && tol_ > 0.0) {
        bool far = false;
        for (int64_t p = 0; p < rows; ++p) far |= std::fabs(alpha[p] - previous[p]) >= static_cast<T>(tol_);
        go = far;
      }
      for (int64_t p = 0; p < rows; ++p) previous[p] = alpha[p];
      if (!go || step >= iterations_) break;
    }
    T* as = alpha_out->flat<T>().data();
    T* ts = theta_out->flat<T>().data();
    for (int64_t p = 0; p < rows; ++p) {
      as[p] = scale(p);  // alpha of the returned support S_T
      ts[p] = theta[p];
    }
  }

 private:
  int64_t iterations_ = 10;
  float tol_ = 0.0f;
  bool two_ = false;
};

}  // namespace
}  // namespace syq_tf

REGISTER_OP("SyqLatExact")
    .Input("w: T")
    .Input("d: T")
    .Output("alpha: T")
    .Output("cut: T")
    .Attr("T: {float, double}")
    .Attr("bins: int = 0")
    .SetShapeFn(syq_tf::PerRowOutputs)
    .Doc("Exact loss-aware ternarization per row: scale and cut (syq_tf.quantizers.loss_aware).");

REGISTER_OP("SyqLatApprox")
    .Input("w: T")
    .Input("d: T")
    .Input("start: T")
    .Input("start_threshold: T")
    .Output("alpha: T")
    .Output("threshold: T")
    .Attr("T: {float, double}")
    .Attr("iterations: int = 10")
    .Attr("tol: float = 0.0")
    .Attr("two_scales: bool = false")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle w;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &w));
      bool two = false;
      TF_RETURN_IF_ERROR(c->GetAttr("two_scales", &two));
      ::tensorflow::shape_inference::DimensionHandle rows = c->Dim(w, 0);
      if (two) TF_RETURN_IF_ERROR(c->Multiply(rows, 2, &rows));
      c->set_output(0, c->Matrix(rows, 1));
      c->set_output(1, c->Matrix(rows, 1));
      return absl::OkStatus();
    })
    .Doc("Approximate loss-aware ternarization (the authors' alternation) per row, or per sign of each "
         "row (two_scales): scale and threshold.");

REGISTER_KERNEL_BUILDER(Name("SyqLatExact").Device(::tensorflow::DEVICE_CPU).TypeConstraint<float>("T"),
                        syq_tf::LatExactOp<float>);
REGISTER_KERNEL_BUILDER(Name("SyqLatExact").Device(::tensorflow::DEVICE_CPU).TypeConstraint<double>("T"),
                        syq_tf::LatExactOp<double>);
REGISTER_KERNEL_BUILDER(Name("SyqLatApprox").Device(::tensorflow::DEVICE_CPU).TypeConstraint<float>("T"),
                        syq_tf::LatApproxOp<float>);
REGISTER_KERNEL_BUILDER(Name("SyqLatApprox").Device(::tensorflow::DEVICE_CPU).TypeConstraint<double>("T"),
                        syq_tf::LatApproxOp<double>);
