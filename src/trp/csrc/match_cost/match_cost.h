// DETR-family matching cost, per image: cost[b][q, g] between image b's predictions and its own
// targets only. The output is packed: image b's [Q, G_b] block starts at Q * tgt_offsets[b], so
// the whole output is [Q * G] and no [B * Q, sum G] matrix exists.
#pragma once

#include "box_iou/box_iou.h"
#include "common.h"

namespace trp {
namespace match_cost {

template <typename T>
C10_HOST_DEVICE inline void cxcywh_to_xyxy(const T* c, T* out) {
  out[0] = c[0] - c[2] / T(2);
  out[1] = c[1] - c[3] / T(2);
  out[2] = c[0] + c[2] / T(2);
  out[3] = c[1] + c[3] / T(2);
}

// Cost of packed element k (0 <= k < Q * G); `class_cost` is [B, Q, K], boxes are cxcywh.
template <typename T, typename Load>
C10_HOST_DEVICE inline T element_cost(int64_t k, const int64_t* offsets, int64_t num_images,
                                      int64_t num_queries, int64_t num_classes, Load load,
                                      const int64_t* labels, T w_class, T w_bbox, T w_giou) {
  const int64_t b = find_block(offsets, num_images, num_queries, k);
  const int64_t local = k - offsets[b] * num_queries;
  const int64_t g_b = offsets[b + 1] - offsets[b];
  const int64_t q = local / g_b;
  const int64_t g = offsets[b] + local % g_b;
  const int64_t pq = b * num_queries + q;

  T pred[4], tgt[4];
  T l1 = T(0);
  for (int c = 0; c < 4; ++c) {
    pred[c] = load.pred_box(pq * 4 + c);
    tgt[c] = load.tgt_box(g * 4 + c);
    const T d = pred[c] - tgt[c];
    l1 += d < T(0) ? -d : d;
  }
  T pred_xyxy[4], tgt_xyxy[4];
  cxcywh_to_xyxy(pred, pred_xyxy);
  cxcywh_to_xyxy(tgt, tgt_xyxy);
  const T giou = box_iou::pair_iou(pred_xyxy, tgt_xyxy, true);
  const T cls = load.class_cost(pq * num_classes + labels[g]);
  return w_class * cls + w_bbox * l1 - w_giou * giou;
}

inline void check_inputs(const at::Tensor& class_cost, const at::Tensor& pred_boxes,
                         const at::Tensor& tgt_labels, const at::Tensor& tgt_boxes,
                         const at::Tensor& tgt_offsets) {
  check_floating(class_cost, "class_cost");
  check_dim(class_cost, 3, "class_cost");
  check_floating(pred_boxes, "pred_boxes");
  TORCH_CHECK_VALUE(pred_boxes.dim() == 3 && pred_boxes.size(0) == class_cost.size(0) &&
                        pred_boxes.size(1) == class_cost.size(1) && pred_boxes.size(2) == 4,
                    "pred_boxes must have shape [B, Q, 4] = [", class_cost.size(0), ", ",
                    class_cost.size(1), ", 4], got ", pred_boxes.sizes());
  check_boxes(tgt_boxes, "tgt_boxes");
  check_dtype(tgt_labels, at::kLong, "tgt_labels");
  TORCH_CHECK_VALUE(tgt_labels.dim() == 1 && tgt_labels.size(0) == tgt_boxes.size(0),
                    "tgt_labels must have shape [", tgt_boxes.size(0), "], got ",
                    tgt_labels.sizes());
  check_same_dtype(class_cost, pred_boxes, "class_cost", "pred_boxes");
  check_same_dtype(class_cost, tgt_boxes, "class_cost", "tgt_boxes");
  check_same_device(class_cost, pred_boxes, "class_cost", "pred_boxes");
  check_same_device(class_cost, tgt_boxes, "class_cost", "tgt_boxes");
  check_same_device(class_cost, tgt_labels, "class_cost", "tgt_labels");
  check_same_device(class_cost, tgt_offsets, "class_cost", "tgt_offsets");
  check_offsets(tgt_offsets, class_cost.size(0), tgt_boxes.size(0), "tgt_offsets");
  if (tgt_labels.numel() > 0) {
    const int64_t lo = tgt_labels.min().item<int64_t>();
    const int64_t hi = tgt_labels.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < class_cost.size(2), "tgt_labels must lie in [0, ",
                      class_cost.size(2), "), got values in [", lo, ", ", hi, "]");
    TORCH_CHECK_VALUE(class_cost.size(1) > 0, "targets need at least one query to match");
  }
}

}  // namespace match_cost
}  // namespace trp
