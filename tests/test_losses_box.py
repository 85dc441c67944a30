"""BoxCriterion: values, normalisation, score targets, aux copies."""

from __future__ import annotations

import pytest
import torch

from trp.losses import BoxCriterion


def _pred(boxes, scores, aux=()):
    return {"boxes": boxes, "scores": scores, "aux": list(aux)}


def test_values_and_normalisation():
    tgt = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]])
    pred = tgt.clone()
    pred[0, 0] += 0.1  # shifted by half a width: IoU 1/3, GIoU 1/3
    losses = BoxCriterion(aux_loss=False)(_pred(pred, torch.zeros(2)), {"boxes": tgt})
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(5 * 0.1 / 2))
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(2 * (1 - 1 / 3) / 2))
    # sigmoid(0) * 2 - 1 = 0 vs GIoU (1/3, 1): mean squared error.
    torch.testing.assert_close(losses["loss_score"], torch.tensor(((1 / 3) ** 2 + 1) / 2))


def test_iou_score_target_is_bce():
    tgt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    losses = BoxCriterion(score_target="iou", aux_loss=False)(
        _pred(tgt.clone(), torch.tensor([20.0])), {"boxes": tgt}
    )
    assert losses["loss_score"].item() < 1e-6
    with pytest.raises(ValueError, match="score_target"):
        BoxCriterion(score_target="l2")


def test_score_gradient_does_not_reach_boxes():
    tgt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    boxes = torch.tensor([[0.45, 0.5, 0.2, 0.25]], requires_grad=True)
    scores = torch.zeros(1, requires_grad=True)
    BoxCriterion(aux_loss=False)(_pred(boxes, scores), {"boxes": tgt})["loss_score"].backward()
    assert boxes.grad is None or boxes.grad.abs().sum() == 0
    assert scores.grad.abs().sum() > 0


def test_aux_layers_get_suffixed_losses_and_groups_match_independently():
    tgt = {
        "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]),
        "group": torch.tensor([4, 4]),
    }
    swapped = tgt["boxes"].flip(0)
    pred = _pred(swapped, torch.zeros(2), aux=[{"boxes": swapped, "scores": torch.zeros(2)}])
    losses = BoxCriterion()(pred, tgt, pred_group=torch.tensor([4, 4]))
    assert set(losses) == {
        "loss_bbox",
        "loss_giou",
        "loss_score",
        "loss_bbox_0",
        "loss_giou_0",
        "loss_score_0",
    }
    # Matched inside the group: the swapped order costs nothing.
    assert losses["loss_bbox"].item() < 1e-6
    assert losses["loss_giou_0"].item() < 1e-6
    with pytest.raises(ValueError, match="boxes"):
        BoxCriterion()(pred, {"boxes": torch.zeros(2, 5)})


def test_region_loss_of_the_matched_targets_masks():
    from trp.losses import box_region_loss

    torch.manual_seed(0)
    tgt = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])
    masks = torch.rand(2, 8, 8)
    # Predictions in the opposite order: the matcher pairs prediction 0 with target 1.
    boxes = tgt.flip(0).clone().requires_grad_(True)
    logits = torch.randn(2, 8, 8, requires_grad=True)
    pred = {"boxes": boxes, "scores": torch.zeros(2), "region_logits": logits}
    group = torch.zeros(2, dtype=torch.long)
    targets = {"boxes": tgt, "masks": masks, "group": group}
    out = BoxCriterion(weight_region=3.0, aux_loss=False)(pred, targets, pred_group=group)
    want = box_region_loss(logits, tgt.flip(0), masks=masks.flip(0))
    for k in ("loss_region_ce", "loss_region_dice"):
        torch.testing.assert_close(out[k], 3.0 * want[k])
    out["loss_region_ce"].backward()
    assert logits.grad.abs().sum() > 0
    # Without masks the filled target box is the region; off by default.
    no_masks = BoxCriterion(weight_region=1.0, aux_loss=False)(
        pred, {"boxes": tgt, "group": group}, pred_group=group
    )
    torch.testing.assert_close(
        no_masks["loss_region_dice"], box_region_loss(logits, tgt.flip(0))["loss_region_dice"]
    )
    filled = BoxCriterion(weight_region=1.0, region_target="box", aux_loss=False)(
        pred, targets, pred_group=group
    )
    torch.testing.assert_close(filled["loss_region_dice"], no_masks["loss_region_dice"])
    assert "loss_region_ce" not in BoxCriterion(aux_loss=False)(pred, targets, pred_group=group)
    # Masks of another size are averaged down to the map's.
    big = masks.repeat_interleave(2, 1).repeat_interleave(2, 2)
    resized = BoxCriterion(weight_region=3.0, aux_loss=False)(
        pred, {**targets, "masks": big}, pred_group=group
    )
    torch.testing.assert_close(resized["loss_region_ce"], out["loss_region_ce"])
    with pytest.raises(ValueError, match="weight_region"):
        BoxCriterion(weight_region=-1.0)
