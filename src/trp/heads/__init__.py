"""Decoder heads of trp: box, mask, keypoint and depth, with the shared query/feature plumbing
and the unit router.

Every head has one interface::

    predictions = head(HeadInputs(queries=..., features=..., image_index=..., ...))  # -> dict

reading the fields of :class:`HeadInputs` it needs and ignoring the rest, and pairs with a
criterion in :mod:`trp.losses` returning a dict of named (weighted) losses. See
``docs/heads.md``.
"""

from trp.heads.adapter import AdaptedFeatures, FeatureAdapter
from trp.heads.blocks import (
    MLP,
    inverse_sigmoid,
    jitter_boxes,
    masked_group_norm,
    merge_reference_boxes,
    sine_position_embedding,
)
from trp.heads.box_format import (
    BOX_FORMATS,
    box_convert,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    denormalize_boxes,
    normalize_boxes,
)
from trp.heads.box_head import BoxHead
from trp.heads.cross_attention import DeformableCrossAttention, DenseCrossAttention
from trp.heads.decoder_layer import QueryDecoderLayer
from trp.heads.depth_head import DepthHead
from trp.heads.inputs import HeadInputs
from trp.heads.keypoint_head import KeypointHead
from trp.heads.mask_head import MaskHead, masks_to_boxes
from trp.heads.mask_readout import MaskReadout, box_prior_coefficients, coordinate_channels
from trp.heads.pixel_decoder import PixelDecoder, quarter_size
from trp.heads.queries import QueryBatch, QueryEncoder
from trp.heads.query_decoder import QueryDecoder
from trp.heads.router import DecoderRouter, RoutedPredictions, triplet_group
from trp.heads.two_way import TwoWayBlock

__all__ = [
    "BOX_FORMATS",
    "MLP",
    "AdaptedFeatures",
    "BoxHead",
    "DecoderRouter",
    "DeformableCrossAttention",
    "DenseCrossAttention",
    "DepthHead",
    "FeatureAdapter",
    "HeadInputs",
    "KeypointHead",
    "MaskHead",
    "MaskReadout",
    "PixelDecoder",
    "QueryBatch",
    "QueryDecoder",
    "QueryDecoderLayer",
    "QueryEncoder",
    "RoutedPredictions",
    "TwoWayBlock",
    "box_convert",
    "box_cxcywh_to_xyxy",
    "box_prior_coefficients",
    "box_xyxy_to_cxcywh",
    "coordinate_channels",
    "denormalize_boxes",
    "inverse_sigmoid",
    "jitter_boxes",
    "masked_group_norm",
    "masks_to_boxes",
    "merge_reference_boxes",
    "normalize_boxes",
    "quarter_size",
    "sine_position_embedding",
    "triplet_group",
]
