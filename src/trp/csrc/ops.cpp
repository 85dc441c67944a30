// Schemas of every trp op. Device implementations register themselves in their own files
// (TORCH_LIBRARY_IMPL(trp, CPU/CUDA, m)); fake/meta and autograd are registered in Python
// (trp/ops/*.py), following pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing trp._C (an otherwise empty module) loads this library and runs the registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(trp, m) {
  // box_iou: boxes1 [N, 4] xyxy, boxes2 [M, 4] xyxy -> [N, M]
  m.def("box_iou(Tensor boxes1, Tensor boxes2) -> Tensor");
  m.def("generalized_box_iou(Tensor boxes1, Tensor boxes2) -> Tensor");
  m.def(
      "box_iou_backward(Tensor grad, Tensor boxes1, Tensor boxes2, bool generalized) "
      "-> (Tensor, Tensor)");
  // match_cost: class_cost [B, Q, K], pred_boxes [B, Q, 4] cxcywh, tgt_labels [G] int64,
  // tgt_boxes [G, 4] cxcywh, tgt_offsets [B + 1] int64 -> packed [Q * G]
  m.def(
      "match_cost(Tensor class_cost, Tensor pred_boxes, Tensor tgt_labels, Tensor tgt_boxes, "
      "Tensor tgt_offsets, float weight_class, float weight_bbox, float weight_giou) -> Tensor");
  // -- later ops append their schemas below this line --
}
