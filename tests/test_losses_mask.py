"""MaskCriterion matching cost and loss normalisation."""

from __future__ import annotations

import torch

from trp.losses import MaskCriterion, mask_match_cost


def _masks():
    m = torch.zeros(3, 16, 16)
    m[0, 2:8, 2:8] = 1
    m[1, 8:14, 8:14] = 1
    m[2, 2:6, 10:15] = 1
    return m


def test_match_cost_is_lowest_on_the_true_mask():
    m = _masks()
    logits = (m * 2 - 1) * 8
    points = torch.rand(512, 2, generator=torch.Generator().manual_seed(0))
    cost = mask_match_cost(logits, m, points)
    assert cost.shape == (3, 3)
    assert torch.equal(cost.argmin(1), torch.arange(3))


def test_matching_inside_groups_and_perfect_prediction_loss():
    m = _masks()
    # Pixel features = one-hot of "inside target j" so embed e_j reproduces mask j's logits.
    pixels = (m * 2 - 1)[None] * 10  # 1 x 3 x H x W
    embed = torch.eye(3)[[1, 0, 2]]  # swapped 0 and 1
    preds = {
        "masks": torch.einsum("qc,chw->qhw", embed, pixels[0]),
        "mask_embed": embed,
        "pixel_features": pixels,
        "image_index": torch.zeros(3, dtype=torch.int64),
    }
    crit = MaskCriterion(
        num_points=256,
        weight_ce=1.0,
        weight_dice=1.0,
        oversample_ratio=1.0,
        importance_sample_ratio=0.0,
    )
    group = torch.tensor([0, 0, 1])
    pi, ti = crit.match(preds, {"masks": m, "group": group}, group)
    assert list(zip(pi.tolist(), ti.tolist())) == [(1, 0), (0, 1), (2, 2)]
    losses = crit(
        preds,
        {"masks": m, "group": group},
        pred_group=group,
        generator=torch.Generator().manual_seed(0),
    )
    # Uniform points: only those right on a mask edge are uncertain.
    assert losses["loss_mask"].item() < 0.1
    assert losses["loss_dice"].item() < 0.1
    unmatched = crit(preds, {"masks": m}, generator=torch.Generator().manual_seed(0))
    assert unmatched["loss_dice"] > 5 * losses["loss_dice"]
