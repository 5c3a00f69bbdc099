// What syq_tf's TensorFlow CPU ops share: argument checks, row-parallel loops over TensorFlow's
// worker threads, the bin count of the binned searches, the shape of per-row outputs.
#ifndef SYQ_TF_QUANTIZERS_NATIVE_COMMON_H_
#define SYQ_TF_QUANTIZERS_NATIVE_COMMON_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace syq_tf {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

constexpr double kInf = std::numeric_limits<double>::infinity();

// Binned searches: rows of up to kSortBelow values are sorted whole (binning does not pay off);
// longer rows get n / 8 bins, 64 to 4096, unless a bin count is given (tests force a few bins to
// reach every branch on short rows).
constexpr int64_t kSortBelow = 256;
inline int64_t AutoBins(int64_t n) { return std::min<int64_t>(4096, std::max<int64_t>(64, n / 8)); }

// `count` equal-width bins on [0, top] (top > 0): the bin of a magnitude a, nondecreasing in a, so
// each bin holds a contiguous run of the sorted magnitudes (a = top falls into the last).
struct EqualBins {
  EqualBins(int64_t count, double top) : count(count), scale(static_cast<double>(count) / top) {}
  int64_t operator()(double a) const { return std::min<int64_t>(static_cast<int64_t>(a * scale), count - 1); }
  int64_t count;
  double scale;
};

// The `bins` attribute: 0 (the op's choice) or 1 to kMaxBins. Checked when the kernel is made, so
// that a graph from elsewhere (a SavedModel) cannot ask for a table of 2^40 bins (it crashed the
// process) or for a negative count.
constexpr int64_t kMaxBins = 1 << 16;
inline absl::Status CheckBins(int64_t bins, const char* op) {
  if (bins >= 0 && bins <= kMaxBins) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(op, ": bins must be 0 (the op's choice) or 1 to ", kMaxBins, ", got ", bins));
}

// The largest |x| over x[lo, hi) (exact in T), and whether every x there and, if `also` is given,
// every also[j] is finite (v - v is 0 only for a finite v): one vectorized pass.
template <typename T>
bool MaxAbsIfFinite(const T* x, const T* also, int64_t lo, int64_t hi, T* top) {
  T m = 0, bad = 0;
  if (also == nullptr) {
#pragma omp simd reduction(max : m) reduction(+ : bad)
    for (int64_t j = lo; j < hi; ++j) {
      const T a = std::fabs(x[j]);
      m = std::max(m, a);
      bad += a - a == T(0) ? T(0) : T(1);
    }
  } else {
#pragma omp simd reduction(max : m) reduction(+ : bad)
    for (int64_t j = lo; j < hi; ++j) {
      const T a = std::fabs(x[j]);
      m = std::max(m, a);
      bad += (a - a == T(0)) & (also[j] - also[j] == T(0)) ? T(0) : T(1);
    }
  }
  *top = m;
  return bad == T(0);
}

// fn(begin, end) over units 0..units-1 on TensorFlow's CPU worker threads; cost: per unit, in
// about the time of one multiply-add (TensorFlow splits finer for costlier units).
inline void Parallel(OpKernelContext* ctx, int64_t units, int64_t cost, const std::function<void(int64_t, int64_t)>& fn) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  ::tensorflow::Shard(workers->num_threads, workers->workers, units, std::max<int64_t>(1, cost), fn);
}

// `name` of op `op` is a matrix [groups, n].
inline absl::Status CheckMatrix(const Tensor& x, const char* op, const char* name) {
  if (x.dims() == 2) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", name, " must be [groups, n], got rank ", x.dims()));
}

// `other` has the shape of `x` ("w").
inline absl::Status CheckSameShape(const Tensor& x, const Tensor& other, const char* op, const char* name) {
  if (x.shape() == other.shape()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(op, ": ", name, " has shape ", other.shape().DebugString(), ", w ", x.shape().DebugString()));
}

// Shape function: input 0 is [g, n]; every output is [g, 1].
inline absl::Status PerRowOutputs(::tensorflow::shape_inference::InferenceContext* c) {
  ::tensorflow::shape_inference::ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
  for (int i = 0; i < c->num_outputs(); ++i) c->set_output(i, c->Matrix(c->Dim(x, 0), 1));
  return absl::OkStatus();
}

}  // namespace syq_tf

#endif  // SYQ_TF_QUANTIZERS_NATIVE_COMMON_H_
