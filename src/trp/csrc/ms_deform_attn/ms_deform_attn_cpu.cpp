// CPU launcher of ms_deform_attn. Forward: at::parallel_for over (n, q, m), each computing its D
// channels. Backward: at::parallel_for over (n, m); task (n, m) owns grad_value[n, :, m, :] and
// the grad_sampling_locations / grad_attention_weights entries of every (n, q, m), so no two
// tasks ever write the same element and no atomics are needed.
//
// The footprints and the gradient formulas are the shared math of ms_deform_attn.h; only the loop
// over the D contiguous channels of a value row is CPU-specific: at::vec::Vectorized over the
// channels (this unit is compiled per instruction set, see cpu_capability.h), with the forward's
// output held in vector registers across all L * P * 4 corners instead of read and written back
// per corner.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn/ms_deform_attn.h"
#include "cpu_capability.h"

namespace trp {
namespace ms_deform_attn {
namespace {

using at::vec::Vectorized;

// One corner of one sampling point: its value row (offset from value[n, 0, m, 0]) and its weight
// attention * bilinear weight.
template <typename scalar_t>
struct Corner {
  int64_t offset;
  scalar_t weight;
};

// The in-level corners of every point of one (n, q, m), levels and points in order.
template <typename scalar_t>
int64_t gather_corners(const Levels& lv, const scalar_t* loc, const scalar_t* attn,
                       Corner<scalar_t>* corners) {
  int64_t count = 0;
  for (int64_t l = 0; l < lv.num_levels; ++l) {
    for (int64_t p = 0; p < lv.num_points; ++p) {
      const int64_t k = l * lv.num_points + p;
      const Footprint<scalar_t> f = point_footprint<scalar_t, scalar_t>(lv, loc, l, k);
      for (int c = 0; c < 4; ++c) {
        if (f.row[c] >= 0) {
          corners[count++] = {(lv.starts[l] + f.row[c]) * lv.row_stride, attn[k] * f.weight[c]};
        }
      }
    }
  }
  return count;
}

// out[d0 : d0 + NV * lanes] (or the last `tail` < lanes channels when NV == 0) = sum over the
// corners of weight * row, accumulated in registers.
template <int NV, typename scalar_t>
void weighted_sum(const scalar_t* value_nm, const Corner<scalar_t>* corners, int64_t count,
                  int64_t d0, int64_t tail, scalar_t* out) {
  using Vec = Vectorized<scalar_t>;
  constexpr int kVectors = NV > 0 ? NV : 1;
  Vec acc[kVectors];
  for (int j = 0; j < kVectors; ++j) {
    acc[j] = Vec(scalar_t(0));
  }
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t* row = value_nm + corners[i].offset + d0;
    const Vec w(corners[i].weight);
    if constexpr (NV > 0) {
      for (int j = 0; j < NV; ++j) {
        acc[j] = at::vec::fmadd(w, Vec::loadu(row + j * Vec::size()), acc[j]);
      }
    } else {
      acc[0] = at::vec::fmadd(w, Vec::loadu(row, tail), acc[0]);
    }
  }
  if constexpr (NV > 0) {
    for (int j = 0; j < NV; ++j) {
      acc[j].store(out + d0 + j * Vec::size());
    }
  } else {
    acc[0].store(out + d0, tail);
  }
}

template <typename scalar_t>
void forward_row(const Levels& lv, const scalar_t* value_nm, const Corner<scalar_t>* corners,
                 int64_t count, scalar_t* out) {
  constexpr int64_t lanes = Vectorized<scalar_t>::size();
  const int64_t D = lv.channels;
  int64_t d = 0;
  for (; d + 4 * lanes <= D; d += 4 * lanes) {
    weighted_sum<4>(value_nm, corners, count, d, 0, out);
  }
  if (d + 2 * lanes <= D) {
    weighted_sum<2>(value_nm, corners, count, d, 0, out);
    d += 2 * lanes;
  }
  if (d + lanes <= D) {
    weighted_sum<1>(value_nm, corners, count, d, 0, out);
    d += lanes;
  }
  if (d < D) {
    weighted_sum<0>(value_nm, corners, count, d, D - d, out);
  }
}

// grad_row += weight * grad_out over the D channels; returns <grad_out, row>.
template <typename scalar_t>
scalar_t scatter_and_dot(const scalar_t* grad_out, const scalar_t* row, scalar_t* grad_row,
                         scalar_t weight, int64_t D) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t lanes = Vec::size();
  const Vec w(weight);
  // Two partial sums: one running sum would be a serial chain of fused multiply-adds.
  Vec dot0(scalar_t(0)), dot1(scalar_t(0));
  int64_t d = 0;
  for (; d + 2 * lanes <= D; d += 2 * lanes) {
    const Vec g0 = Vec::loadu(grad_out + d), g1 = Vec::loadu(grad_out + d + lanes);
    at::vec::fmadd(w, g0, Vec::loadu(grad_row + d)).store(grad_row + d);
    at::vec::fmadd(w, g1, Vec::loadu(grad_row + d + lanes)).store(grad_row + d + lanes);
    dot0 = at::vec::fmadd(g0, Vec::loadu(row + d), dot0);
    dot1 = at::vec::fmadd(g1, Vec::loadu(row + d + lanes), dot1);
  }
  for (; d < D; d += lanes) {
    const int64_t n = std::min<int64_t>(lanes, D - d);
    const Vec g = Vec::loadu(grad_out + d, n);  // lanes >= n read as 0
    at::vec::fmadd(w, g, Vec::loadu(grad_row + d, n)).store(grad_row + d, n);
    dot0 = at::vec::fmadd(g, Vec::loadu(row + d, n), dot0);
  }
  return at::vec::vec_reduce_all<scalar_t>([](Vec& a, Vec& b) { return a + b; }, dot0 + dot1);
}

// backward_query_head with the channel loops of scatter_and_dot.
template <typename scalar_t>
void backward_row(const Levels& lv, const scalar_t* value_nm, const scalar_t* loc,
                  const scalar_t* attn, const scalar_t* grad_out, scalar_t* grad_value_nm,
                  scalar_t* grad_loc, scalar_t* grad_attn) {
  for (int64_t l = 0; l < lv.num_levels; ++l) {
    const int64_t level_offset = lv.starts[l] * lv.row_stride;
    for (int64_t p = 0; p < lv.num_points; ++p) {
      const int64_t k = l * lv.num_points + p;
      const Footprint<scalar_t> f = point_footprint<scalar_t, scalar_t>(lv, loc, l, k);
      const scalar_t a = attn[k];
      PointGrad<scalar_t> g;
      for (int c = 0; c < 4; ++c) {
        if (f.row[c] < 0) {
          continue;
        }
        const int64_t offset = level_offset + f.row[c] * lv.row_stride;
        g.add(f, c,
              scatter_and_dot(grad_out, value_nm + offset, grad_value_nm + offset,
                              a * f.weight[c], lv.channels));
      }
      g.store(lv, l, k, a, grad_loc, grad_attn);
    }
  }
}

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
      std::vector<Corner<scalar_t>> corners(4 * lp_stride);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (lq * m), h = i % m;
        const int64_t count =
            gather_corners(lv, lp + i * lp_stride * 2, ap + i * lp_stride, corners.data());
        forward_row(lv, v + b * s * m * d + h * d, corners.data(), count, o + i * d);
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
          backward_row(lv, v + value_offset, lp + i * lp_stride * 2, ap + i * lp_stride,
                       go + i * d, gv + value_offset, gl + i * lp_stride * 2,
                       ga + i * lp_stride);
        }
      }
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace ms_deform_attn
}  // namespace trp

TRP_CPU_KERNELS(ms_deform_attn, m) {
  m.impl("ms_deform_attn", &trp::ms_deform_attn::ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &trp::ms_deform_attn::ms_deform_attn_backward_cpu);
}
