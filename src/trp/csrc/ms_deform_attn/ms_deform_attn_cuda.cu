// CUDA launcher of ms_deform_attn, calling the same per-point math as the CPU launcher
// (ms_deform_attn.h) and accumulating in opmath (float for half / bfloat16).
//
// Forward: one thread per (n, q, m, d), so neighbouring threads read neighbouring channels.
// Backward: one thread per (n, q, m). It owns its grad_sampling_locations / grad_attention_weights
// entries, but threads of different queries sample the same value rows, and a GPU cannot afford
// the CPU's partition by (n, m) (only N * M threads): grad_value is therefore accumulated with
// atomicAdd, into a float buffer when the inputs are half / bfloat16.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda_launch.cuh"
#include "ms_deform_attn/ms_deform_attn.h"

namespace trp {
namespace ms_deform_attn {
namespace {

struct AtomicAdd {
  template <typename T>
  __device__ void operator()(T* dst, T v) const {
    atomicAdd(dst, v);
  }
};

template <typename scalar_t>
__global__ void forward_kernel(Levels lv, const scalar_t* value, const scalar_t* loc,
                               const scalar_t* attn, scalar_t* out, int64_t total, int64_t lq,
                               int64_t s, int64_t m) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = lv.channels;
  const int64_t lp_stride = lv.num_levels * lv.num_points;
  TRP_GRID_STRIDE_LOOP(i, total) {
    const int64_t nqm = i / d, c = i % d;
    const int64_t b = nqm / (lq * m), h = nqm % m;
    out[i] = static_cast<scalar_t>(forward_channel<scalar_t, acc_t>(
        lv, value + b * s * m * d + h * d, loc + nqm * lp_stride * 2, attn + nqm * lp_stride, c));
  }
}

template <typename scalar_t>
__global__ void backward_kernel(Levels lv, const scalar_t* value, const scalar_t* loc,
                                const scalar_t* attn, const scalar_t* grad_out,
                                at::opmath_type<scalar_t>* grad_value, scalar_t* grad_loc,
                                scalar_t* grad_attn, int64_t total, int64_t lq, int64_t s,
                                int64_t m) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = lv.channels;
  const int64_t lp_stride = lv.num_levels * lv.num_points;
  TRP_GRID_STRIDE_LOOP(i, total) {
    const int64_t b = i / (lq * m), h = i % m;
    const int64_t value_offset = b * s * m * d + h * d;
    backward_query_head<scalar_t, acc_t>(lv, value + value_offset, loc + i * lp_stride * 2,
                                         attn + i * lp_stride, grad_out + i * d,
                                         grad_value + value_offset, AtomicAdd{},
                                         grad_loc + i * lp_stride * 2, grad_attn + i * lp_stride);
  }
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                               const at::Tensor& level_start_index_in,
                               const at::Tensor& sampling_locations_in,
                               const at::Tensor& attention_weights_in) {
  check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in,
               attention_weights_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor loc = sampling_locations_in.contiguous();
  const at::Tensor attn = attention_weights_in.contiguous();
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = loc.size(1), num_levels = loc.size(3), num_points = loc.size(4);
  at::Tensor out = at::empty({n, lq, m * d}, value.options());
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  const Levels lv{shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
                  num_levels, num_points, m * d, d};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "trp::ms_deform_attn_cuda", [&] {
    forward_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
        lv, value.const_data_ptr<scalar_t>(), loc.const_data_ptr<scalar_t>(),
        attn.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, lq, s, m);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output_in, const at::Tensor& value_in,
    const at::Tensor& spatial_shapes_in, const at::Tensor& level_start_index_in,
    const at::Tensor& sampling_locations_in, const at::Tensor& attention_weights_in) {
  check_backward_inputs(grad_output_in, value_in, spatial_shapes_in, level_start_index_in,
                        sampling_locations_in, attention_weights_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  // grad_value is summed with float atomics (many queries sample one pixel): its rounding
  // depends on the order the threads land in.
  at::globalContext().alertNotDeterministic("trp::ms_deform_attn CUDA backward");
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor loc = sampling_locations_in.contiguous();
  const at::Tensor attn = attention_weights_in.contiguous();
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = loc.size(1), num_levels = loc.size(3), num_points = loc.size(4);
  // Atomic adds in half / bfloat16 would round every partial sum: accumulate in opmath.
  at::Tensor grad_value_acc =
      at::zeros(value.sizes(), value.options().dtype(at::toOpMathType(value.scalar_type())));
  at::Tensor grad_loc = at::empty_like(loc);
  at::Tensor grad_attn = at::empty_like(attn);
  const int64_t total = n * lq * m;
  if (total == 0) {
    return {grad_value_acc.to(value.scalar_type()), grad_loc, grad_attn};
  }
  const Levels lv{shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
                  num_levels, num_points, m * d, d};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "trp::ms_deform_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
        lv, value.const_data_ptr<scalar_t>(), loc.const_data_ptr<scalar_t>(),
        attn.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
        grad_value_acc.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<scalar_t>(),
        grad_attn.mutable_data_ptr<scalar_t>(), total, lq, s, m);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_value_acc.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace
}  // namespace ms_deform_attn
}  // namespace trp

TORCH_LIBRARY_IMPL(trp, CUDA, m) {
  m.impl("ms_deform_attn", &trp::ms_deform_attn::ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &trp::ms_deform_attn::ms_deform_attn_backward_cuda);
}
