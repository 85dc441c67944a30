"""Box-region targets and losses: hand-computed rectangles and masks, perfect and empty
predictions."""

from __future__ import annotations

import pytest
import torch

from trp.losses import box_region_loss, box_region_masks


def test_region_masks_cover_the_pixel_centres_inside_the_box() -> None:
    # Left half, rows 1..2 of a 4 x 4 grid (pixel centres at 0.125, 0.375, ...).
    boxes = torch.tensor([[0.25, 0.5, 0.5, 0.5]])
    want = torch.zeros(1, 4, 4)
    want[0, 1:3, 0:2] = 1
    assert torch.equal(box_region_masks(boxes, (4, 4)), want)
    with pytest.raises(ValueError, match="cxcywh"):
        box_region_masks(torch.zeros(3), (4, 4))


def test_region_loss_values() -> None:
    boxes = torch.tensor([[0.25, 0.5, 0.5, 0.5]])
    target = box_region_masks(boxes, (4, 4))
    sure = (target * 2 - 1) * 30.0  # logits that agree with the target almost surely
    losses = box_region_loss(sure, boxes)
    assert losses["loss_region_ce"] < 1e-6 and losses["loss_region_dice"] < 1e-6
    zero = box_region_loss(torch.zeros(1, 4, 4), boxes)
    torch.testing.assert_close(zero["loss_region_ce"], torch.log(torch.tensor(2.0)))
    # Dice of p = 0.5 everywhere against 4 of 16 pixels: 1 - (2 * 2 + 1) / (8 + 4 + 1).
    torch.testing.assert_close(zero["loss_region_dice"], torch.tensor(1 - 5 / 13))
    empty = box_region_loss(torch.zeros(0, 4, 4, requires_grad=True), torch.zeros(0, 4))
    assert float(empty["loss_region_ce"].detach()) == 0.0
    empty["loss_region_ce"].backward()
    with pytest.raises(ValueError, match="logits"):
        box_region_loss(torch.zeros(2, 4, 4), boxes)


def test_region_loss_against_a_mask_target() -> None:
    # A circle-like mask whose box is the whole 4 x 4 grid: the corners are outside the object.
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    mask = torch.ones(1, 4, 4)
    mask[0, [0, 0, 3, 3], [0, 3, 0, 3]] = 0
    sure = (mask * 2 - 1) * 30.0
    fit = box_region_loss(sure, boxes, masks=mask)
    assert fit["loss_region_ce"] < 1e-6 and fit["loss_region_dice"] < 1e-6
    # The same logits against the filled box miss its 4 corners.
    assert box_region_loss(sure, boxes)["loss_region_ce"] > 1.0
    # Soft targets (area fractions): p = 0.5 against 12 ones -> dice 1 - (2 * 6 + 1) / (8 + 12 + 1).
    zero = box_region_loss(torch.zeros(1, 4, 4), boxes, masks=mask)
    torch.testing.assert_close(zero["loss_region_dice"], torch.tensor(1 - 13 / 21))
    with pytest.raises(ValueError, match="masks must match"):
        box_region_loss(sure, boxes, masks=torch.ones(1, 2, 2))
