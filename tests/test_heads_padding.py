"""Padding masks: an image padded onto a larger grid (junk in the padding, next to another image)
gets the predictions it gets alone — mask (two-way and light), keypoint (regression and
heatmap) and depth heads. The box heads' cases are in test_heads_box.py."""

from __future__ import annotations

import pytest
import torch

from trp.heads import DepthHead, HeadInputs, KeypointHead, MaskHead, quarter_size

C_LM = 24
CHANNELS = [16, 24]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _perturbed(head: torch.nn.Module) -> torch.nn.Module:
    """Noise on every weight: zero-initialised output layers then read the features."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return head.eval()


def _image() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 16, 8, 6, generator=g), torch.randn(1, 24, 4, 3, generator=g)]


def _padded(features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Image 0 = ``features`` top-left of a 12 x 12 (6 x 6) grid with junk around it; image 1 a
    full-size random image."""
    g = torch.Generator().manual_seed(7)
    maps, masks = [], []
    for f, size in zip(features, (12, 6)):
        h, w = f.shape[-2:]
        big = torch.randn(2, f.shape[1], size, size, generator=g) * 3
        big[0, :, :h, :w] = f[0]
        m = torch.zeros(2, size, size, dtype=torch.bool)
        m[0] = True
        m[0, :h, :w] = False
        maps.append(big)
        masks.append(m)
    return maps, masks


IMAGE = (128, 96)  # image 0: a 16-pixel patch grid of 8 x 6
CANVAS = (192, 192)  # the padded batch: 12 x 12


ALL_LEVELS = slice(None)


def _pair(head, levels: slice = ALL_LEVELS, **extra) -> tuple[dict, dict]:
    """The head on image 0 alone and on the padded batch (feature ``levels`` only)."""
    q = torch.randn(2, C_LM, generator=torch.Generator().manual_seed(5))
    idx = torch.tensor([0, 0])
    feats = _image()
    big, masks = _padded(feats)
    feats, big, masks = feats[levels], big[levels], masks[levels]
    alone = head(HeadInputs(queries=q, features=feats, image_index=idx, image_size=IMAGE, **extra))
    together = head(
        HeadInputs(
            queries=q,
            features=big,
            image_index=idx,
            image_size=CANVAS,
            padding_masks=masks,
            **extra,
        )
    )
    return alone, together


def _crop(x: torch.Tensor) -> torch.Tensor:
    h, w = quarter_size(IMAGE)
    return x[..., :h, :w]


@pytest.mark.parametrize(
    "kw",
    [
        {"decoder": "two_way", "num_blocks": 1, "mlp_dim": 32},
        {"decoder": "light", "cross_attention": "dense", "num_layers": 1, "dim_feedforward": 32},
        {"decoder": "light", "cross_attention": "deformable", "num_layers": 1},
    ],
    ids=["two_way", "light-dense", "light-deformable"],
)
def test_masks_do_not_depend_on_padding(kw) -> None:
    torch.manual_seed(0)
    channels = CHANNELS if kw["decoder"] == "two_way" else [24]
    head = _perturbed(
        MaskHead(in_dim=C_LM, in_channels=channels, d_model=32, n_heads=4, mask_dim=8, **kw)
    )
    extra, levels = {}, slice(None)
    if kw["decoder"] == "light":
        # The light heads read one (the coarse) level, and place a prior at the reference.
        extra["reference_boxes"] = torch.tensor([[0.4, 0.5, 0.4, 0.3], [float("nan")] * 4])
        levels = slice(1, None)
    alone, together = _pair(head, levels, **extra)
    torch.testing.assert_close(_crop(together["masks"]), alone["masks"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together["mask_embed"], alone["mask_embed"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["regression", "heatmap"])
def test_keypoints_do_not_depend_on_padding(mode) -> None:
    torch.manual_seed(0)
    head = _perturbed(
        KeypointHead(
            in_dim=C_LM,
            in_channels=CHANNELS,
            num_keypoints=3,
            mode=mode,
            d_model=32,
            n_heads=4,
            n_points=2,
            dim_feedforward=32,
            num_layers=2,
            heatmap_dim=8,
            beta=4.0,
        )
    )
    alone, together = _pair(head)
    torch.testing.assert_close(together["keypoints"], alone["keypoints"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together["visibility"], alone["visibility"], atol=1e-4, rtol=1e-4)
    if mode == "heatmap":
        torch.testing.assert_close(
            _crop(together["heatmaps"]), alone["heatmaps"], atol=1e-4, rtol=1e-4
        )


def test_depth_does_not_depend_on_padding() -> None:
    torch.manual_seed(0)
    head = _perturbed(
        DepthHead(in_dim=C_LM, in_channels=CHANNELS, d_model=32, hidden_dim=8, n_heads=4)
    )
    alone, together = _pair(head)
    torch.testing.assert_close(_crop(together["depth"]), alone["depth"], atol=1e-4, rtol=1e-4)


def test_padding_is_what_keeps_the_predictions() -> None:
    """Control: the same padded batch without its masks reads the junk."""
    torch.manual_seed(0)
    head = _perturbed(
        DepthHead(in_dim=C_LM, in_channels=CHANNELS, d_model=32, hidden_dim=8, n_heads=4)
    )
    q = torch.randn(2, C_LM)
    idx = torch.tensor([0, 0])
    alone = head(HeadInputs(queries=q, features=_image(), image_index=idx, image_size=IMAGE))
    big, _ = _padded(_image())
    blind = head(HeadInputs(queries=q, features=big, image_index=idx, image_size=CANVAS))
    assert (_crop(blind["depth"]) - alone["depth"]).abs().max() > 1e-2


def test_bad_padding_masks_raise() -> None:
    head = DepthHead(in_dim=C_LM, in_channels=CHANNELS, d_model=32, hidden_dim=8, n_heads=4)
    big, masks = _padded(_image())
    q, idx = torch.randn(1, C_LM), torch.tensor([0])
    holes = [m.clone() for m in masks]
    holes[0][1, 3, 3] = True  # a hole inside image 1: not a top-left rectangle
    with pytest.raises(ValueError, match="top-left rectangle"):
        head(
            HeadInputs(
                queries=q, features=big, image_index=idx, image_size=CANVAS, padding_masks=holes
            )
        )
    with pytest.raises(ValueError, match="one mask per feature level"):
        HeadInputs(queries=q, features=big, image_index=idx, padding_masks=masks[:1])
    with pytest.raises(ValueError, match="bool"):
        HeadInputs(
            queries=q, features=big, image_index=idx, padding_masks=[m.float() for m in masks]
        )
