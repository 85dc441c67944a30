"""trp.heads.box_format: every box format both ways, normalised <-> pixels."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert as tv_box_convert

from trp.heads import (
    BOX_FORMATS,
    box_convert,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    denormalize_boxes,
    normalize_boxes,
)

XYXY = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 4.0, 2.0]])


@pytest.mark.parametrize("src", BOX_FORMATS)
@pytest.mark.parametrize("dst", BOX_FORMATS)
def test_every_format_round_trips(src, dst):
    boxes = box_convert(XYXY, "xyxy", src)
    out = box_convert(boxes, src, dst)
    torch.testing.assert_close(out, tv_box_convert(XYXY, "xyxy", dst))
    torch.testing.assert_close(box_convert(out, dst, "xyxy"), XYXY)


def test_known_values_and_batched_shapes():
    cxcywh = torch.tensor([[30.0, 50.0, 40.0, 60.0], [2.0, 1.0, 4.0, 2.0]])
    torch.testing.assert_close(box_xyxy_to_cxcywh(XYXY), cxcywh)
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), XYXY)
    torch.testing.assert_close(
        box_convert(XYXY, "xyxy", "xywh")[0], torch.tensor([10.0, 20, 40, 60])
    )
    batched = box_cxcywh_to_xyxy(cxcywh[None].expand(3, -1, -1))
    assert batched.shape == (3, 2, 4)


def test_normalise_and_back():
    size = (100, 200)  # H, W
    norm = normalize_boxes(XYXY, size)
    torch.testing.assert_close(norm[0], torch.tensor([0.05, 0.2, 0.25, 0.8]))
    torch.testing.assert_close(denormalize_boxes(norm, size), XYXY)
    # One size per box.
    sizes = torch.tensor([[100.0, 200.0], [2.0, 4.0]])
    torch.testing.assert_close(normalize_boxes(XYXY, sizes)[1], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="box format"):
        box_convert(XYXY, "xyxy", "yxyx")
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        box_convert(torch.zeros(2, 3), "xyxy", "cxcywh")
    with pytest.raises(TypeError, match="floating"):
        box_convert(torch.zeros(2, 4, dtype=torch.long), "xyxy", "cxcywh")
    with pytest.raises(ValueError, match="image_size"):
        normalize_boxes(XYXY, (0, 10))
