// Mask2Former point losses without full-resolution mask logits.
//
// logit(q, p) = embed[q] . bilinear(features[image_index[q]], points[q, p]); bilinear sampling is
// linear, so it equals sampling the [H, W] logit map of query q without building it. Targets are
// sampled from target_masks[q] at the same normalised points. Sampling follows grid_sample with
// align_corners=False and zero padding (Mask2Former's point_sample): pixel = coord * size - 0.5.
#pragma once

#include <cmath>

#include "common.h"

namespace trp {
namespace point_mask {

// The four bilinear corners of one point: flat indices iy * W + ix and their weights; a corner
// outside the grid has weight 0 and index 0, so callers never branch on validity.
template <typename T>
struct Corners {
  int64_t index[4];
  T weight[4];
};

// Pixel coordinate clamped to [-2, size + 1]: every corner of a point clamped there lies outside
// the grid, as it did before, and the float -> int conversion stays defined (NaN goes to -2).
template <typename T>
C10_HOST_DEVICE inline T clamp_coord(T p, int64_t size) {
  const T hi = T(size + 1);
  return !(p >= T(-2)) ? T(-2) : (p > hi ? hi : p);
}

template <typename T>
C10_HOST_DEVICE inline Corners<T> corners(T x, T y, int64_t height, int64_t width) {
  const T px = clamp_coord(x * T(width) - T(0.5), width);
  const T py = clamp_coord(y * T(height) - T(0.5), height);
  // px >= -2, so truncating px + 2 is floor(px) + 2: no libm call in this hot loop.
  const int64_t x0 = static_cast<int64_t>(px + T(2)) - 2;
  const int64_t y0 = static_cast<int64_t>(py + T(2)) - 2;
  const T ax = px - T(x0), ay = py - T(y0);
  Corners<T> c;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const T ws[4] = {(T(1) - ax) * (T(1) - ay), ax * (T(1) - ay), (T(1) - ax) * ay, ax * ay};
  for (int k = 0; k < 4; ++k) {
    const bool inside = xs[k] >= 0 && xs[k] < width && ys[k] >= 0 && ys[k] < height;
    c.index[k] = inside ? ys[k] * width + xs[k] : 0;
    c.weight[k] = inside ? ws[k] : T(0);
  }
  return c;
}

// Bilinear sample of a flat [H * W] map through its corners.
template <typename T, typename Map>
C10_HOST_DEVICE inline T sample(const Map& map, const Corners<T>& c) {
  T v = T(0);
  for (int k = 0; k < 4; ++k) {
    v += c.weight[k] * static_cast<T>(map[c.index[k]]);
  }
  return v;
}

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Per-query sums over points: sigmoid-CE, sigmoid(logit), target, sigmoid(logit) * target.
template <typename T>
struct Sums {
  T ce = T(0);
  T prob = T(0);
  T target = T(0);
  T inter = T(0);

  C10_HOST_DEVICE void add(T logit, T t) {
    // Stable BCE with logits: max(l, 0) - l * t + log(1 + exp(-|l|)), as torch computes it;
    // the same exp(-|l|) gives the sigmoid.
    const T e = std::exp(logit >= T(0) ? -logit : logit);
    ce += (logit > T(0) ? logit : T(0)) - logit * t + std::log1p(e);
    const T s = logit >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
    prob += s;
    target += t;
    inter += s * t;
  }
};

// Loss of one query from its sums over num_points points: [mean sigmoid-CE, dice].
template <typename T>
C10_HOST_DEVICE inline void losses(const Sums<T>& s, int64_t num_points, T* out) {
  out[0] = s.ce / T(num_points);
  out[1] = T(1) - (T(2) * s.inter + T(1)) / (s.prob + s.target + T(1));
}

// d(grad_ce * ce + grad_dice * dice) / d logit at one point of a query with sums `s`.
template <typename T>
C10_HOST_DEVICE inline T dlogit(T logit, T t, const Sums<T>& s, int64_t num_points, T grad_ce,
                                T grad_dice) {
  const T p = sigmoid(logit);
  const T num = T(2) * s.inter + T(1);
  const T den = s.prob + s.target + T(1);
  const T ddice_dp = -(T(2) * t * den - num) / (den * den);
  return grad_ce * (p - t) / T(num_points) + grad_dice * ddice_dp * p * (T(1) - p);
}

inline void check_features(const at::Tensor& mask_embed, const at::Tensor& pixel_features,
                           const at::Tensor& image_index) {
  check_floating(mask_embed, "mask_embed");
  check_dim(mask_embed, 2, "mask_embed");
  check_dim(pixel_features, 4, "pixel_features");
  check_same_dtype(mask_embed, pixel_features, "mask_embed", "pixel_features");
  check_same_device(mask_embed, pixel_features, "mask_embed", "pixel_features");
  TORCH_CHECK_VALUE(pixel_features.size(1) == mask_embed.size(1),
                    "pixel_features must have shape [B, C, H, W] with C = ", mask_embed.size(1),
                    " (mask_embed's channels), got ", pixel_features.sizes());
  TORCH_CHECK_VALUE(pixel_features.size(2) > 0 && pixel_features.size(3) > 0,
                    "pixel_features must have a non-empty H x W grid, got ", pixel_features.sizes());
  check_dtype(image_index, at::kLong, "image_index");
  check_same_device(mask_embed, image_index, "mask_embed", "image_index");
  TORCH_CHECK_VALUE(image_index.dim() == 1 && image_index.size(0) == mask_embed.size(0),
                    "image_index must have shape [", mask_embed.size(0), "], got ",
                    image_index.sizes());
  if (image_index.numel() > 0) {
    const int64_t lo = image_index.min().item<int64_t>();
    const int64_t hi = image_index.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < pixel_features.size(0), "image_index must lie in [0, ",
                      pixel_features.size(0), "), got values in [", lo, ", ", hi, "]");
  }
}

inline void check_points(const at::Tensor& mask_embed, const at::Tensor& points) {
  check_same_dtype(mask_embed, points, "mask_embed", "points");
  check_same_device(mask_embed, points, "mask_embed", "points");
  TORCH_CHECK_VALUE(points.dim() == 3 && points.size(0) == mask_embed.size(0) &&
                        points.size(2) == 2,
                    "points must have shape [Q, P, 2] with Q = ", mask_embed.size(0), ", got ",
                    points.sizes());
}

inline void check_logits_inputs(const at::Tensor& mask_embed, const at::Tensor& pixel_features,
                                const at::Tensor& image_index, const at::Tensor& points) {
  check_features(mask_embed, pixel_features, image_index);
  check_points(mask_embed, points);
}

inline void check_loss_inputs(const at::Tensor& mask_embed, const at::Tensor& pixel_features,
                              const at::Tensor& image_index, const at::Tensor& target_masks,
                              const at::Tensor& points) {
  check_logits_inputs(mask_embed, pixel_features, image_index, points);
  check_same_dtype(mask_embed, target_masks, "mask_embed", "target_masks");
  check_same_device(mask_embed, target_masks, "mask_embed", "target_masks");
  TORCH_CHECK_VALUE(target_masks.dim() == 3 && target_masks.size(0) == mask_embed.size(0),
                    "target_masks must have shape [Q, Ht, Wt] with Q = ", mask_embed.size(0),
                    ", got ", target_masks.sizes());
  TORCH_CHECK_VALUE(target_masks.size(1) > 0 && target_masks.size(2) > 0,
                    "target_masks must have a non-empty Ht x Wt grid, got ", target_masks.sizes());
  TORCH_CHECK_VALUE(points.size(1) > 0, "points must hold at least one point per query");
}

inline void check_grad(const at::Tensor& grad, const at::Tensor& mask_embed, int64_t cols,
                       const char* shape) {
  check_same_dtype(mask_embed, grad, "mask_embed", "grad");
  check_same_device(mask_embed, grad, "mask_embed", "grad");
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == mask_embed.size(0) && grad.size(1) == cols,
                    "grad must have shape ", shape, " = [", mask_embed.size(0), ", ", cols,
                    "], got ", grad.sizes());
}

}  // namespace point_mask
}  // namespace trp
