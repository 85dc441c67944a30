// CUDA launcher of box_iou / generalized_box_iou: a grid-stride loop over the same index space
// as the CPU launcher, calling the same per-pair math (box_iou.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "box_iou/box_iou.h"
#include "cuda_launch.cuh"

namespace trp {
namespace box_iou {
namespace {

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* b1, const scalar_t* b2, scalar_t* out, int64_t n,
                               int64_t m, bool generalized) {
  using acc_t = at::opmath_type<scalar_t>;
  TRP_GRID_STRIDE_LOOP(k, n * m) {
    acc_t a[4], b[4];
    for (int c = 0; c < 4; ++c) {
      a[c] = static_cast<acc_t>(b1[4 * (k / m) + c]);
      b[c] = static_cast<acc_t>(b2[4 * (k % m) + c]);
    }
    out[k] = static_cast<scalar_t>(pair_iou(a, b, generalized));
  }
}

// One thread per box of the chosen side, looping over the other side: race-free, no atomics.
template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* grad, const scalar_t* b1, const scalar_t* b2,
                                scalar_t* g_out, int64_t n, int64_t m, bool generalized,
                                bool for_boxes1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t owners = for_boxes1 ? n : m;
  const int64_t others = for_boxes1 ? m : n;
  TRP_GRID_STRIDE_LOOP(o, owners) {
    acc_t acc[4] = {0, 0, 0, 0}, unused[4] = {0, 0, 0, 0};
    for (int64_t t = 0; t < others; ++t) {
      const int64_t i = for_boxes1 ? o : t, j = for_boxes1 ? t : o;
      acc_t a[4], b[4];
      for (int c = 0; c < 4; ++c) {
        a[c] = static_cast<acc_t>(b1[4 * i + c]);
        b[c] = static_cast<acc_t>(b2[4 * j + c]);
      }
      const acc_t g = static_cast<acc_t>(grad[i * m + j]);
      if (for_boxes1) {
        pair_iou_backward(a, b, generalized, g, acc, unused);
      } else {
        pair_iou_backward(a, b, generalized, g, unused, acc);
      }
    }
    for (int c = 0; c < 4; ++c) {
      g_out[4 * o + c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

at::Tensor forward_cuda(const at::Tensor& boxes1_in, const at::Tensor& boxes2_in,
                        bool generalized) {
  check_inputs(boxes1_in, boxes2_in);
  const c10::cuda::CUDAGuard guard(boxes1_in.device());
  const at::Tensor boxes1 = boxes1_in.contiguous();
  const at::Tensor boxes2 = boxes2_in.contiguous();
  const int64_t n = boxes1.size(0), m = boxes2.size(0);
  at::Tensor out = at::empty({n, m}, boxes1.options());
  if (n == 0 || m == 0) {
    return out;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes1.scalar_type(),
                                  "trp::box_iou_cuda", [&] {
    forward_kernel<scalar_t><<<grid_for(n * m), kThreads, 0, stream>>>(
        boxes1.const_data_ptr<scalar_t>(), boxes2.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), n, m, generalized);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor box_iou_cuda(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  return forward_cuda(boxes1, boxes2, false);
}

at::Tensor generalized_box_iou_cuda(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  return forward_cuda(boxes1, boxes2, true);
}

std::tuple<at::Tensor, at::Tensor> box_iou_backward_cuda(const at::Tensor& grad_in,
                                                         const at::Tensor& boxes1_in,
                                                         const at::Tensor& boxes2_in,
                                                         bool generalized) {
  check_backward_inputs(grad_in, boxes1_in, boxes2_in);
  const c10::cuda::CUDAGuard guard(boxes1_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor boxes1 = boxes1_in.contiguous();
  const at::Tensor boxes2 = boxes2_in.contiguous();
  const int64_t n = boxes1.size(0), m = boxes2.size(0);
  at::Tensor grad1 = at::zeros_like(boxes1);
  at::Tensor grad2 = at::zeros_like(boxes2);
  if (n == 0 || m == 0) {
    return {grad1, grad2};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes1.scalar_type(),
                                  "trp::box_iou_backward_cuda", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* b1 = boxes1.const_data_ptr<scalar_t>();
    const scalar_t* b2 = boxes2.const_data_ptr<scalar_t>();
    backward_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        g, b1, b2, grad1.mutable_data_ptr<scalar_t>(), n, m, generalized, true);
    backward_kernel<scalar_t><<<grid_for(m), kThreads, 0, stream>>>(
        g, b1, b2, grad2.mutable_data_ptr<scalar_t>(), n, m, generalized, false);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad1, grad2};
}

}  // namespace
}  // namespace box_iou
}  // namespace trp

TORCH_LIBRARY_IMPL(trp, CUDA, m) {
  m.impl("box_iou", &trp::box_iou::box_iou_cuda);
  m.impl("generalized_box_iou", &trp::box_iou::generalized_box_iou_cuda);
  m.impl("box_iou_backward", &trp::box_iou::box_iou_backward_cuda);
}
