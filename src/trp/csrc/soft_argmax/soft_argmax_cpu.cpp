// CPU launcher of soft_argmax: at::parallel_for over the B * K rows; the backward recomputes each
// probability row by row (each element owns its gradient). Half and bfloat16 heatmaps are read
// as they are and accumulated in float32 (opmath), as on CUDA, by the shared online pass.
// float32 / float64 rows run in at::vec::Vectorized (this unit is built per instruction set):
// the forward takes the row's max first, then sums exp(beta·h − max) and its x / y moments in one
// vector pass (the same statistics Online folds element by element; a row whose max is ±inf
// keeps the online pass, which gives the reference's answer there); the backward is grad_at's
// formula on vectors.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "soft_argmax/soft_argmax.h"
#include "cpu_capability.h"

namespace trp {
namespace soft_argmax {
namespace {

using at::vec::Vectorized;

// The shared online pass over one row (scalar_t: the heatmap's dtype, T: the accumulation type).
template <typename T, typename scalar_t>
void online_row(const scalar_t* row, int64_t h, int64_t w, T bt, T* coords, T* lse) {
  auto s = Online<T>::empty();
  for (int64_t i = 0; i < h; ++i) {
    const T y = centre<T>(i, h);
    for (int64_t j = 0; j < w; ++j) {
      s.add(bt * static_cast<T>(row[i * w + j]), centre<T>(j, w), y);
    }
  }
  s.finish(coords, lse);
}

template <typename T>
T reduce_sum(const Vectorized<T>& v) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T sum = 0;
  for (int64_t k = 0; k < Vectorized<T>::size(); ++k) {
    sum += lanes[k];
  }
  return sum;
}

// One row of float / double: xs holds the w pixel-centre x coordinates; scaled (n entries)
// receives beta·h, rounded as the reference rounds it (stored, so never fused into the
// subtraction of the max by an FMA: at logits of ~2500 that moved the result by 1e-4).
template <typename T>
void vector_row(const T* row, int64_t h, int64_t w, T bt, const T* xs, T* scaled, T* coords,
                T* lse) {
  using Vec = Vectorized<T>;
  constexpr int64_t lanes = Vec::size();
  const int64_t n = h * w, nv = n - n % lanes;
  const Vec vb(bt);
  T m = -std::numeric_limits<T>::infinity();
  if (nv > 0) {
    Vec vmax(m);
    for (int64_t e = 0; e < nv; e += lanes) {
      const Vec v = vb * Vec::loadu(row + e);
      v.store(scaled + e);
      vmax = at::vec::maximum(vmax, v);  // propagates NaN
    }
    T lanes_max[lanes];
    vmax.store(lanes_max);
    for (int64_t k = 0; k < lanes; ++k) {
      m = lanes_max[k] > m || lanes_max[k] != lanes_max[k] ? lanes_max[k] : m;  // keeps NaN
    }
  }
  for (int64_t e = nv; e < n; ++e) {
    const T v = bt * row[e];
    scaled[e] = v;
    m = v > m || v != v ? v : m;
  }
  if (std::isinf(m)) {
    online_row<T>(row, h, w, bt, coords, lse);
    return;
  }
  const Vec vm(m);
  const int64_t wv = w - w % lanes;
  Vec vsx(T(0));
  T sum = 0, sx = 0, sy = 0;
  for (int64_t i = 0; i < h; ++i) {
    const T* r = scaled + i * w;
    Vec vsum(T(0));
    for (int64_t j = 0; j < wv; j += lanes) {
      const Vec e = (Vec::loadu(r + j) - vm).exp();
      vsum = vsum + e;
      vsx = at::vec::fmadd(e, Vec::loadu(xs + j), vsx);
    }
    T row_sum = reduce_sum(vsum);
    for (int64_t j = wv; j < w; ++j) {
      const T e = std::exp(r[j] - m);
      row_sum += e;
      sx += e * xs[j];
    }
    sum += row_sum;
    sy += row_sum * centre<T>(i, h);
  }
  sx += reduce_sum(vsx);
  Online<T>{m, sum, sx, sy}.finish(coords, lse);
}

template <typename T>
void vector_grad_row(const T* row, int64_t h, int64_t w, T bt, const T* xs, T ox, T oy, T l,
                     T gx, T gy, T gl, T* g) {
  using Vec = Vectorized<T>;
  constexpr int64_t lanes = Vec::size();
  const int64_t wv = w - w % lanes;
  const Vec vb(bt), vl(l), vgx(gx), vox(ox);
  for (int64_t i = 0; i < h; ++i) {
    const T y = centre<T>(i, h);
    const T* r = row + i * w;
    T* out = g + i * w;
    const Vec vrest(gy * (y - oy) + gl);
    for (int64_t j = 0; j < wv; j += lanes) {
      const Vec p = (vb * Vec::loadu(r + j) - vl).exp();
      (vb * p * at::vec::fmadd(vgx, Vec::loadu(xs + j) - vox, vrest)).store(out + j);
    }
    for (int64_t j = wv; j < w; ++j) {
      out[j] = grad_at<T>(r[j], xs[j], y, bt, ox, oy, l, gx, gy, gl);
    }
  }
}

template <typename T>
std::vector<T> centres(int64_t w) {
  std::vector<T> xs(w);
  for (int64_t j = 0; j < w; ++j) {
    xs[j] = centre<T>(j, w);
  }
  return xs;
}

// Rows [begin, end) of the forward: vectorised for float / double, the online pass otherwise.
template <typename scalar_t, typename acc_t>
void forward_rows(const scalar_t* hm, int64_t begin, int64_t end, int64_t h, int64_t w, acc_t bt,
                  acc_t* c, acc_t* l) {
  const int64_t n = h * w;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const std::vector<acc_t> xs = centres<acc_t>(w);
    std::vector<acc_t> scaled(n);
    for (int64_t r = begin; r < end; ++r) {
      vector_row<acc_t>(hm + r * n, h, w, bt, xs.data(), scaled.data(), c + 2 * r, l + r);
    }
  } else {
    for (int64_t r = begin; r < end; ++r) {
      online_row<acc_t>(hm + r * n, h, w, bt, c + 2 * r, l + r);
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_rows(const scalar_t* hm, int64_t begin, int64_t end, int64_t h, int64_t w,
                   acc_t bt, const acc_t* c, const acc_t* l, const acc_t* gc, const acc_t* gl,
                   scalar_t* g) {
  const int64_t n = h * w;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const std::vector<acc_t> xs = centres<acc_t>(w);
    for (int64_t r = begin; r < end; ++r) {
      vector_grad_row<acc_t>(hm + r * n, h, w, bt, xs.data(), c[2 * r], c[2 * r + 1], l[r],
                             gc[2 * r], gc[2 * r + 1], gl[r], g + r * n);
    }
  } else {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < h; ++i) {
        const acc_t y = centre<acc_t>(i, h);
        for (int64_t j = 0; j < w; ++j) {
          const int64_t e = r * n + i * w + j;
          g[e] = static_cast<scalar_t>(grad_at<acc_t>(
              static_cast<acc_t>(hm[e]), centre<acc_t>(j, w), y, bt, c[2 * r], c[2 * r + 1],
              l[r], gc[2 * r], gc[2 * r + 1], gl[r]));
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> soft_argmax_cpu(const at::Tensor& heatmaps_in, double beta) {
  check_heatmaps(heatmaps_in);
  const at::Tensor heatmaps = heatmaps_in.contiguous();
  const int64_t rows = heatmaps.size(0) * heatmaps.size(1);
  const int64_t h = heatmaps.size(2), w = heatmaps.size(3), n = h * w;
  const auto stats = heatmaps.options().dtype(stats_dtype(heatmaps.scalar_type()));
  at::Tensor coords = at::empty({heatmaps.size(0), heatmaps.size(1), 2}, stats);
  at::Tensor lse = at::empty({heatmaps.size(0), heatmaps.size(1)}, stats);
  if (rows == 0) {
    return {coords, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, heatmaps.scalar_type(),
                                  "trp::soft_argmax_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hm = heatmaps.const_data_ptr<scalar_t>();
    acc_t* c = coords.mutable_data_ptr<acc_t>();
    acc_t* l = lse.mutable_data_ptr<acc_t>();
    const auto bt = static_cast<acc_t>(beta);
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
      forward_rows(hm, begin, end, h, w, bt, c, l);
    });
  });
  return {coords, lse};
}

at::Tensor soft_argmax_backward_cpu(const at::Tensor& grad_coords_in, const at::Tensor& grad_lse_in,
                                    const at::Tensor& heatmaps_in, const at::Tensor& coords_in,
                                    const at::Tensor& lse_in, double beta) {
  check_backward_inputs(grad_coords_in, grad_lse_in, heatmaps_in, coords_in, lse_in);
  const at::Tensor heatmaps = heatmaps_in.contiguous();
  const at::Tensor grad_coords = grad_coords_in.contiguous();
  const at::Tensor grad_lse = grad_lse_in.contiguous();
  const at::Tensor coords = coords_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const int64_t h = heatmaps.size(2), w = heatmaps.size(3), n = h * w;
  const int64_t total = heatmaps.numel();
  at::Tensor grad = at::empty_like(heatmaps);
  if (total == 0) {
    return grad;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, heatmaps.scalar_type(),
                                  "trp::soft_argmax_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hm = heatmaps.const_data_ptr<scalar_t>();
    const acc_t* gc = grad_coords.const_data_ptr<acc_t>();
    const acc_t* gl = grad_lse.const_data_ptr<acc_t>();
    const acc_t* c = coords.const_data_ptr<acc_t>();
    const acc_t* l = lse.const_data_ptr<acc_t>();
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const auto bt = static_cast<acc_t>(beta);
    at::parallel_for(0, total / n, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
      backward_rows(hm, begin, end, h, w, bt, c, l, gc, gl, g);
    });
  });
  return grad;
}

}  // namespace
}  // namespace soft_argmax
}  // namespace trp

TRP_CPU_KERNELS(soft_argmax, m) {
  m.impl("soft_argmax", &trp::soft_argmax::soft_argmax_cpu);
  m.impl("soft_argmax_backward", &trp::soft_argmax::soft_argmax_backward_cpu);
}
