"""Losses and matching of trp's decoder heads.

Every criterion has one call, ``criterion(predictions, targets, *, pred_group=None) -> dict``
(targets carry ``group``), and :class:`RoutedCriterion` applies them to a
:class:`trp.heads.DecoderRouter`'s output.
"""

from trp.losses.box_loss import BoxCriterion, box_cxcywh_to_xyxy
from trp.losses.box_region_loss import box_region_loss, box_region_masks
from trp.losses.depth_loss import DepthCriterion, gradient_matching_loss, silog_loss
from trp.losses.group_matcher import GroupMatcher, match_in_groups
from trp.losses.keypoint_loss import (
    COCO_KEYPOINT_SIGMAS,
    KeypointCriterion,
    object_keypoint_similarity,
)
from trp.losses.mask_loss import MaskCriterion, mask_match_cost
from trp.losses.matcher import HungarianMatcher, assign, flatten_targets
from trp.losses.routed import RoutedCriterion
from trp.losses.targets import unit_targets

__all__ = [
    "unit_targets",
    "COCO_KEYPOINT_SIGMAS",
    "BoxCriterion",
    "DepthCriterion",
    "GroupMatcher",
    "HungarianMatcher",
    "KeypointCriterion",
    "MaskCriterion",
    "RoutedCriterion",
    "assign",
    "box_cxcywh_to_xyxy",
    "box_region_loss",
    "box_region_masks",
    "flatten_targets",
    "gradient_matching_loss",
    "mask_match_cost",
    "match_in_groups",
    "object_keypoint_similarity",
    "silog_loss",
]
