// Soft-argmax of heatmaps: coords[b, k] = sum_i softmax(beta * h[b, k])_i * centre_i, with pixel
// centres ((j + 0.5) / W, (i + 0.5) / H). The forward is one online-softmax pass per (b, k) (a
// running max, the rescaled sum of exponentials and the rescaled weighted sums); the backward
// recomputes each probability from the saved logsumexp, so no [B, K, H, W] tensor is kept.
#pragma once

#include <cmath>
#include <limits>

#include <ATen/OpMathType.h>

#include "common.h"

namespace trp {
namespace soft_argmax {

template <typename T>
C10_HOST_DEVICE inline T centre(int64_t i, int64_t size) {
  return (T(i) + T(0.5)) / T(size);
}

// Running softmax statistics of one row: max m, sum of exp(v - m) and of exp(v - m) * x, * y.
// A plain aggregate (no member initialisers) so CUDA can keep an array of them in shared memory.
template <typename T>
struct Online {
  T max;
  T sum;
  T sx;
  T sy;

  C10_HOST_DEVICE static Online empty() {
    return {-std::numeric_limits<T>::infinity(), T(0), T(0), T(0)};
  }

  C10_HOST_DEVICE void add(T v, T x, T y) {
    if (v > max) {
      // exp(-inf) = 0 drops the empty state's sums on the first element.
      const T scale = std::exp(max - v);
      sum = sum * scale + T(1);
      sx = sx * scale + x;
      sy = sy * scale + y;
      max = v;
    } else if (v != -std::numeric_limits<T>::infinity()) {
      // A -inf logit has probability 0 and is skipped: while the running max is still -inf
      // (the row's first elements, or each CUDA thread's first ones) exp(v - max) would be
      // exp(-inf + inf) = NaN. A NaN logit still propagates (NaN != -inf).
      const T e = std::exp(v - max);
      sum += e;
      sx += e * x;
      sy += e * y;
    }
  }

  C10_HOST_DEVICE void merge(const Online& o) {
    if (o.sum == T(0)) {
      return;
    }
    if (sum == T(0)) {
      *this = o;
      return;
    }
    const T m = max > o.max ? max : o.max;
    const T a = std::exp(max - m), b = std::exp(o.max - m);
    sum = sum * a + o.sum * b;
    sx = sx * a + o.sx * b;
    sy = sy * a + o.sy * b;
    max = m;
  }

  // (x, y) expectation and logsumexp of the row.
  C10_HOST_DEVICE void finish(T* coords, T* lse) const {
    coords[0] = sx / sum;
    coords[1] = sy / sum;
    *lse = max + std::log(sum);
  }
};

// d loss / d h at pixel (i, j) of a row with outputs (ox, oy) and logsumexp lse:
// p = exp(beta * h - lse); d ox / d h = beta * p * (x - ox); d lse / d h = beta * p.
template <typename T>
C10_HOST_DEVICE inline T grad_at(T h, T x, T y, T beta, T ox, T oy, T lse, T gx, T gy, T glse) {
  const T p = std::exp(beta * h - lse);
  return beta * p * (gx * (x - ox) + gy * (y - oy) + glse);
}

inline void check_heatmaps(const at::Tensor& heatmaps) {
  check_floating(heatmaps, "heatmaps");
  check_dim(heatmaps, 4, "heatmaps");
  TORCH_CHECK_VALUE(heatmaps.size(2) > 0 && heatmaps.size(3) > 0,
                    "heatmaps must have a non-empty H x W grid, got shape ", heatmaps.sizes());
}

// The statistics (coords, logsumexp) are returned in the accumulation type (float32 for
// half/bfloat16 heatmaps): the backward recomputes exp(beta * h - lse), and a bfloat16 lse near
// 30 is off by up to 1/16, i.e. 6% in every probability.
inline at::ScalarType stats_dtype(at::ScalarType heatmaps) {
  return at::toOpMathType(heatmaps);
}

inline void check_backward_inputs(const at::Tensor& grad_coords, const at::Tensor& grad_lse,
                                  const at::Tensor& heatmaps, const at::Tensor& coords,
                                  const at::Tensor& lse) {
  check_heatmaps(heatmaps);
  const int64_t b = heatmaps.size(0), k = heatmaps.size(1);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_coords, "grad_coords"},
                                {coords, "coords"}}) {
    check_dtype(t, stats_dtype(heatmaps.scalar_type()), name);
    check_same_device(heatmaps, t, "heatmaps", name);
    TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == b && t.size(1) == k && t.size(2) == 2, name,
                      " must have shape [", b, ", ", k, ", 2], got ", t.sizes());
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_lse, "grad_logsumexp"},
                                {lse, "logsumexp"}}) {
    check_dtype(t, stats_dtype(heatmaps.scalar_type()), name);
    check_same_device(heatmaps, t, "heatmaps", name);
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == b && t.size(1) == k, name,
                      " must have shape [", b, ", ", k, "], got ", t.sizes());
  }
}

}  // namespace soft_argmax
}  // namespace trp
