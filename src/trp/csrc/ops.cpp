// Schemas of every trp op and their Autocast kernels. Device implementations register
// themselves in their own files (TORCH_LIBRARY_IMPL(trp, CPU/CUDA, m)); fake/meta and autograd
// are registered in Python (trp/ops/*.py), following pytorch/extension-cpp.
#include <Python.h>

#include <optional>

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
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
  // ms_deform_attn: value [N, S, M, D], spatial_shapes [L, 2] int64 (H, W), level_start_index [L]
  // int64, sampling_locations [N, Lq, M, L, P, 2] (x, y) in [0, 1], attention_weights
  // [N, Lq, M, L, P] -> [N, Lq, M * D]
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
  // point_mask_logits: mask_embed [Q, C], pixel_features [B, C, H, W], image_index [Q] int64,
  // points [Q, P, 2] (x, y in [0, 1]) -> [Q, P]; point_mask_loss adds target_masks [Q, Ht, Wt]
  // -> [Q, 2] (mean sigmoid-CE over the points, dice)
  m.def(
      "point_mask_logits(Tensor mask_embed, Tensor pixel_features, Tensor image_index, "
      "Tensor points) -> Tensor");
  m.def(
      "point_mask_logits_backward(Tensor grad, Tensor mask_embed, Tensor pixel_features, "
      "Tensor image_index, Tensor points) -> (Tensor, Tensor)");
  m.def(
      "point_mask_loss(Tensor mask_embed, Tensor pixel_features, Tensor image_index, "
      "Tensor target_masks, Tensor points) -> Tensor");
  m.def(
      "point_mask_loss_backward(Tensor grad, Tensor mask_embed, Tensor pixel_features, "
      "Tensor image_index, Tensor target_masks, Tensor points) -> (Tensor, Tensor)");
  // vrt_linear_cross_entropy: hidden [T, D], text_weight [V, D], prototypes [P, D],
  // sample_index [T] int64, proto_offsets [B + 1] int64, labels [T] int64 (VRT k = V + k),
  // exclude_offsets [T + 1] int64, exclude_ids [E] int64 -> (loss [T], lse [T])
  m.def(
      "vrt_linear_cross_entropy(Tensor hidden, Tensor text_weight, Tensor prototypes, "
      "Tensor sample_index, Tensor proto_offsets, Tensor labels, Tensor exclude_offsets, "
      "Tensor exclude_ids, int ignore_index, int chunk_size) -> (Tensor, Tensor)");
  m.def(
      "vrt_linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor text_weight, "
      "Tensor prototypes, Tensor sample_index, Tensor proto_offsets, Tensor labels, "
      "Tensor exclude_offsets, Tensor exclude_ids, Tensor lse, int ignore_index, int chunk_size) "
      "-> (Tensor, Tensor, Tensor)");
  // soft_argmax: heatmaps [B, K, H, W], beta -> (coords [B, K, 2] (x, y) in [0, 1],
  // logsumexp [B, K] of beta * heatmaps, saved for the backward)
  m.def("soft_argmax(Tensor heatmaps, float beta) -> (Tensor, Tensor)");
  m.def(
      "soft_argmax_backward(Tensor grad_coords, Tensor grad_logsumexp, Tensor heatmaps, "
      "Tensor coords, Tensor logsumexp, float beta) -> Tensor");
  // oks: pred_keypoints [B, Q, K, 2], tgt_keypoints [G, K, 2], tgt_visibility [G, K],
  // tgt_areas [G], sigmas [K], tgt_offsets [B + 1] int64 -> packed OKS [Q * G]
  m.def(
      "oks(Tensor pred_keypoints, Tensor tgt_keypoints, Tensor tgt_visibility, "
      "Tensor tgt_areas, Tensor sigmas, Tensor tgt_offsets) -> Tensor");
  // -- later ops append their schemas below this line --
  // point_mask_loss_layers: mask_embed [L, Q, C], pixel_features [B, C, H, W], image_index [Q]
  // int64, target_masks [Q, Ht, Wt]; points generated inside from `seed` -> (total [] =
  // sum_l weight_mask * mask_l + weight_dice * dice_l, per_layer [L, 2] (mask CE, dice) / num_masks,
  // grad_embed [L, Q, C], grad_features [B, C, H, W] = d total / d input, [0] unless compute_grad)
  m.def(
      "point_mask_loss_layers(Tensor mask_embed, Tensor pixel_features, Tensor image_index, "
      "Tensor target_masks, int seed, int num_points, int num_uncertain, int num_candidates, "
      "float weight_mask, float weight_dice, float num_masks, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

// Autocast contract (as torchvision's roi_align): under bf16/fp16 autocast every trp op computes
// in float32. The Autocast kernel casts each float16/bfloat16 tensor argument to float32
// (at::autocast::cached_cast: float64 and integer tensors are left alone) and calls the op again
// with its autocast key excluded, so the Autograd kernel (registered in Python) records the casts
// and the device kernel sees one dtype. Outputs stay float32 (losses, costs, coordinates and
// mask logits are wanted in float32 by their callers, like autocast's own fp32-policy ops),
// except ms_deform_attn, a layer in the middle of a network: its output is cast back to the
// dtype of `value`, as torchvision casts roi_align's output back to the dtype of `input`.
// Backward ops are registered too (torchvision does the same for _roi_align_backward): a
// backward run under autocast must not see mixed dtypes either.
namespace {

template <c10::DispatchKey kAutocastKey, c10::DeviceType kDevice, bool kCastBack>
void autocast_to_fp32(const c10::OperatorHandle& op, c10::DispatchKeySet /*keys*/,
                      torch::jit::Stack* stack) {
  const size_t num_args = op.schema().arguments().size();
  std::optional<at::ScalarType> first_dtype;
  for (size_t i = stack->size() - num_args; i < stack->size(); ++i) {
    c10::IValue& arg = (*stack)[i];
    if (!arg.isTensor()) {
      continue;
    }
    const at::Tensor t = arg.toTensor();
    if (!first_dtype.has_value() && t.defined()) {
      first_dtype = t.scalar_type();
    }
    arg = at::autocast::cached_cast(at::kFloat, t, kDevice);
  }
  {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
    op.callBoxed(stack);
  }
  if (kCastBack && first_dtype.has_value()) {
    c10::IValue& out = (*stack)[stack->size() - op.schema().returns().size()];
    out = out.toTensor().to(*first_dtype);
  }
}

template <c10::DispatchKey kAutocastKey, c10::DeviceType kDevice>
void register_autocast(torch::Library& m) {
  constexpr const char* fp32_ops[] = {
      "box_iou",
      "generalized_box_iou",
      "box_iou_backward",
      "match_cost",
      "ms_deform_attn_backward",
      "point_mask_logits",
      "point_mask_logits_backward",
      "point_mask_loss",
      "point_mask_loss_backward",
      "point_mask_loss_layers",
      "vrt_linear_cross_entropy",
      "vrt_linear_cross_entropy_backward",
      "soft_argmax",
      "soft_argmax_backward",
      "oks",
  };
  for (const char* name : fp32_ops) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<
                     &autocast_to_fp32<kAutocastKey, kDevice, /*kCastBack=*/false>>());
  }
  m.impl("ms_deform_attn", torch::CppFunction::makeFromBoxedFunction<
                               &autocast_to_fp32<kAutocastKey, kDevice, /*kCastBack=*/true>>());
}

}  // namespace

TORCH_LIBRARY_IMPL(trp, AutocastCPU, m) {
  register_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>(m);
}

TORCH_LIBRARY_IMPL(trp, AutocastCUDA, m) {
  register_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>(m);
}
