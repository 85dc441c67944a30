"""trp.ops.match_cost vs DETR's matcher cost (full [B·Q, ΣG] matrix, then split per image).

    python benchmarks/bench_match_cost.py [--quick] [--threads 1 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torchvision.ops import generalized_box_iou as tv_generalized_box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
from trp.ops import match_cost
from trp.ops.reference import box_cxcywh_to_xyxy

OP = "match_cost"
MODES = ("forward",)  # matching costs are never differentiated
NUM_CLASSES = 91


def cases(quick: bool) -> list[dict]:
    if quick:
        return [{"B": 8, "Q": 100}, {"B": 32, "Q": 900}]
    return [{"B": b, "Q": q} for b in (8, 32) for q in (100, 300, 900)]


def make_inputs(case: dict, mode: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    b, q = case["B"], case["Q"]
    sizes = torch.randint(20, 51, (b,), generator=gen)
    g = int(sizes.sum())
    return {
        "pred_logits": torch.randn(b, q, NUM_CLASSES, generator=gen),
        "pred_boxes": torch.rand(b, q, 4, generator=gen) * 0.5 + 0.1,
        "tgt_labels": torch.randint(0, NUM_CLASSES, (g,), generator=gen),
        "tgt_boxes": torch.rand(g, 4, generator=gen) * 0.5 + 0.1,
        "tgt_offsets": torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]),
    }


def detr_eager(pred_logits, pred_boxes, tgt_labels, tgt_boxes, tgt_offsets) -> list[torch.Tensor]:
    """The cost as DETR's HungarianMatcher computes it (weights 1 / 5 / 2)."""
    bs, nq = pred_logits.shape[:2]
    prob = pred_logits.flatten(0, 1).softmax(-1)  # [B·Q, K]
    boxes = pred_boxes.flatten(0, 1)  # [B·Q, 4]
    cost = (
        5.0 * torch.cdist(boxes, tgt_boxes, p=1)
        - prob[:, tgt_labels]
        - 2.0 * tv_generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    ).view(bs, nq, -1)  # B x Q x ΣG
    sizes = (tgt_offsets[1:] - tgt_offsets[:-1]).tolist()
    return [c[i] for i, c in enumerate(cost.split(sizes, -1))]


def fused(pred_logits, pred_boxes, tgt_labels, tgt_boxes, tgt_offsets) -> torch.Tensor:
    return match_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, tgt_offsets).costs


SIDES = {"eager": detr_eager, "fused": fused}


def check(case: dict) -> float:
    inputs = make_inputs(case, "forward")
    eager_blocks = detr_eager(**inputs)
    fused_blocks = match_cost(**inputs).blocks()
    return max(float((a - b).abs().max()) for a, b in zip(eager_blocks, fused_blocks))


if __name__ == "__main__":
    _harness.main(__file__)
