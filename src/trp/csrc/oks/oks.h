// Object keypoint similarity (COCO) of each image's predictions against its own targets, packed
// like match_cost: image b's [Q, G_b] block starts at Q * tgt_offsets[b] of the [Q * G] output.
//
// pycocotools' COCOeval.computeOks, term by term: e = d^2 / (2 sigma)^2 / (area + eps) / 2 with
// eps = np.spacing(1), OKS = sum over visible keypoints (v > 0) of exp(-e) / #visible. A target
// without visible keypoints has OKS 0 here (pycocotools falls back to a box distance instead).
#pragma once

#include <cmath>

#include "common.h"

namespace trp {
namespace oks {

template <typename T, typename Load>
C10_HOST_DEVICE inline T element_oks(int64_t k, const int64_t* offsets, int64_t num_images,
                                     int64_t num_queries, int64_t num_keypoints, Load load) {
  const int64_t b = find_block(offsets, num_images, num_queries, k);
  const int64_t local = k - offsets[b] * num_queries;
  const int64_t g_b = offsets[b + 1] - offsets[b];
  const int64_t q = local / g_b;
  const int64_t g = offsets[b] + local % g_b;
  const int64_t pred = (b * num_queries + q) * num_keypoints;
  const int64_t tgt = g * num_keypoints;
  // np.spacing(1): the same epsilon in every dtype, as in pycocotools.
  const T area = load.area(g) + T(2.220446049250313e-16);
  T sum = T(0);
  int64_t visible = 0;
  for (int64_t j = 0; j < num_keypoints; ++j) {
    if (load.visibility(tgt + j) > T(0)) {
      const T dx = load.pred(2 * (pred + j)) - load.tgt(2 * (tgt + j));
      const T dy = load.pred(2 * (pred + j) + 1) - load.tgt(2 * (tgt + j) + 1);
      const T two_sigma = T(2) * load.sigma(j);
      const T e = (dx * dx + dy * dy) / (two_sigma * two_sigma) / area / T(2);
      sum += std::exp(-e);
      ++visible;
    }
  }
  return visible > 0 ? sum / T(visible) : T(0);
}

inline void check_inputs(const at::Tensor& pred_keypoints, const at::Tensor& tgt_keypoints,
                         const at::Tensor& tgt_visibility, const at::Tensor& tgt_areas,
                         const at::Tensor& sigmas, const at::Tensor& tgt_offsets) {
  check_floating(pred_keypoints, "pred_keypoints");
  TORCH_CHECK_VALUE(pred_keypoints.dim() == 4 && pred_keypoints.size(3) == 2,
                    "pred_keypoints must have shape [B, Q, K, 2], got ", pred_keypoints.sizes());
  const int64_t k = pred_keypoints.size(2);
  TORCH_CHECK_VALUE(tgt_keypoints.dim() == 3 && tgt_keypoints.size(1) == k &&
                        tgt_keypoints.size(2) == 2,
                    "tgt_keypoints must have shape [G, ", k, ", 2], got ", tgt_keypoints.sizes());
  const int64_t g = tgt_keypoints.size(0);
  TORCH_CHECK_VALUE(tgt_visibility.dim() == 2 && tgt_visibility.size(0) == g &&
                        tgt_visibility.size(1) == k,
                    "tgt_visibility must have shape [", g, ", ", k, "], got ",
                    tgt_visibility.sizes());
  TORCH_CHECK_VALUE(tgt_areas.dim() == 1 && tgt_areas.size(0) == g,
                    "tgt_areas must have shape [", g, "], got ", tgt_areas.sizes());
  TORCH_CHECK_VALUE(sigmas.dim() == 1 && sigmas.size(0) == k, "sigmas must have shape [", k,
                    "], got ", sigmas.sizes());
  check_same_dtype(pred_keypoints, tgt_keypoints, "pred_keypoints", "tgt_keypoints");
  check_same_dtype(pred_keypoints, tgt_visibility, "pred_keypoints", "tgt_visibility");
  check_same_dtype(pred_keypoints, tgt_areas, "pred_keypoints", "tgt_areas");
  check_same_dtype(pred_keypoints, sigmas, "pred_keypoints", "sigmas");
  check_same_device(pred_keypoints, tgt_keypoints, "pred_keypoints", "tgt_keypoints");
  check_same_device(pred_keypoints, tgt_visibility, "pred_keypoints", "tgt_visibility");
  check_same_device(pred_keypoints, tgt_areas, "pred_keypoints", "tgt_areas");
  check_same_device(pred_keypoints, sigmas, "pred_keypoints", "sigmas");
  check_same_device(pred_keypoints, tgt_offsets, "pred_keypoints", "tgt_offsets");
  check_offsets(tgt_offsets, pred_keypoints.size(0), g, "tgt_offsets");
}

}  // namespace oks
}  // namespace trp
