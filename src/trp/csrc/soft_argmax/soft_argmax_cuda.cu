// CUDA launcher of soft_argmax: one block per (b, k) row, each thread an online softmax over a
// strided slice of the row, merged by a shared-memory tree (the same Online statistics as the
// CPU launcher); the backward is a grid-stride loop over the elements. Math in opmath, and the
// statistics (coords, logsumexp) stored in opmath too (see stats_dtype).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda_launch.cuh"
#include "soft_argmax/soft_argmax.h"

namespace trp {
namespace soft_argmax {
namespace {

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* heatmaps, at::opmath_type<scalar_t>* coords,
                               at::opmath_type<scalar_t>* lse,
                               int64_t height, int64_t width, at::opmath_type<scalar_t> beta) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ Online<acc_t> shared[kThreads];
  const int64_t r = blockIdx.x, n = height * width;
  auto s = Online<acc_t>::empty();
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    s.add(beta * static_cast<acc_t>(heatmaps[r * n + e]), centre<acc_t>(e % width, width),
          centre<acc_t>(e / width, height));
  }
  shared[threadIdx.x] = s;
  __syncthreads();
  for (unsigned int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      shared[threadIdx.x].merge(shared[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    shared[0].finish(coords + 2 * r, lse + r);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* heatmaps,
                                const at::opmath_type<scalar_t>* grad_coords,
                                const at::opmath_type<scalar_t>* grad_lse,
                                const at::opmath_type<scalar_t>* coords,
                                const at::opmath_type<scalar_t>* lse, scalar_t* grad, int64_t total,
                                int64_t height, int64_t width, at::opmath_type<scalar_t> beta) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = height * width;
  TRP_GRID_STRIDE_LOOP(e, total) {
    const int64_t r = e / n, i = (e % n) / width, j = e % width;
    grad[e] = static_cast<scalar_t>(grad_at<acc_t>(
        static_cast<acc_t>(heatmaps[e]), centre<acc_t>(j, width), centre<acc_t>(i, height), beta,
        coords[2 * r], coords[2 * r + 1], lse[r], grad_coords[2 * r], grad_coords[2 * r + 1],
        grad_lse[r]));
  }
}

std::tuple<at::Tensor, at::Tensor> soft_argmax_cuda(const at::Tensor& heatmaps_in, double beta) {
  check_heatmaps(heatmaps_in);
  const c10::cuda::CUDAGuard guard(heatmaps_in.device());
  const at::Tensor heatmaps = heatmaps_in.contiguous();
  const int64_t rows = heatmaps.size(0) * heatmaps.size(1);
  const auto stats = heatmaps.options().dtype(stats_dtype(heatmaps.scalar_type()));
  at::Tensor coords = at::empty({heatmaps.size(0), heatmaps.size(1), 2}, stats);
  at::Tensor lse = at::empty({heatmaps.size(0), heatmaps.size(1)}, stats);
  if (rows == 0) {
    return {coords, lse};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, heatmaps.scalar_type(),
                                  "trp::soft_argmax_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(
        heatmaps.const_data_ptr<scalar_t>(), coords.mutable_data_ptr<acc_t>(),
        lse.mutable_data_ptr<acc_t>(), heatmaps.size(2), heatmaps.size(3),
        static_cast<at::opmath_type<scalar_t>>(beta));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {coords, lse};
}

at::Tensor soft_argmax_backward_cuda(const at::Tensor& grad_coords_in,
                                     const at::Tensor& grad_lse_in, const at::Tensor& heatmaps_in,
                                     const at::Tensor& coords_in, const at::Tensor& lse_in,
                                     double beta) {
  check_backward_inputs(grad_coords_in, grad_lse_in, heatmaps_in, coords_in, lse_in);
  const c10::cuda::CUDAGuard guard(heatmaps_in.device());
  const at::Tensor heatmaps = heatmaps_in.contiguous();
  const at::Tensor grad_coords = grad_coords_in.contiguous();
  const at::Tensor grad_lse = grad_lse_in.contiguous();
  const at::Tensor coords = coords_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const int64_t total = heatmaps.numel();
  at::Tensor grad = at::empty_like(heatmaps);
  if (total == 0) {
    return grad;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, heatmaps.scalar_type(),
                                  "trp::soft_argmax_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
        heatmaps.const_data_ptr<scalar_t>(), grad_coords.const_data_ptr<acc_t>(),
        grad_lse.const_data_ptr<acc_t>(), coords.const_data_ptr<acc_t>(),
        lse.const_data_ptr<acc_t>(), grad.mutable_data_ptr<scalar_t>(), total,
        heatmaps.size(2), heatmaps.size(3), static_cast<at::opmath_type<scalar_t>>(beta));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace
}  // namespace soft_argmax
}  // namespace trp

TORCH_LIBRARY_IMPL(trp, CUDA, m) {
  m.impl("soft_argmax", &trp::soft_argmax::soft_argmax_cuda);
  m.impl("soft_argmax_backward", &trp::soft_argmax::soft_argmax_backward_cuda);
}
