// CPU launcher of soft_argmax: at::parallel_for over the B * K rows, one online pass per row;
// the backward recomputes each probability row by row (each element owns its gradient). Half and
// bfloat16 heatmaps are read as they are and accumulated in float32 (opmath), as on CUDA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "soft_argmax/soft_argmax.h"
#include "cpu_capability.h"

namespace trp {
namespace soft_argmax {
namespace {

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
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = hm + r * n;
        auto s = Online<acc_t>::empty();
        for (int64_t i = 0; i < h; ++i) {
          const acc_t y = centre<acc_t>(i, h);
          for (int64_t j = 0; j < w; ++j) {
            s.add(bt * static_cast<acc_t>(row[i * w + j]), centre<acc_t>(j, w), y);
          }
        }
        s.finish(c + 2 * r, l + r);
      }
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
