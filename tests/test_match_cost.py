"""trp.ops.match_cost: per-image packed costs vs the reference and DETR's dense matrix."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import generalized_box_iou as tv_giou

from tests.conftest import requires_native
from trp.ops import MatchCost, class_cost_table, match_cost, reference
from trp.ops.reference import box_cxcywh_to_xyxy


def make_inputs(sizes, num_queries=7, num_classes=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, g = len(sizes), sum(sizes)
    return {
        "pred_logits": torch.randn(b, num_queries, num_classes, dtype=dtype, generator=gen),
        "pred_boxes": torch.rand(b, num_queries, 4, dtype=dtype, generator=gen) * 0.5 + 0.1,
        "tgt_labels": torch.randint(0, num_classes, (g,), generator=gen),
        "tgt_boxes": torch.rand(g, 4, dtype=dtype, generator=gen) * 0.5 + 0.1,
        "tgt_offsets": torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0),
    }


def dense_detr_blocks(inp, mode="softmax", wc=1.0, wb=5.0, wg=2.0):
    """Cost exactly as DETR builds it: the whole batch against all targets, then split."""
    bs, nq = inp["pred_boxes"].shape[:2]
    boxes = inp["pred_boxes"].flatten(0, 1)
    table = class_cost_table(inp["pred_logits"], mode).flatten(0, 1)
    cost = (
        wc * table[:, inp["tgt_labels"]]
        + wb * torch.cdist(boxes, inp["tgt_boxes"], p=1)
        - wg * tv_giou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(inp["tgt_boxes"]))
    ).view(bs, nq, -1)
    sizes = (inp["tgt_offsets"][1:] - inp["tgt_offsets"][:-1]).tolist()
    return [c[i] for i, c in enumerate(cost.split(sizes, -1))]


@pytest.mark.parametrize("mode", ["softmax", "focal"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_dense_detr_cost(mode, dtype, tol):
    inp = make_inputs([3, 0, 5, 1], dtype=dtype)
    packed = match_cost(**inp, class_mode=mode, weight_class=2.0, weight_bbox=5.0, weight_giou=2.0)
    assert packed.costs.shape == (7 * 9,)
    blocks = packed.blocks()
    assert [tuple(b.shape) for b in blocks] == [(7, 3), (7, 0), (7, 5), (7, 1)]
    for ours, dense in zip(blocks, dense_detr_blocks(inp, mode, 2.0, 5.0, 2.0)):
        torch.testing.assert_close(ours, dense, rtol=tol, atol=tol)


def test_matches_reference_and_blocks_are_views():
    inp = make_inputs([2, 4])
    packed = match_cost(**inp)
    table = class_cost_table(inp["pred_logits"])
    ref = reference.match_cost(
        table, inp["pred_boxes"], inp["tgt_labels"], inp["tgt_boxes"], inp["tgt_offsets"], 1, 5, 2
    )
    torch.testing.assert_close(packed.costs, ref, rtol=1e-12, atol=1e-12)
    assert packed.blocks()[1].data_ptr() == packed.costs[7 * 2 :].data_ptr()


def test_known_value():
    # One query exactly on its target: L1 = 0, GIoU = 1, class cost = -p.
    inp = {
        "pred_logits": torch.tensor([[[0.0, 0.0]]], dtype=torch.float64),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]], dtype=torch.float64),
        "tgt_labels": torch.tensor([1]),
        "tgt_boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64),
        "tgt_offsets": torch.tensor([0, 1]),
    }
    assert match_cost(**inp).costs.item() == pytest.approx(-0.5 - 2.0)


def test_without_classes():
    inp = make_inputs([2, 3])
    packed = match_cost(None, inp["pred_boxes"], None, inp["tgt_boxes"], inp["tgt_offsets"])
    dense = dense_detr_blocks(inp, wc=0.0)
    for ours, ref in zip(packed.blocks(), dense):
        torch.testing.assert_close(ours, ref)


def test_empty_batch_and_no_targets():
    inp = make_inputs([])
    packed = match_cost(**inp)
    assert packed.costs.shape == (0,) and packed.blocks() == []
    inp = make_inputs([0, 0])
    assert [b.shape for b in match_cost(**inp).blocks()] == [(7, 0), (7, 0)]


def test_non_contiguous_inputs():
    inp = make_inputs([3, 2])
    nc = dict(inp)
    nc["pred_logits"] = inp["pred_logits"].transpose(0, 1).contiguous().transpose(0, 1)
    nc["pred_boxes"] = inp["pred_boxes"].transpose(1, 2).contiguous().transpose(1, 2)
    nc["tgt_boxes"] = inp["tgt_boxes"].t().contiguous().t()
    assert not nc["pred_boxes"].is_contiguous() and not nc["tgt_boxes"].is_contiguous()
    torch.testing.assert_close(match_cost(**nc).costs, match_cost(**inp).costs)


def test_no_gradient_flows():
    inp = make_inputs([2])
    inp["pred_boxes"].requires_grad_()
    assert not match_cost(**inp).costs.requires_grad


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"tgt_offsets": torch.tensor([0, 2, 1])}, ValueError, "non-decreasing"),
        ({"tgt_offsets": torch.tensor([0, 3])}, ValueError, "shape"),
        ({"tgt_offsets": torch.tensor([1, 2, 3])}, ValueError, "start at 0"),
        ({"tgt_offsets": torch.tensor([0.0, 1.0, 3.0])}, TypeError, "int64"),
        ({"tgt_labels": torch.tensor([0, 1, 9])}, ValueError, "lie in"),
        ({"tgt_labels": torch.tensor([0, 1])}, ValueError, "tgt_labels"),
        ({"pred_boxes": torch.zeros(2, 7, 3, dtype=torch.float64)}, ValueError, "B, Q, 4"),
        ({"pred_logits": torch.zeros(2, 6, 5, dtype=torch.float64)}, ValueError, "B, Q, K"),
        ({"tgt_boxes": torch.zeros(3, 4)}, TypeError, "same dtype"),
        ({"tgt_boxes": torch.zeros(3, 4, dtype=torch.long)}, TypeError, "floating"),
    ],
)
def test_bad_inputs_raise(change, error, match):
    inp = make_inputs([1, 2])
    inp.update(change)
    with pytest.raises(error, match=match):
        match_cost(**inp)


def test_bad_class_mode_and_weights():
    with pytest.raises(ValueError, match="class_mode"):
        MatchCost(class_mode="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        MatchCost(weight_bbox=-1.0)
    with pytest.raises(ValueError, match="class mode"):
        class_cost_table(torch.zeros(1, 1, 2), "hinge")  # type: ignore[arg-type]


@requires_native
def test_native_op_checks_preconditions():
    inp = make_inputs([1, 2])
    table = class_cost_table(inp["pred_logits"])
    args = [table, inp["pred_boxes"], inp["tgt_labels"], inp["tgt_boxes"], inp["tgt_offsets"]]
    bad_offsets = [*args[:4], torch.tensor([0, 2, 2])]
    with pytest.raises(ValueError, match="tgt_offsets"):
        torch.ops.trp.match_cost(*bad_offsets, 1.0, 5.0, 2.0)
    bad_labels = [args[0], args[1], torch.tensor([0, 7, 1]), *args[3:]]
    with pytest.raises(ValueError, match="tgt_labels must lie"):
        torch.ops.trp.match_cost(*bad_labels, 1.0, 5.0, 2.0)


@requires_native
def test_opcheck():
    inp = make_inputs([2, 0, 3])
    table = class_cost_table(inp["pred_logits"])
    args = (table, inp["pred_boxes"], inp["tgt_labels"], inp["tgt_boxes"], inp["tgt_offsets"])
    torch.library.opcheck(torch.ops.trp.match_cost, (*args, 1.0, 5.0, 2.0))
