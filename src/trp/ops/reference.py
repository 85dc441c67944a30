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


# Counter-based random points of point_mask_loss_layers (the twin of csrc/point_mask/point_mask.h:
# mix32, row_key, uniform). Every product of a 32-bit value and a constant < 2^31 fits in int64.
_MASK32 = 0xFFFFFFFF
_MIX_A = 0x7FEB352D
_MIX_B = 0x31848BAB
CANDIDATE_STREAM = 0
UNIFORM_STREAM = 1


def _mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = (x * _MIX_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX_B) & _MASK32
    return x ^ (x >> 16)


def _row_keys(seed: int, stream: int, num_layers: int, num_queries: int, device) -> Tensor:
    """Keys [L, Q] (int64 holding uint32) of the rows of one stream."""
    h = _mix32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=device))
    h = _mix32(h ^ ((seed >> 32) & _MASK32))
    h = _mix32(h ^ stream)
    layers = torch.arange(num_layers, device=device)[:, None]
    queries = torch.arange(num_queries, device=device)[None, :]
    return _mix32(_mix32(h ^ layers) ^ queries)


def _uniform_points(keys: Tensor, counts: Tensor) -> Tensor:
    """Points (x, y) in [0, 1) of counter pairs ``counts`` [..., n] under keys [...] -> [..., n, 2]
    (float64, exact: 24-bit integers times 2^-24)."""
    counter = torch.stack([2 * counts, 2 * counts + 1], dim=-1)  # ... x n x 2
    h = _mix32(_mix32(keys[..., None, None] ^ counter))
    return (h >> 8).to(torch.float64) * 2.0**-24


def point_mask_layer_points(
    mask_embed: Tensor,
    pixel_features: Tensor,
    image_index: Tensor,
    seed: int,
    num_points: int,
    num_uncertain: int,
    num_candidates: int,
) -> Tensor:
    """The points ``torch.ops.trp.point_mask_loss_layers`` uses, -> [L, Q, P, 2] (x, y).

    Row (layer l, query q): candidates i < num_candidates at uniform(row_key(seed, 0, l, q), 2i,
    2i + 1); the num_uncertain with the smallest (|logit|, i) (NaN first) are kept in index
    order, followed by num_points - num_uncertain uniform points of stream 1.
    """
    num_layers, num_queries = mask_embed.shape[:2]
    device, dtype = mask_embed.device, mask_embed.dtype
    parts = []
    if num_uncertain > 0:
        keys = _row_keys(seed, CANDIDATE_STREAM, num_layers, num_queries, device)
        counts = torch.arange(num_candidates, device=device).expand(num_layers, num_queries, -1)
        candidates = _uniform_points(keys, counts).to(dtype)  # L x Q x K x 2
        chosen = []
        with torch.no_grad():
            for layer in range(num_layers):
                logits = point_mask_logits(
                    mask_embed[layer].detach(),
                    pixel_features.detach(),
                    image_index,
                    candidates[layer],
                )  # Q x K
                key = torch.where(logits.isnan(), -1.0, logits.abs())
                order = torch.sort(key, dim=1, stable=True).indices[:, :num_uncertain]
                chosen.append(order.sort(dim=1).values)
        index = torch.stack(chosen)  # L x Q x k
        parts.append(torch.gather(candidates, 2, index[..., None].expand(-1, -1, -1, 2)))
    keys = _row_keys(seed, UNIFORM_STREAM, num_layers, num_queries, device)
    counts = torch.arange(num_points - num_uncertain, device=device)
    parts.append(_uniform_points(keys, counts.expand(num_layers, num_queries, -1)).to(dtype))
    return torch.cat(parts, dim=2)


def point_mask_loss_layers(
    mask_embed: Tensor,
    pixel_features: Tensor,
    image_index: Tensor,
    target_masks: Tensor,
    seed: int,
    num_points: int,
    num_uncertain: int,
    num_candidates: int,
    weight_mask: float,
    weight_dice: float,
    num_masks: float,
) -> tuple[Tensor, Tensor]:
    """Eager point_mask_loss_layers at the same generated points: layer by layer, full logits,
    ``point_sample``, the two losses -> (total [], per_layer [L, 2] (mask CE, dice) / num_masks)."""
    points = point_mask_layer_points(
        mask_embed, pixel_features, image_index, seed, num_points, num_uncertain, num_candidates
    )
    targets = target_masks.to(mask_embed.dtype)
    per_layer = [
        point_mask_loss(mask_embed[layer], pixel_features, image_index, targets, points[layer]).sum(
            0
        )
        / num_masks
        for layer in range(mask_embed.shape[0])
    ]
    if per_layer:
        per_layer_t = torch.stack(per_layer)
    else:  # L = 0: zero losses, still connected to the inputs
        per_layer_t = mask_embed.new_zeros((0, 2)) + 0 * mask_embed.sum()
    total = (per_layer_t[:, 0] * weight_mask + per_layer_t[:, 1] * weight_dice).sum()
    return total, per_layer_t


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
