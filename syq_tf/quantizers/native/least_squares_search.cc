// The exact least-squares ls2 / lsT search (syq_tf/quantizers/least_squares.py) as a TensorFlow
// CPU op: per row of x [g, n], the split of sorted |x| that maximises
//     ls2:  F(i, S_i) = S_i^2 / i + (S_n - S_i)^2 / (n - i)     (S_0^2 / 0 := 0)
//     lsT:  F(i, S_i) = (S_n - S_i)^2 / (n - i)
// over i = 0..n-1 (S_i: sum of the i smallest |x|), and the scalars of that split
//     m_lo = S_i / max(i, 1),  m_hi = (S_n - S_i) / (n - i)
//     ls2: (v1, v2) = ((m_lo + m_hi) / 2, (m_hi - m_lo) / 2);   lsT: v = m_hi / 2.
// Same optimum as the Python searches (the sort, and the XLA histogram), found without sorting
// the row: one pass counts and sums |x| into equal-width bins (float64 sums), so every split
// between bins is scored exactly from the prefix sums; inside a bin of values in [lo, hi] the
// points (i, S_i) lie in the triangle spanned by its start split, its end split and P, where the
// lines of slope lo (from the start) and hi (into the end) meet; F is convex (a sum of
// perspectives of squares), so F(P) bounds every split inside the bin. Only the bins whose bound
// reaches the best split between bins are gathered (a second pass), sorted, and scanned split by
// split. The result is exact whatever the data: at worst every bin is a candidate and the whole
// row is sorted.
//
// Rows run in parallel on TensorFlow's CPU worker threads. A row with a non-finite value gets NaN
// scalars (the Python searches give no meaningful result there either); an all-zero row gets 0.

#include <cmath>
#include <string>
#include <vector>

#include "common.h"

namespace syq_tf {
namespace {

constexpr double kNegInf = -kInf;

struct Split {
  double score = kNegInf;
  double i = 0.0;  // number of values in the low cluster
  double s = 0.0;  // their sum
};

class RowSearch {
 public:
  RowSearch(bool ls2, int64_t n) : ls2_(ls2), n_(static_cast<double>(n)) {}

  double Score(double i, double s, double total) const {
    const double n_hi = n_ - i;
    if (n_hi <= 0.0) return kNegInf;
    const double hi = total - s;
    double f = hi * hi / n_hi;
    if (ls2_ && i > 0.0) f += s * s / i;
    return f;
  }

  void Consider(double i, double s, double total, Split* best) const {
    const double f = Score(i, s, total);
    if (f > best->score) *best = Split{f, i, s};
  }

  // Upper bound of F over the splits strictly inside a run of `count` values (sum `sum`, all in
  // [lo, hi], lo < hi) starting at split (i0, s0).
  double TriangleBound(double i0, double s0, double count, double sum, double lo, double hi,
                       double total) const {
    double u = (count * hi - sum) / (hi - lo);
    u = std::min(std::max(u, 0.0), count);
    const double s = s0 + u * lo, i = i0 + u;
    const double n_hi = n_ - i;
    double f = n_hi > 0.0 ? (total - s) * (total - s) / n_hi : std::numeric_limits<double>::infinity();
    if (ls2_ && i > 0.0) f += s * s / i;
    return f;
  }

  template <typename T>
  void Scalars(const Split& best, double total, T* out) const {
    const double m_lo = best.s / std::max(best.i, 1.0);
    const double m_hi = (total - best.s) / std::max(n_ - best.i, 1.0);
    if (ls2_) {
      out[0] = static_cast<T>(0.5 * (m_lo + m_hi));
      out[1] = static_cast<T>(0.5 * (m_hi - m_lo));
    } else {
      out[0] = static_cast<T>(0.5 * m_hi);
    }
  }

 private:
  bool ls2_;
  double n_;
};

struct Scratch {
  std::vector<double> count, sum, lo, hi;
  std::vector<double> values;
  std::vector<uint8_t> candidate;
};

// bins 0: rows of up to kSortBelow values are sorted whole, longer ones get AutoBins(n) bins;
// bins > 0: that many bins whatever the row length (at most kMaxBins: CheckBins).
template <typename T>
void SearchRow(const T* x, int64_t n, bool ls2, int64_t bins, Scratch* scratch, T* out) {
  const int k = ls2 ? 2 : 1;
  const RowSearch search(ls2, n);
  T top_in_t = 0;
  const bool finite = MaxAbsIfFinite<T>(x, nullptr, 0, n, &top_in_t);
  const double top = static_cast<double>(top_in_t);
  if (!finite) {
    for (int c = 0; c < k; ++c) out[c] = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  if (top == 0.0 || n == 0) {
    for (int c = 0; c < k; ++c) out[c] = T(0);
    return;
  }
  Split best;
  std::vector<double>& values = scratch->values;
  values.clear();

  if (bins <= 0 && n <= kSortBelow) {
    for (int64_t j = 0; j < n; ++j) values.push_back(std::fabs(static_cast<double>(x[j])));
    std::sort(values.begin(), values.end());
    double total = 0.0;
    for (double v : values) total += v;
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      search.Consider(static_cast<double>(i), s, total, &best);
      s += values[i];
    }
    search.Scalars(best, total, out);
    return;
  }

  // 1. bins of width top / bins on [0, top]; the bin index is nondecreasing in |x|, so each bin is
  // a contiguous run of the sorted values
  if (bins <= 0) bins = AutoBins(n);
  const EqualBins bin_of(bins, top);
  scratch->count.assign(bins, 0.0);
  scratch->sum.assign(bins, 0.0);
  scratch->lo.assign(bins, std::numeric_limits<double>::infinity());
  scratch->hi.assign(bins, 0.0);
  double* count = scratch->count.data();
  double* sum = scratch->sum.data();
  double* lo = scratch->lo.data();
  double* hi = scratch->hi.data();
  for (int64_t j = 0; j < n; ++j) {
    const double a = std::fabs(static_cast<double>(x[j]));
    const int64_t b = bin_of(a);
    count[b] += 1.0;
    sum[b] += a;
    lo[b] = std::min(lo[b], a);
    hi[b] = std::max(hi[b], a);
  }
  double total = 0.0;
  for (int64_t b = 0; b < bins; ++b) total += sum[b];

  // every split between bins (the one before bin b), exactly
  double start_i = 0.0, start_s = 0.0;
  for (int64_t b = 0; b < bins; ++b) {
    search.Consider(start_i, start_s, total, &best);
    start_i += count[b];
    start_s += sum[b];
  }

  // 2. bins whose inside may beat that: gather, sort, scan
  const double margin = 1e-12 * std::fabs(best.score);
  scratch->candidate.assign(bins, 0);
  uint8_t* candidate = scratch->candidate.data();
  bool any = false;
  start_i = 0.0;
  start_s = 0.0;
  for (int64_t b = 0; b < bins; ++b) {
    if (count[b] >= 2.0 && hi[b] > lo[b] &&
        search.TriangleBound(start_i, start_s, count[b], sum[b], lo[b], hi[b], total) >= best.score - margin) {
      candidate[b] = 1;
      any = true;
    }
    start_i += count[b];
    start_s += sum[b];
  }
  if (any) {
    for (int64_t j = 0; j < n; ++j) {
      const double a = std::fabs(static_cast<double>(x[j]));
      if (candidate[bin_of(a)]) values.push_back(a);
    }
    std::sort(values.begin(), values.end());
    size_t next = 0;
    start_i = 0.0;
    start_s = 0.0;
    for (int64_t b = 0; b < bins; ++b) {
      if (candidate[b]) {
        double i = start_i, s = start_s;
        const int64_t c = static_cast<int64_t>(count[b]);
        for (int64_t m = 0; m + 1 < c; ++m) {  // the splits strictly inside the bin
          s += values[next + m];
          i += 1.0;
          search.Consider(i, s, total, &best);
        }
        next += c;
      }
      start_i += count[b];
      start_s += sum[b];
    }
  }
  search.Scalars(best, total, out);
}

template <typename T>
class LeastSquaresSearchOp : public OpKernel {
 public:
  explicit LeastSquaresSearchOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string mode;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("mode", &mode));
    ls2_ = mode == "ls2";
    OP_REQUIRES_OK(ctx, ctx->GetAttr("bins", &bins_));
    OP_REQUIRES_OK(ctx, CheckBins(bins_, "SyqLeastSquaresSearch"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    OP_REQUIRES_OK(ctx, CheckMatrix(x, "SyqLeastSquaresSearch", "x"));
    const int64_t g = x.dim_size(0), n = x.dim_size(1);
    const int k = ls2_ ? 2 : 1;
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({g, k}), &out));
    const T* xs = x.flat<T>().data();
    T* os = out->flat<T>().data();
    const bool ls2 = ls2_;
    const int64_t bins = bins_;
    Parallel(ctx, g, 8 * n, [xs, os, n, k, ls2, bins](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t r = begin; r < end; ++r) SearchRow<T>(xs + r * n, n, ls2, bins, &scratch, os + r * k);
    });
  }

 private:
  bool ls2_ = false;
  int64_t bins_ = 0;
};

}  // namespace
}  // namespace syq_tf

REGISTER_OP("SyqLeastSquaresSearch")
    .Input("x: T")
    .Output("scalars: T")
    .Attr("T: {float, double}")
    .Attr("mode: {'ls2', 'lsT'}")
    .Attr("bins: int = 0")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      std::string mode;
      TF_RETURN_IF_ERROR(c->GetAttr("mode", &mode));
      c->set_output(0, c->Matrix(c->Dim(x, 0), mode == "ls2" ? 2 : 1));
      return absl::OkStatus();
    })
    .Doc("Exact least-squares ls2 / lsT scalars per row (syq_tf.quantizers.least_squares).");

REGISTER_KERNEL_BUILDER(Name("SyqLeastSquaresSearch").Device(::tensorflow::DEVICE_CPU).TypeConstraint<float>("T"),
                        syq_tf::LeastSquaresSearchOp<float>);
REGISTER_KERNEL_BUILDER(Name("SyqLeastSquaresSearch").Device(::tensorflow::DEVICE_CPU).TypeConstraint<double>("T"),
                        syq_tf::LeastSquaresSearchOp<double>);
