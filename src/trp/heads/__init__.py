"""Decoder heads of trp: box, mask, keypoint and depth, with the shared query/feature plumbing
and the unit router.

Every head has one interface::

    head(queries [Nq, C_lm], features [L x [B, C_l, H_l, W_l]], query_image_index [Nq], *,
         object_index=None, image_size=None) -> dict of predictions

and pairs with a criterion in :mod:`trp.losses` returning a dict of named (weighted) losses.
See ``docs/heads.md``.
"""

from trp.heads.adapter import AdaptedFeatures, FeatureAdapter
from trp.heads.blocks import (
    MLP,
    inverse_sigmoid,
    jitter_boxes,
    merge_reference_boxes,
    sine_position_embedding,
)
from trp.heads.box_head import BoxDecoderLayer, BoxHead
from trp.heads.depth_head import DepthHead
from trp.heads.keypoint_head import KeypointDecoderLayer, KeypointHead
from trp.heads.mask_head import MaskHead, masks_to_boxes
from trp.heads.pixel_decoder import PixelDecoder, quarter_size
from trp.heads.queries import QueryBatch, QueryEncoder
from trp.heads.router import DecoderRouter, RoutedPredictions, triplet_group
from trp.heads.two_way import TwoWayBlock

UnitRouter = DecoderRouter

__all__ = [
    "MLP",
    "AdaptedFeatures",
    "BoxDecoderLayer",
    "BoxHead",
    "DecoderRouter",
    "DepthHead",
    "FeatureAdapter",
    "KeypointDecoderLayer",
    "KeypointHead",
    "MaskHead",
    "PixelDecoder",
    "QueryBatch",
    "QueryEncoder",
    "RoutedPredictions",
    "TwoWayBlock",
    "UnitRouter",
    "inverse_sigmoid",
    "jitter_boxes",
    "merge_reference_boxes",
    "masks_to_boxes",
    "quarter_size",
    "sine_position_embedding",
    "triplet_group",
]
