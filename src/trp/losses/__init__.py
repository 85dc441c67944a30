"""Losses and matching of trp's decoder heads."""

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

__all__ = [
    "COCO_KEYPOINT_SIGMAS",
    "BoxCriterion",
    "DepthCriterion",
    "GroupMatcher",
    "HungarianMatcher",
    "KeypointCriterion",
    "MaskCriterion",
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
