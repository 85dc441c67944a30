// Multi-scale deformable attention (Deformable-DETR, Zhu et al. 2021): for each batch n, query q
// and head m,
//   out[n, q, m*D:(m+1)*D] = sum_{l, p} attn[n, q, m, l, p] * bilinear(value[n, level l, m, :],
//                                                                  loc[n, q, m, l, p])
// with bilinear sampling as F.grid_sample(align_corners=False, padding_mode="zeros"): the pixel
// coordinate of a location x in [0, 1] is x * W - 0.5 and corners outside the level read 0.
//
// The per-point math (bilinear footprint, forward and backward of one (n, q, m)) is shared by the
// CPU and CUDA launchers, as are the input checks.
#pragma once

#include "common.h"

namespace trp {
namespace ms_deform_attn {

C10_HOST_DEVICE inline float floor_of(float v) { return floorf(v); }
C10_HOST_DEVICE inline double floor_of(double v) { return floor(v); }

// Bilinear footprint of one sampling point in one level: its four corners (y0, x0), (y0, x0 + 1),
// (y0 + 1, x0), (y0 + 1, x0 + 1), with the weights and the weights' derivatives in pixel x and y.
// A corner outside the level has row -1 (it reads 0: zero padding).
template <typename acc_t>
struct Footprint {
  int64_t row[4];  // spatial index y * W + x inside the level
  acc_t weight[4];
  acc_t dweight_dx[4];
  acc_t dweight_dy[4];
};

template <typename acc_t>
C10_HOST_DEVICE inline Footprint<acc_t> footprint(acc_t loc_x, acc_t loc_y, int64_t height,
                                                  int64_t width) {
  Footprint<acc_t> f;
  for (int c = 0; c < 4; ++c) {
    f.row[c] = -1;
    f.weight[c] = f.dweight_dx[c] = f.dweight_dy[c] = acc_t(0);
  }
  const acc_t x = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  // Outside (-1, size) no corner lies in the level. Testing this first also keeps the integer
  // conversion below in range for locations far outside [0, 1] (and rejects NaN).
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(width) &&
        y < static_cast<acc_t>(height))) {
    return f;
  }
  const acc_t x0f = floor_of(x), y0f = floor_of(y);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  const acc_t lx = x - x0f, ly = y - y0f;
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const acc_t w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const acc_t dwdx[4] = {-hy, hy, -ly, ly};
  const acc_t dwdy[4] = {-hx, -lx, hx, lx};
  for (int c = 0; c < 4; ++c) {
    if (xs[c] >= 0 && xs[c] < width && ys[c] >= 0 && ys[c] < height) {
      f.row[c] = ys[c] * width + xs[c];
      f.weight[c] = w[c];
      f.dweight_dx[c] = dwdx[c];
      f.dweight_dy[c] = dwdy[c];
    }
  }
  return f;
}

// Pointers and sizes of one (n, m) slice. value_nm points at value[n, 0, m, 0]; consecutive
// spatial rows are row_stride = M * D elements apart. loc points at loc[n, q, m] ([L, P, 2]),
// attn at attn[n, q, m] ([L, P]); shapes is [L, 2] (H, W), starts is [L].
struct Levels {
  const int64_t* shapes;
  const int64_t* starts;
  int64_t num_levels;
  int64_t num_points;
  int64_t row_stride;
  int64_t channels;
};

template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline Footprint<acc_t> point_footprint(const Levels& lv, const scalar_t* loc,
                                                        int64_t l, int64_t k) {
  return footprint<acc_t>(static_cast<acc_t>(loc[2 * k]), static_cast<acc_t>(loc[2 * k + 1]),
                          lv.shapes[2 * l], lv.shapes[2 * l + 1]);
}

// Forward of one (n, q, m) and one channel d (the CUDA launcher's thread granularity, so that
// consecutive threads read consecutive channels).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t forward_channel(const Levels& lv, const scalar_t* value_nm,
                                             const scalar_t* loc, const scalar_t* attn,
                                             int64_t d) {
  acc_t out = acc_t(0);
  for (int64_t l = 0; l < lv.num_levels; ++l) {
    const scalar_t* level = value_nm + lv.starts[l] * lv.row_stride + d;
    for (int64_t p = 0; p < lv.num_points; ++p) {
      const int64_t k = l * lv.num_points + p;
      const Footprint<acc_t> f = point_footprint<scalar_t, acc_t>(lv, loc, l, k);
      acc_t sample = acc_t(0);
      for (int c = 0; c < 4; ++c) {
        if (f.row[c] >= 0) {
          sample += f.weight[c] * static_cast<acc_t>(level[f.row[c] * lv.row_stride]);
        }
      }
      out += static_cast<acc_t>(attn[k]) * sample;
    }
  }
  return out;
}

// <a, b> over n elements with four independent partial sums: without -ffast-math one running sum
// is a serial dependency chain that the compiler may not reorder into vector lanes.
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline acc_t dot_product(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t s[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int j = 0; j < 4; ++j) {
      s[j] += static_cast<acc_t>(a[i + j]) * static_cast<acc_t>(b[i + j]);
    }
  }
  for (; i < n; ++i) {
    s[0] += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// The location and weight gradients of one point, from the dot products <grad_out, value row>
// of its corners (shared by backward_query_head and the CPU launcher's vectorised channel loop).
template <typename acc_t>
struct PointGrad {
  acc_t attn = acc_t(0), x = acc_t(0), y = acc_t(0);

  C10_HOST_DEVICE void add(const Footprint<acc_t>& f, int corner, acc_t dot) {
    attn += f.weight[corner] * dot;
    x += f.dweight_dx[corner] * dot;
    y += f.dweight_dy[corner] * dot;
  }

  // Point k of level l, attention weight a.
  template <typename scalar_t>
  C10_HOST_DEVICE void store(const Levels& lv, int64_t l, int64_t k, acc_t a, scalar_t* grad_loc,
                             scalar_t* grad_attn) const {
    grad_attn[k] = static_cast<scalar_t>(attn);
    // d pixel / d loc is the level's size (pixel = loc * size - 0.5).
    grad_loc[2 * k] = static_cast<scalar_t>(a * x * static_cast<acc_t>(lv.shapes[2 * l + 1]));
    grad_loc[2 * k + 1] = static_cast<scalar_t>(a * y * static_cast<acc_t>(lv.shapes[2 * l]));
  }
};

// Backward of one (n, q, m). Writes grad_loc ([L, P, 2]) and grad_attn ([L, P]) of this
// (n, q, m) and adds into grad_value_nm (value's layout, opmath type) through `add`, which is a
// plain += where the caller owns grad_value[n, :, m, :] and an atomic add where it does not.
template <typename scalar_t, typename acc_t, typename AddTo>
C10_HOST_DEVICE inline void backward_query_head(const Levels& lv, const scalar_t* value_nm,
                                                const scalar_t* loc, const scalar_t* attn,
                                                const scalar_t* grad_out, acc_t* grad_value_nm,
                                                AddTo add, scalar_t* grad_loc,
                                                scalar_t* grad_attn) {
  const int64_t D = lv.channels;
  for (int64_t l = 0; l < lv.num_levels; ++l) {
    const int64_t level_offset = lv.starts[l] * lv.row_stride;
    const scalar_t* level = value_nm + level_offset;
    acc_t* grad_level = grad_value_nm + level_offset;
    for (int64_t p = 0; p < lv.num_points; ++p) {
      const int64_t k = l * lv.num_points + p;
      const Footprint<acc_t> f = point_footprint<scalar_t, acc_t>(lv, loc, l, k);
      const acc_t a = static_cast<acc_t>(attn[k]);
      PointGrad<acc_t> g;
      for (int c = 0; c < 4; ++c) {
        if (f.row[c] < 0) {
          continue;
        }
        const scalar_t* v = level + f.row[c] * lv.row_stride;
        acc_t* gv = grad_level + f.row[c] * lv.row_stride;
        const acc_t wa = a * f.weight[c];
        for (int64_t d = 0; d < D; ++d) {
          add(gv + d, wa * static_cast<acc_t>(grad_out[d]));
        }
        g.add(f, c, dot_product<acc_t>(grad_out, v, D));
      }
      g.store(lv, l, k, a, grad_loc, grad_attn);
    }
  }
}

// Host-side checks shared by both launchers; the level sizes are read on the host.
inline void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights) {
  check_floating(value, "value");
  check_dim(value, 4, "value");
  check_dtype(spatial_shapes, at::kLong, "spatial_shapes");
  check_dtype(level_start_index, at::kLong, "level_start_index");
  check_same_dtype(value, sampling_locations, "value", "sampling_locations");
  check_same_dtype(value, attention_weights, "value", "attention_weights");
  check_same_device(value, spatial_shapes, "value", "spatial_shapes");
  check_same_device(value, level_start_index, "value", "level_start_index");
  check_same_device(value, sampling_locations, "value", "sampling_locations");
  check_same_device(value, attention_weights, "value", "attention_weights");
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 &&
                        spatial_shapes.size(0) >= 1,
                    "spatial_shapes must have shape [L, 2] with L >= 1, got ",
                    spatial_shapes.sizes());
  const int64_t num_levels = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == num_levels,
                    "level_start_index must have shape [", num_levels, "], got ",
                    level_start_index.sizes());
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2);
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(0) == n &&
                        sampling_locations.size(2) == m &&
                        sampling_locations.size(3) == num_levels &&
                        sampling_locations.size(5) == 2,
                    "sampling_locations must have shape [N, Lq, M, L, P, 2] = [", n, ", Lq, ", m,
                    ", ", num_levels, ", P, 2], got ", sampling_locations.sizes());
  const int64_t lq = sampling_locations.size(1), p = sampling_locations.size(4);
  TORCH_CHECK_VALUE(attention_weights.dim() == 5 && attention_weights.size(0) == n &&
                        attention_weights.size(1) == lq && attention_weights.size(2) == m &&
                        attention_weights.size(3) == num_levels && attention_weights.size(4) == p,
                    "attention_weights must have shape [N, Lq, M, L, P] = [", n, ", ", lq, ", ",
                    m, ", ", num_levels, ", ", p, "], got ", attention_weights.sizes());
  const at::Tensor shapes = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* hw = shapes.const_data_ptr<int64_t>();
  const int64_t* st = starts.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < num_levels; ++l) {
    TORCH_CHECK_VALUE(hw[2 * l] >= 1 && hw[2 * l + 1] >= 1,
                      "spatial_shapes must be positive, got (", hw[2 * l], ", ", hw[2 * l + 1],
                      ") at level ", l);
    TORCH_CHECK_VALUE(st[l] == total, "level_start_index[", l, "] must be ", total,
                      " (the sum of H * W of the levels before it), got ", st[l]);
    total += hw[2 * l] * hw[2 * l + 1];
  }
  TORCH_CHECK_VALUE(s == total, "value.shape[1] must equal sum(H * W) over levels = ", total,
                    ", got ", s);
}

inline void check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& value,
                                  const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_same_dtype(value, grad_output, "value", "grad_output");
  check_same_device(value, grad_output, "value", "grad_output");
  const int64_t n = value.size(0), lq = sampling_locations.size(1);
  const int64_t md = value.size(2) * value.size(3);
  TORCH_CHECK_VALUE(grad_output.dim() == 3 && grad_output.size(0) == n &&
                        grad_output.size(1) == lq && grad_output.size(2) == md,
                    "grad_output must have shape [N, Lq, M * D] = [", n, ", ", lq, ", ", md,
                    "], got ", grad_output.sizes());
}

}  // namespace ms_deform_attn
}  // namespace trp
