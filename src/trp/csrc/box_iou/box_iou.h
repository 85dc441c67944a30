// Pairwise (generalized) IoU of xyxy boxes: the per-pair math, shared by the CPU and CUDA
// launchers, and the input checks shared by both.
#pragma once

#include "common.h"

namespace trp {
namespace box_iou {

template <typename T>
C10_HOST_DEVICE inline T max2(T x, T y) { return x > y ? x : y; }

template <typename T>
C10_HOST_DEVICE inline T min2(T x, T y) { return x < y ? x : y; }

// Backward of max(x, y) / min(x, y) with torch's convention: ties split the gradient in half.
template <typename T>
C10_HOST_DEVICE inline void max2_backward(T x, T y, T g, T& gx, T& gy) {
  if (x > y) {
    gx += g;
  } else if (x < y) {
    gy += g;
  } else {
    gx += g / T(2);
    gy += g / T(2);
  }
}

template <typename T>
C10_HOST_DEVICE inline void min2_backward(T x, T y, T g, T& gx, T& gy) {
  // min(x, y) = -max(-x, -y)
  max2_backward(-x, -y, g, gx, gy);
}

// IoU (or GIoU when `generalized`) of box a and box b, both xyxy, like torchvision.ops.
template <typename T>
C10_HOST_DEVICE inline T pair_iou(const T* a, const T* b, bool generalized) {
  const T area_a = (a[2] - a[0]) * (a[3] - a[1]);
  const T area_b = (b[2] - b[0]) * (b[3] - b[1]);
  const T w = max2(min2(a[2], b[2]) - max2(a[0], b[0]), T(0));
  const T h = max2(min2(a[3], b[3]) - max2(a[1], b[1]), T(0));
  const T inter = w * h;
  const T uni = area_a + area_b - inter;
  const T iou = safe_div(inter, uni);
  if (!generalized) {
    return iou;
  }
  const T cw = max2(max2(a[2], b[2]) - min2(a[0], b[0]), T(0));
  const T ch = max2(max2(a[3], b[3]) - min2(a[1], b[1]), T(0));
  const T area_c = cw * ch;
  return iou - safe_div(area_c - uni, area_c);
}

// Adds g * d pair_iou / d a into ga[4] and g * d pair_iou / d b into gb[4].
template <typename T>
C10_HOST_DEVICE inline void pair_iou_backward(const T* a, const T* b, bool generalized, T g, T* ga,
                                              T* gb) {
  const T wa = a[2] - a[0], ha = a[3] - a[1];
  const T wb = b[2] - b[0], hb = b[3] - b[1];
  const T ix0 = max2(a[0], b[0]), iy0 = max2(a[1], b[1]);
  const T ix1 = min2(a[2], b[2]), iy1 = min2(a[3], b[3]);
  const T w_raw = ix1 - ix0, h_raw = iy1 - iy0;
  const T w = max2(w_raw, T(0)), h = max2(h_raw, T(0));
  const T inter = w * h;
  const T uni = wa * ha + wb * hb - inter;

  // iou = inter / (area_a + area_b - inter)
  T g_inter = uni > T(0) ? g * (T(1) / uni + inter / (uni * uni)) : T(0);
  T g_area = uni > T(0) ? -g * inter / (uni * uni) : T(0);  // same for area_a and area_b

  T g_cw = T(0), g_ch = T(0);
  T cx0 = T(0), cy0 = T(0), cx1 = T(0), cy1 = T(0), cw = T(0), ch = T(0);
  if (generalized) {
    cx0 = min2(a[0], b[0]);
    cy0 = min2(a[1], b[1]);
    cx1 = max2(a[2], b[2]);
    cy1 = max2(a[3], b[3]);
    cw = max2(cx1 - cx0, T(0));
    ch = max2(cy1 - cy0, T(0));
    const T area_c = cw * ch;
    if (area_c > T(0)) {
      // giou = iou - 1 + uni / area_c
      const T g_uni = g / area_c;
      const T g_area_c = -g * uni / (area_c * area_c);
      g_area += g_uni;
      g_inter -= g_uni;
      g_cw = g_area_c * ch;
      g_ch = g_area_c * cw;
    }
  }

  // clamp(min=0) passes the gradient only where its input is > 0, as torch does.
  const T g_w = w_raw > T(0) ? g_inter * h : T(0);
  const T g_h = h_raw > T(0) ? g_inter * w : T(0);
  min2_backward(a[2], b[2], g_w, ga[2], gb[2]);
  max2_backward(a[0], b[0], -g_w, ga[0], gb[0]);
  min2_backward(a[3], b[3], g_h, ga[3], gb[3]);
  max2_backward(a[1], b[1], -g_h, ga[1], gb[1]);

  ga[2] += g_area * ha;
  ga[0] -= g_area * ha;
  ga[3] += g_area * wa;
  ga[1] -= g_area * wa;
  gb[2] += g_area * hb;
  gb[0] -= g_area * hb;
  gb[3] += g_area * wb;
  gb[1] -= g_area * wb;

  if (generalized) {
    const T gcw = (cx1 - cx0) > T(0) ? g_cw : T(0);
    const T gch = (cy1 - cy0) > T(0) ? g_ch : T(0);
    max2_backward(a[2], b[2], gcw, ga[2], gb[2]);
    min2_backward(a[0], b[0], -gcw, ga[0], gb[0]);
    max2_backward(a[3], b[3], gch, ga[3], gb[3]);
    min2_backward(a[1], b[1], -gch, ga[1], gb[1]);
  }
}

inline void check_inputs(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_boxes(boxes1, "boxes1");
  check_boxes(boxes2, "boxes2");
  check_same_dtype(boxes1, boxes2, "boxes1", "boxes2");
  check_same_device(boxes1, boxes2, "boxes1", "boxes2");
}

inline void check_backward_inputs(const at::Tensor& grad, const at::Tensor& boxes1,
                                  const at::Tensor& boxes2) {
  check_inputs(boxes1, boxes2);
  check_same_dtype(grad, boxes1, "grad", "boxes1");
  check_same_device(grad, boxes1, "grad", "boxes1");
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == boxes1.size(0) &&
                        grad.size(1) == boxes2.size(0),
                    "grad must have shape [", boxes1.size(0), ", ", boxes2.size(0), "], got ",
                    grad.sizes());
}

}  // namespace box_iou
}  // namespace trp
