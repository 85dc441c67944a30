// CPU launcher of ms_deform_attn. Forward: at::parallel_for over (n, q, m), each computing its D
// channels. Backward: at::parallel_for over (n, m); task (n, m) owns grad_value[n, :, m, :] and
// the grad_sampling_locations / grad_attention_weights entries of every (n, q, m), so no two
// tasks ever write the same element and no atomics are needed.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ms_deform_attn/ms_deform_attn.h"

namespace trp {
namespace ms_deform_attn {
namespace {

struct PlainAdd {
  template <typename T>
  void operator()(T* dst, T v) const {
    *dst += v;
  }
};

void check_cpu_dtype(const at::Tensor& value) {
  TORCH_CHECK_TYPE(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
                   "ms_deform_attn on CPU supports float32 and float64, got ",
                   value.scalar_type());
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                              const at::Tensor& level_start_index_in,
                              const at::Tensor& sampling_locations_in,
                              const at::Tensor& attention_weights_in) {
  check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in,
               attention_weights_in);
  check_cpu_dtype(value_in);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor loc = sampling_locations_in.contiguous();
  const at::Tensor attn = attention_weights_in.contiguous();
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = loc.size(1), num_levels = loc.size(3), num_points = loc.size(4);
  at::Tensor out = at::empty({n, lq, m * d}, value.options());
  if (out.numel() == 0) {
    return out;
  }
  const Levels lv{shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
                  num_levels, num_points, m * d, d};
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "trp::ms_deform_attn_cpu", [&] {
    const scalar_t* v = value.const_data_ptr<scalar_t>();
    const scalar_t* lp = loc.const_data_ptr<scalar_t>();
    const scalar_t* ap = attn.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t lp_stride = num_levels * num_points;
    // ~L * P * 4 * D multiply-adds per (n, q, m): a few hundred rows per chunk amortise the
    // scheduling.
    at::parallel_for(0, n * lq * m, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (lq * m), h = i % m;
        forward_query_head<scalar_t, scalar_t>(lv, v + b * s * m * d + h * d,
                                               lp + i * lp_stride * 2, ap + i * lp_stride,
                                               o + i * d);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output_in, const at::Tensor& value_in,
    const at::Tensor& spatial_shapes_in, const at::Tensor& level_start_index_in,
    const at::Tensor& sampling_locations_in, const at::Tensor& attention_weights_in) {
  check_backward_inputs(grad_output_in, value_in, spatial_shapes_in, level_start_index_in,
                        sampling_locations_in, attention_weights_in);
  check_cpu_dtype(value_in);
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor loc = sampling_locations_in.contiguous();
  const at::Tensor attn = attention_weights_in.contiguous();
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = loc.size(1), num_levels = loc.size(3), num_points = loc.size(4);
  at::Tensor grad_value = at::zeros_like(value);
  // Every entry of these two is written by exactly one (n, q, m).
  at::Tensor grad_loc = at::empty_like(loc);
  at::Tensor grad_attn = at::empty_like(attn);
  if (n * lq * m == 0) {
    return {grad_value, grad_loc, grad_attn};
  }
  const Levels lv{shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
                  num_levels, num_points, m * d, d};
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "trp::ms_deform_attn_backward_cpu", [&] {
    const scalar_t* v = value.const_data_ptr<scalar_t>();
    const scalar_t* lp = loc.const_data_ptr<scalar_t>();
    const scalar_t* ap = attn.const_data_ptr<scalar_t>();
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    scalar_t* gv = grad_value.mutable_data_ptr<scalar_t>();
    scalar_t* gl = grad_loc.mutable_data_ptr<scalar_t>();
    scalar_t* ga = grad_attn.mutable_data_ptr<scalar_t>();
    const int64_t lp_stride = num_levels * num_points;
    at::parallel_for(0, n * m, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / m, h = t % m;
        const int64_t value_offset = b * s * m * d + h * d;
        for (int64_t q = 0; q < lq; ++q) {
          const int64_t i = (b * lq + q) * m + h;
          backward_query_head<scalar_t, scalar_t>(
              lv, v + value_offset, lp + i * lp_stride * 2, ap + i * lp_stride, go + i * d,
              gv + value_offset, PlainAdd{}, gl + i * lp_stride * 2, ga + i * lp_stride);
        }
      }
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace ms_deform_attn
}  // namespace trp

TORCH_LIBRARY_IMPL(trp, CPU, m) {
  m.impl("ms_deform_attn", &trp::ms_deform_attn::ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &trp::ms_deform_attn::ms_deform_attn_backward_cpu);
}
