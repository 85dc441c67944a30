"""Fused ops of trp (``torch.ops.trp.*``) with their Python APIs and eager references.

Each op has a function and an ``nn.Module``; the fused kernel runs when ``trp._C`` is built and
``TRP_FUSED`` is not 0, otherwise the reference in :mod:`trp.ops.reference` does.
"""

from trp._native import cpu_capability, fused_enabled, native_available, set_fused, use_fused
from trp.ops import reference
from trp.ops.box_iou import BoxIoU, box_iou, generalized_box_iou
from trp.ops.match_cost import MatchCost, PackedCost, class_cost_table, match_cost
from trp.ops.ms_deform_attn import MSDeformAttn, ms_deform_attn
from trp.ops.oks import COCO_KEYPOINT_SIGMAS, OKSCost, oks, oks_cost
from trp.ops.point_mask_loss import (
    PointMaskLoss,
    point_mask_logits,
    point_mask_loss,
    point_mask_loss_layers,
    point_mask_loss_per_query,
    sample_points,
)
from trp.ops.soft_argmax import SoftArgmax, soft_argmax
from trp.ops.vrt_linear_cross_entropy import VRTLinearCrossEntropy, vrt_linear_cross_entropy

__all__ = [
    "COCO_KEYPOINT_SIGMAS",
    "BoxIoU",
    "MSDeformAttn",
    "MatchCost",
    "OKSCost",
    "PointMaskLoss",
    "SoftArgmax",
    "PackedCost",
    "VRTLinearCrossEntropy",
    "box_iou",
    "class_cost_table",
    "cpu_capability",
    "fused_enabled",
    "generalized_box_iou",
    "match_cost",
    "ms_deform_attn",
    "native_available",
    "oks",
    "oks_cost",
    "point_mask_logits",
    "point_mask_loss",
    "point_mask_loss_layers",
    "point_mask_loss_per_query",
    "reference",
    "sample_points",
    "set_fused",
    "soft_argmax",
    "use_fused",
    "vrt_linear_cross_entropy",
]
