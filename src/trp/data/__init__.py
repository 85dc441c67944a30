"""trp.data: synthetic referring scenes (the offline default), RefCOCO, COCO json, collate.

``import trp.data`` does not import pyarrow or pycocotools; the readers that need them import
them when a dataset is built.
"""

from trp.data.coco import CocoDataset
from trp.data.collate import PER_INSTANCE_KEYS, collate
from trp.data.prompts import PROMPT_TYPES, visual_prompt
from trp.data.refcoco import (
    REFCOCO_COLUMNS,
    REFCOCO_SPLITS,
    RefCOCODataset,
    find_refcoco_files,
    polygon_to_mask,
)
from trp.data.referring import (
    EXPRESSION_KINDS,
    Referent,
    SceneFacts,
    refer,
    refer_any,
    resolve,
)
from trp.data.scene import (
    COLOR_NAMES,
    COLORS,
    KEYPOINT_OKS_SIGMAS,
    MAX_KEYPOINTS,
    NUM_KEYPOINTS,
    SHAPE_CLASSES,
    Scene,
    sample_scene,
)
from trp.data.shapes import TASKS, ShapesDataset
from trp.data.unified import (
    DEFAULT_MIXTURE,
    GROUNDING_TASKS,
    TARGET_KINDS,
    TASK_UNITS,
    UNIFIED_TASKS,
    UnifiedShapesDataset,
    collate_unified,
)

__all__ = [
    "DEFAULT_MIXTURE",
    "GROUNDING_TASKS",
    "TARGET_KINDS",
    "TASK_UNITS",
    "UNIFIED_TASKS",
    "UnifiedShapesDataset",
    "collate_unified",
    "COLORS",
    "COLOR_NAMES",
    "EXPRESSION_KINDS",
    "KEYPOINT_OKS_SIGMAS",
    "MAX_KEYPOINTS",
    "NUM_KEYPOINTS",
    "PER_INSTANCE_KEYS",
    "PROMPT_TYPES",
    "REFCOCO_COLUMNS",
    "REFCOCO_SPLITS",
    "SHAPE_CLASSES",
    "TASKS",
    "CocoDataset",
    "RefCOCODataset",
    "Referent",
    "Scene",
    "SceneFacts",
    "ShapesDataset",
    "collate",
    "find_refcoco_files",
    "polygon_to_mask",
    "refer",
    "refer_any",
    "resolve",
    "sample_scene",
    "visual_prompt",
]
