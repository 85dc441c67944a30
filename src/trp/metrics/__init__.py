"""trp.metrics: REC, RES, COCO AP (boxes, masks, keypoints), depth and caption metrics, and the
unified multi-task evaluator.

Each family has plain functions for one-shot use and a ``torchmetrics.Metric`` whose states
reduce correctly under DDP. pycocotools is imported only when COCO AP is computed.
"""

from trp.metrics.caption import (
    CAPTION_METRIC_NAMES,
    caption_metrics,
    exact_match,
    normalize_answer,
)
from trp.metrics.coco import (
    BBOX_NAMES,
    COCO_PERSON_SIGMAS,
    IOU_TYPES,
    KEYPOINT_NAMES,
    COCOMetric,
    coco_evaluate,
    metric_names,
    target_areas,
)
from trp.metrics.depth import DEPTH_METRIC_NAMES, DepthMetric, depth_metrics
from trp.metrics.rec import (
    REC_METRIC_NAMES,
    REC_THRESHOLDS,
    RECMetric,
    center_in_box,
    paired_box_iou,
    rec_metrics,
)
from trp.metrics.res import RES_METRIC_NAMES, RESMetric, mask_intersection_union, res_metrics
from trp.metrics.unified import EVALUATED_TASKS, UnifiedEvaluator

__all__ = [
    "CAPTION_METRIC_NAMES",
    "EVALUATED_TASKS",
    "UnifiedEvaluator",
    "caption_metrics",
    "exact_match",
    "normalize_answer",
    "BBOX_NAMES",
    "COCO_PERSON_SIGMAS",
    "DEPTH_METRIC_NAMES",
    "IOU_TYPES",
    "KEYPOINT_NAMES",
    "REC_METRIC_NAMES",
    "REC_THRESHOLDS",
    "RES_METRIC_NAMES",
    "COCOMetric",
    "DepthMetric",
    "RECMetric",
    "RESMetric",
    "center_in_box",
    "coco_evaluate",
    "depth_metrics",
    "mask_intersection_union",
    "metric_names",
    "paired_box_iou",
    "rec_metrics",
    "res_metrics",
    "target_areas",
]
