"""Eager PyTorch references of every fused op in ``trp.ops``.

They define the semantics (the fused kernels are tested against them), run wherever the native
extension is missing or disabled (``TRP_FUSED=0``), and are the baselines of ``benchmarks/``.
They favour clarity over speed and memory, and assume inputs already validated by ``trp.ops``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    # 0/0 -> 0 with a NaN-free gradient: divide by 1 where the denominator is not positive.
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), 0.0)


def _box_area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # N x M x 2
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # N x M x 2
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = _box_area(boxes1)[:, None] + _box_area(boxes2)[None, :] - inter
    return inter, union


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU, boxes1 [N, 4] xyxy, boxes2 [M, 4] xyxy -> [N, M]; 0/0 is 0."""
    inter, union = _inter_union(boxes1, boxes2)
    return _safe_div(inter, union)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU, boxes1 [N, 4] xyxy, boxes2 [M, 4] xyxy -> [N, M]; 0/0 terms are 0."""
    inter, union = _inter_union(boxes1, boxes2)
    iou = _safe_div(inter, union)
    lt = torch.minimum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area_c = wh[..., 0] * wh[..., 1]
    return iou - _safe_div(area_c - union, area_c)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def match_cost(
    class_cost: Tensor,
    pred_boxes: Tensor,
    tgt_labels: Tensor,
    tgt_boxes: Tensor,
    tgt_offsets: Tensor,
    weight_class: float,
    weight_bbox: float,
    weight_giou: float,
) -> Tensor:
    """Packed per-image matching cost, image by image (see ``trp.ops.match_cost``).

    class_cost [B, Q, K], pred_boxes [B, Q, 4] cxcywh, tgt_labels [G], tgt_boxes [G, 4] cxcywh,
    tgt_offsets [B + 1] -> [Q * G], image b's [Q, G_b] block first at ``Q * tgt_offsets[b]``.
    """
    blocks = []
    offsets = tgt_offsets.tolist()
    for b in range(class_cost.shape[0]):
        lo, hi = offsets[b], offsets[b + 1]
        labels, boxes = tgt_labels[lo:hi], tgt_boxes[lo:hi]
        cost = (
            weight_class * class_cost[b][:, labels]
            + weight_bbox * torch.cdist(pred_boxes[b], boxes, p=1)
            - weight_giou
            * generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes[b]), box_cxcywh_to_xyxy(boxes))
        )
        blocks.append(cost.reshape(-1))
    if not blocks:
        return class_cost.new_empty((0,))
    return torch.cat(blocks)


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear samples of maps [Q, H, W] at points [Q, P, 2] (x, y in [0, 1]) -> [Q, P].

    Mask2Former's ``point_sample``: ``grid_sample`` with align_corners=False and zero padding.
    """
    grid = 2.0 * points[:, :, None, :] - 1.0  # Q x P x 1 x 2
    sampled = torch.nn.functional.grid_sample(
        maps[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return sampled[:, 0, :, 0]


def mask_logits(mask_embed: Tensor, pixel_features: Tensor, image_index: Tensor) -> Tensor:
    """Full mask logits: embed [Q, C] . features[image_index[q]] [C, H, W] -> [Q, H, W]."""
    parts, rows = [], []
    for b in range(pixel_features.shape[0]):
        sel = (image_index == b).nonzero().squeeze(1)
        parts.append(torch.einsum("qc,chw->qhw", mask_embed[sel], pixel_features[b]))
        rows.append(sel)
    if not parts:
        return mask_embed.new_zeros((0, *pixel_features.shape[2:]))
    return torch.cat(parts)[torch.argsort(torch.cat(rows))]


def point_mask_logits(
    mask_embed: Tensor, pixel_features: Tensor, image_index: Tensor, points: Tensor
) -> Tensor:
    """Mask logits at points: embed [Q, C], features [B, C, H, W], points [Q, P, 2] -> [Q, P]."""
    return point_sample(mask_logits(mask_embed, pixel_features, image_index), points)


def point_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-query sigmoid-CE mean and dice loss over points, logits/targets [Q, P] -> [Q, 2]."""
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * targets).sum(1) + 1) / (prob.sum(1) + targets.sum(1) + 1)
    return torch.stack([ce.mean(1), dice], dim=1)


def point_mask_loss(
    mask_embed: Tensor,
    pixel_features: Tensor,
    image_index: Tensor,
    target_masks: Tensor,
    points: Tensor,
) -> Tensor:
    """Mask2Former's point losses built the eager way (full [Q, H, W] logits, then sampling).

    embed [Q, C], features [B, C, H, W], image_index [Q], targets [Q, Ht, Wt], points [Q, P, 2]
    -> [Q, 2] (sigmoid-CE mean over points, dice).
    """
    logits = point_mask_logits(mask_embed, pixel_features, image_index, points)
    targets = point_sample(target_masks.to(logits.dtype), points)
    return point_losses(logits, targets)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention the eager way (Deformable-DETR's
    ``ms_deform_attn_core_pytorch``): one ``grid_sample`` per level, then a weighted sum.

    value [N, S, M, D], spatial_shapes [L, 2] (H, W), level_start_index [L] (unused: levels are
    consecutive), sampling_locations [N, Lq, M, L, P, 2] (x, y in [0, 1]), attention_weights
    [N, Lq, M, L, P] -> [N, Lq, M * D].
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(shapes):
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # N·M x Lq x P x 2
        samples.append(
            torch.nn.functional.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )  # N·M x D x Lq x P
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # N·M x D x Lq
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


def vrt_linear_cross_entropy(
    hidden: Tensor,
    text_weight: Tensor,
    prototypes: Tensor,
    sample_index: Tensor,
    proto_offsets: Tensor,
    labels: Tensor,
    exclude_offsets: Tensor,
    exclude_ids: Tensor,
    ignore_index: int = -100,
) -> Tensor:
    """Per-token cross-entropy over text ⊕ the token's own patches, from the full logits.

    hidden [T, D], text_weight [V, D], prototypes [P, D], sample_index [T], proto_offsets
    [B + 1], labels [T] (VRT k of the token's sample is V + k), exclude_offsets [T + 1] and
    exclude_ids [E] (local VRT indices removed from each token's softmax) -> loss [T] (0 where
    ignored).
    """
    vocab = text_weight.shape[0]
    counts = proto_offsets[1:] - proto_offsets[:-1]
    width = int(counts.max()) if counts.numel() else 0
    local = torch.arange(width, device=hidden.device)
    index = proto_offsets[:-1, None] + local[None, :]  # B x Pmax
    valid = local[None, :] < counts[:, None]
    full = hidden @ torch.cat([text_weight, prototypes]).T  # T x (V + P)
    vrt = full[:, vocab:].gather(1, index[sample_index].clamp(max=max(prototypes.shape[0] - 1, 0)))
    allowed = valid[sample_index].clone()  # T x Pmax
    per_token = exclude_offsets[1:] - exclude_offsets[:-1]
    token_of = torch.repeat_interleave(
        torch.arange(hidden.shape[0], device=hidden.device), per_token
    )
    allowed[token_of, exclude_ids] = False
    logits = torch.cat([full[:, :vocab], vrt.masked_fill(~allowed, float("-inf"))], dim=1)
    return torch.nn.functional.cross_entropy(
        logits, labels, ignore_index=ignore_index, reduction="none"
    )


def soft_argmax(heatmaps: Tensor, beta: float) -> Tensor:
    """Soft-argmax, heatmaps [B, K, H, W] -> (x, y) [B, K, 2] in [0, 1] (pixel centres)."""
    b, k, h, w = heatmaps.shape
    prob = (beta * heatmaps.reshape(b, k, h * w)).softmax(-1).view(b, k, h, w)
    xs = (torch.arange(w, dtype=heatmaps.dtype, device=heatmaps.device) + 0.5) / w
    ys = (torch.arange(h, dtype=heatmaps.dtype, device=heatmaps.device) + 0.5) / h
    return torch.stack([(prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)], dim=-1)


def oks(
    pred_keypoints: Tensor,
    tgt_keypoints: Tensor,
    tgt_visibility: Tensor,
    tgt_areas: Tensor,
    sigmas: Tensor,
    tgt_offsets: Tensor,
) -> Tensor:
    """Packed per-image OKS, image by image (see ``trp.ops.oks``).

    pred [B, Q, K, 2], tgt [G, K, 2], visibility [G, K], areas [G], sigmas [K], offsets [B + 1]
    -> [Q * G], image b's [Q, G_b] block first at ``Q * tgt_offsets[b]``.
    """
    variances = (2 * sigmas) ** 2
    blocks = []
    offsets = tgt_offsets.tolist()
    for b in range(pred_keypoints.shape[0]):
        lo, hi = offsets[b], offsets[b + 1]
        d2 = ((pred_keypoints[b][:, None] - tgt_keypoints[None, lo:hi]) ** 2).sum(-1)  # Q x G_b x K
        e = d2 / variances / (tgt_areas[None, lo:hi, None] + 2.220446049250313e-16) / 2
        visible = tgt_visibility[lo:hi] > 0  # G_b x K
        count = visible.sum(-1)
        total = torch.where(visible, torch.exp(-e), 0).sum(-1)
        blocks.append(torch.where(count > 0, total / count.clamp(min=1), 0).reshape(-1))
    if not blocks:
        return pred_keypoints.new_empty((0,))
    return torch.cat(blocks)
