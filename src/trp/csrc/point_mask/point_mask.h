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

  // Adds one point and returns sigmoid(logit).
  C10_HOST_DEVICE T add(T logit, T t) {
    // Stable BCE with logits: max(l, 0) - l * t + log(1 + exp(-|l|)), as torch computes it;
    // the same exp(-|l|) gives the sigmoid.
    const T e = std::exp(logit >= T(0) ? -logit : logit);
    ce += (logit > T(0) ? logit : T(0)) - logit * t + std::log1p(e);
    const T s = logit >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
    prob += s;
    target += t;
    inter += s * t;
    return s;
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

// ---- point_mask_loss_layers: points generated inside the op from a seed ----------------------
//
// Counter-based random numbers: a 32-bit xorshift-multiply mix (lowbias32-style) with odd
// constants below 2^31, so every product of a 32-bit value and a constant fits in int64 and the
// Python twin (trp.ops.reference.point_mask_layer_points) reproduces it with int64 torch ops.
constexpr uint32_t kMixA = 0x7feb352dU;
constexpr uint32_t kMixB = 0x31848babU;
// Stream ids of the two point sets of a row: oversampled candidates, then uniform points.
constexpr uint32_t kCandidateStream = 0;
constexpr uint32_t kUniformStream = 1;

C10_HOST_DEVICE inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixA;
  x ^= x >> 15;
  x *= kMixB;
  x ^= x >> 16;
  return x;
}

// Key of one (stream, layer, query) row under a seed; the seed's two 32-bit halves, the stream,
// the layer and the query are folded in one after another.
C10_HOST_DEVICE inline uint32_t row_key(int64_t seed, uint32_t stream, int64_t layer,
                                        int64_t query) {
  const uint64_t s = static_cast<uint64_t>(seed);
  uint32_t h = mix32(static_cast<uint32_t>(s & 0xffffffffULL));
  h = mix32(h ^ static_cast<uint32_t>(s >> 32));
  h = mix32(h ^ stream);
  h = mix32(h ^ static_cast<uint32_t>(layer));
  return mix32(h ^ static_cast<uint32_t>(query));
}

// Uniform in [0, 1) number `counter` of a row: the top 24 bits of the hash times 2^-24, exact in
// float and double. Point i of a row is (uniform(key, 2 i), uniform(key, 2 i + 1)) = (x, y).
template <typename T>
C10_HOST_DEVICE inline T uniform(uint32_t key, int64_t counter) {
  const uint32_t h = mix32(mix32(key ^ static_cast<uint32_t>(counter)));
  // h >> 8 < 2^24: through int32, which converts to floating point faster than uint32.
  return static_cast<T>(static_cast<int32_t>(h >> 8)) * static_cast<T>(1.0 / 16777216.0);
}

// Selection key of a candidate: |logit|, NaN first (-1), as the Python twin orders them. The
// num_uncertain candidates with the smallest (key, index) are kept.
template <typename T>
C10_HOST_DEVICE inline T uncertainty_key(T logit) {
  return logit != logit ? T(-1) : (logit < T(0) ? -logit : logit);
}

// pixel_features [B, C, H, W] and image_index [Q] against the embeddings `embed` (dtype and
// device) of num_queries queries with `channels` channels.
// dlogit of a query with fixed sums, factored per query: d/d logit = a (p - t) +
// (c0 + c1 t) p (1 - p) with p = sigmoid(logit), the same value as dlogit(...).
template <typename T>
struct DlogitCoeffs {
  T a, c0, c1;

  C10_HOST_DEVICE DlogitCoeffs(const Sums<T>& s, int64_t num_points, T grad_ce, T grad_dice) {
    const T num = T(2) * s.inter + T(1);
    const T den = s.prob + s.target + T(1);
    a = grad_ce / T(num_points);
    c0 = grad_dice * num / (den * den);
    c1 = -grad_dice * T(2) / den;
  }

  C10_HOST_DEVICE T operator()(T p, T t) const {
    return a * (p - t) + (c0 + c1 * t) * p * (T(1) - p);
  }
};

inline void check_features_for(const at::Tensor& embed, int64_t num_queries, int64_t channels,
                               const at::Tensor& pixel_features, const at::Tensor& image_index) {
  check_dim(pixel_features, 4, "pixel_features");
  check_same_dtype(embed, pixel_features, "mask_embed", "pixel_features");
  check_same_device(embed, pixel_features, "mask_embed", "pixel_features");
  TORCH_CHECK_VALUE(pixel_features.size(1) == channels,
                    "pixel_features must have shape [B, C, H, W] with C = ", channels,
                    " (mask_embed's channels), got ", pixel_features.sizes());
  TORCH_CHECK_VALUE(pixel_features.size(2) > 0 && pixel_features.size(3) > 0,
                    "pixel_features must have a non-empty H x W grid, got ", pixel_features.sizes());
  check_dtype(image_index, at::kLong, "image_index");
  check_same_device(embed, image_index, "mask_embed", "image_index");
  TORCH_CHECK_VALUE(image_index.dim() == 1 && image_index.size(0) == num_queries,
                    "image_index must have shape [", num_queries, "], got ", image_index.sizes());
  if (image_index.numel() > 0) {
    const int64_t lo = image_index.min().item<int64_t>();
    const int64_t hi = image_index.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < pixel_features.size(0), "image_index must lie in [0, ",
                      pixel_features.size(0), "), got values in [", lo, ", ", hi, "]");
  }
}

inline void check_features(const at::Tensor& mask_embed, const at::Tensor& pixel_features,
                           const at::Tensor& image_index) {
  check_floating(mask_embed, "mask_embed");
  check_dim(mask_embed, 2, "mask_embed");
  check_features_for(mask_embed, mask_embed.size(0), mask_embed.size(1), pixel_features,
                     image_index);
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

// target_masks [Q, Ht, Wt] with Q = num_queries, a non-empty grid, mask_embed's dtype/device.
inline void check_targets(const at::Tensor& mask_embed, const at::Tensor& target_masks,
                          int64_t num_queries) {
  check_same_dtype(mask_embed, target_masks, "mask_embed", "target_masks");
  check_same_device(mask_embed, target_masks, "mask_embed", "target_masks");
  TORCH_CHECK_VALUE(target_masks.dim() == 3 && target_masks.size(0) == num_queries,
                    "target_masks must have shape [Q, Ht, Wt] with Q = ", num_queries, ", got ",
                    target_masks.sizes());
  TORCH_CHECK_VALUE(target_masks.size(1) > 0 && target_masks.size(2) > 0,
                    "target_masks must have a non-empty Ht x Wt grid, got ", target_masks.sizes());
}

inline void check_loss_inputs(const at::Tensor& mask_embed, const at::Tensor& pixel_features,
                              const at::Tensor& image_index, const at::Tensor& target_masks,
                              const at::Tensor& points) {
  check_logits_inputs(mask_embed, pixel_features, image_index, points);
  check_targets(mask_embed, target_masks, mask_embed.size(0));
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

// mask_embed [L, Q, C], pixel_features [B, C, H, W], image_index [Q], target_masks [Q, Ht, Wt]
// and the sampling sizes of point_mask_loss_layers.
inline void check_layers_inputs(const at::Tensor& mask_embed, const at::Tensor& pixel_features,
                                const at::Tensor& image_index, const at::Tensor& target_masks,
                                int64_t num_points, int64_t num_uncertain, int64_t num_candidates,
                                double num_masks) {
  check_floating(mask_embed, "mask_embed");
  TORCH_CHECK_VALUE(mask_embed.dim() == 3, "mask_embed must have shape [L, Q, C], got ",
                    mask_embed.sizes());
  check_features_for(mask_embed, mask_embed.size(1), mask_embed.size(2), pixel_features,
                     image_index);
  check_targets(mask_embed, target_masks, mask_embed.size(1));
  constexpr int64_t kMaxCount = int64_t(1) << 30;  // point counters 2 i + 1 fit in 32 bits
  TORCH_CHECK_VALUE(num_points >= 1 && num_points <= kMaxCount,
                    "num_points must lie in [1, 2^30], got ", num_points);
  TORCH_CHECK_VALUE(num_uncertain >= 0 && num_uncertain <= num_points,
                    "num_uncertain must lie in [0, num_points = ", num_points, "], got ",
                    num_uncertain);
  TORCH_CHECK_VALUE(num_candidates >= num_uncertain && num_candidates <= kMaxCount,
                    "num_candidates must lie in [num_uncertain = ", num_uncertain,
                    ", 2^30], got ", num_candidates);
  TORCH_CHECK_VALUE(num_masks > 0, "num_masks must be positive, got ", num_masks);
}

}  // namespace point_mask
}  // namespace trp
