"""MaskHead + MaskCriterion + masks_to_boxes."""

from __future__ import annotations

import pytest
import torch

from trp.heads import HeadInputs, MaskHead, masks_to_boxes
from trp.losses import MaskCriterion

C_LM = 48


def _call(head, queries, features, image_index, **kw):
    """The head on one :class:`HeadInputs` of these fields."""
    return head(HeadInputs(queries=queries, features=features, image_index=image_index, **kw))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: a second OpenMP thread only adds synchronisation (and stalls on a busy box).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _features() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 24, 4, 4, generator=g)]


def _head() -> MaskHead:
    torch.manual_seed(0)
    return MaskHead(
        in_dim=C_LM, in_channels=[16, 24], d_model=32, n_heads=4, mlp_dim=64, mask_dim=16
    )


def _targets() -> torch.Tensor:
    m = torch.zeros(3, 32, 32)
    m[0, 4:12, 4:20] = 1
    m[1, 16:28, 4:12] = 1
    m[2, 4:8, 20:28] = 1
    return m


def test_shapes_and_postprocess():
    head = _head()
    out = _call(
        head, torch.randn(3, C_LM), _features(), torch.tensor([0, 1, 1]), image_size=(30, 22)
    )
    assert out["masks"].shape == (3, 8, 6)
    assert out["mask_embed"].shape == (3, 16)
    assert out["pixel_features"].shape == (2, 16, 8, 6)
    # The logits are the dot product of each query's embedding with its own image's pixels.
    expected = torch.einsum("c,chw->hw", out["mask_embed"][2], out["pixel_features"][1])
    torch.testing.assert_close(out["masks"][2], expected)
    post = MaskHead.postprocess(out, (30, 22))
    assert post["probs"].shape == (3, 30, 22)
    assert post["masks"].dtype == torch.bool
    assert ((post["probs"] >= 0) & (post["probs"] <= 1)).all()
    assert post["boxes"].shape == (3, 4)


def test_overfits_tiny_batch_and_grad_reaches_queries():
    """Uniform points: weighted CE + dice < 1.2 (from ~7.7) within 200 Adam steps (lr 3e-3),
    and every upsampled mask has IoU > 0.8 with its target (group 1 matched in either order)."""
    head = _head()
    feats = _features()
    q = torch.randn(3, C_LM, requires_grad=True)
    idx = torch.tensor([0, 1, 1])
    m = _targets()
    tgt = {"masks": m, "group": torch.tensor([0, 1, 1])}
    pg = torch.tensor([0, 1, 1])
    crit = MaskCriterion(num_points=256, oversample_ratio=1.0, importance_sample_ratio=0.0)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam([*head.parameters(), q], lr=3e-3)
    for step in range(200):
        losses = crit(
            _call(head, q, feats, idx, image_size=(32, 32)), tgt, pred_group=pg, generator=g
        )
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert q.grad.abs().sum() > 0
        opt.step()
    assert loss.item() < 1.2, losses
    pred = MaskHead.postprocess(_call(head, q, feats, idx, image_size=(32, 32)), (32, 32))["masks"]
    tgt_b = m.bool()
    iou = (pred[:, None] & tgt_b[None]).flatten(2).sum(-1) / (pred[:, None] | tgt_b[None]).flatten(
        2
    ).sum(-1)
    assert iou[0, 0] > 0.8
    assert iou[1:, 1:].amax(1).min() > 0.8


def test_masks_to_boxes():
    m = torch.zeros(3, 10, 20, dtype=torch.bool)
    m[0, 2:4, 5:15] = True
    m[1, 0:10, 0:20] = True
    boxes = masks_to_boxes(m)
    torch.testing.assert_close(boxes[0], torch.tensor([0.5, 0.3, 0.5, 0.2]))
    torch.testing.assert_close(boxes[1], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(boxes[2], torch.zeros(4))
    assert masks_to_boxes(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4)
    with pytest.raises(ValueError, match="N, H, W"):
        masks_to_boxes(torch.zeros(4, 4))


def test_empty_and_bad_inputs():
    head = _head()
    out = _call(
        head,
        torch.zeros(0, C_LM),
        _features(),
        torch.zeros(0, dtype=torch.int64),
        image_size=(32, 32),
    )
    assert out["masks"].shape == (0, 8, 8)
    assert MaskHead.postprocess(out, (32, 32))["masks"].shape == (0, 32, 32)
    losses = MaskCriterion(num_points=16)(out, {"masks": torch.zeros(0, 32, 32)})
    assert all(v.item() == 0 for v in losses.values())
    with pytest.raises(ValueError, match="image_size"):
        _call(head, torch.randn(1, C_LM), _features(), torch.tensor([0]), image_size=None)
    with pytest.raises(IndexError):
        _call(head, torch.randn(1, C_LM), _features(), torch.tensor([5]), image_size=(32, 32))
    with pytest.raises(ValueError, match=r"HeadInputs.features .*\[B, C, H, W\]"):
        _call(
            head,
            torch.randn(1, C_LM),
            [torch.randn(2, 16, 8), torch.randn(2, 24, 4, 4)],
            torch.tensor([0]),
            image_size=(32, 32),
        )


def test_two_way_block_compiles_without_graph_break():
    head = _head().eval()
    block = head.blocks[0]
    args = (
        torch.randn(2, 3, 32),
        torch.randn(2, 3, 32),
        torch.randn(2, 80, 32),
        torch.randn(80, 32),
        torch.tensor([[False, False, True], [False, True, True]]),
    )
    explain = torch._dynamo.explain(block)(*args)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for a, b in zip(compiled(*args), block(*args)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


LIGHT = {
    "in_dim": 16,
    "in_channels": [24],
    "d_model": 32,
    "n_heads": 2,
    "dim_feedforward": 32,
    "num_layers": 1,
    "decoder": "light",
    "cross_attention": "dense",
}


def test_light_mask_head_shapes_and_empty_queries() -> None:
    feats = [torch.randn(2, 24, 4, 4)]
    mask = MaskHead(**LIGHT, mask_dim=8)
    q = torch.randn(5, 16)
    image = torch.tensor([0, 0, 1, 1, 1])
    obj = torch.tensor([0, 0, 1, 2, 2])
    m = _call(mask, q, feats, image, object_index=obj, image_size=(64, 64))
    assert m["masks"].shape == (3, 16, 16)
    assert m["image_index"].tolist() == [0, 1, 1]
    # 8 learned channels + the 5 coordinate channels of the box prior.
    assert m["pixel_features"].shape == (2, 13, 16, 16)
    empty = _call(mask, q[:0], feats, image[:0], image_size=(64, 64))
    assert empty["masks"].shape == (0, 16, 16) and empty["pixel_features"].shape == (2, 13, 16, 16)
    with pytest.raises(ValueError, match="fine_channels belongs"):
        MaskHead(**{**LIGHT, "decoder": "two_way"}, fine_channels=4)


def test_light_mask_head_box_prior_peaks_inside_the_reference() -> None:
    torch.manual_seed(0)
    feats = [torch.zeros(1, 24, 4, 4)]
    mask = MaskHead(**LIGHT)
    ref = torch.tensor([[0.25, 0.25, 0.25, 0.25], [float("nan")] * 4])
    q = torch.randn(2, 16)
    with torch.no_grad():
        for p in mask.readout.embed.parameters():
            p.zero_()  # only the prior is left
        out = _call(mask, q, feats, torch.tensor([0, 0]), image_size=(64, 64), reference_boxes=ref)
    m = out["masks"]  # 2 x 16 x 16
    assert m[0, 4, 4] == m[0].max() and m[0, 4, 4] > 1.5 and m[0, 14, 14] < -10
    assert m[1].abs().max() == 0  # no reference, no prior
    # The same logits come out of mask_embed . pixel_features (what the point loss samples).
    again = torch.einsum("nc,chw->nhw", out["mask_embed"], out["pixel_features"][0])
    torch.testing.assert_close(again, m, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="reference_boxes"):
        _call(mask, q, feats, torch.tensor([0, 0]), image_size=(64, 64), reference_boxes=ref[:1])


def test_box_prior_coefficients_match_the_quadratic() -> None:
    from trp.heads import box_prior_coefficients, coordinate_channels

    coords = coordinate_channels(8, 8)
    ref = torch.tensor([[0.5, 0.25, 0.5, 0.25]])
    coeffs = box_prior_coefficients(ref, torch.tensor([3.0]), torch.tensor([1.0]), (0.1, 0.0))
    got = torch.einsum("nc,chw->nhw", coeffs, coords)[0]
    x, y = coords[1], coords[3]
    want = 1.0 - 3.0 * ((x - 0.5) ** 2 / 0.35**2 + (y - 0.25) ** 2 / 0.125**2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # Per-image extents: an image of 4 x 4 cells on an 8 x 8 grid gets its own coordinates.
    per_image = coordinate_channels(8, 8, extent=torch.tensor([[4, 4], [8, 8]]))
    torch.testing.assert_close(per_image[0, :, :4, :4], coordinate_channels(4, 4))
    torch.testing.assert_close(per_image[1], coords)


def test_light_mask_head_never_copies_features_per_query() -> None:
    """Many objects on one image: the readout's peak memory does not grow with a per-object
    copy of the pixel maps (one batched matmul over per-image object slots)."""
    from trp.heads.mask_readout import _per_image_dot

    embed = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    # Image 2 has no object; image 1 the most (its slots set the padding of the others).
    pixels = torch.randn(3, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([1, 0, 1, 1, 0, 1, 1])
    want = torch.einsum("nc,nchw->nhw", embed, pixels[index])
    torch.testing.assert_close(_per_image_dot(embed, pixels, index), want)
    assert torch.autograd.gradcheck(lambda e, p: _per_image_dot(e, p, index), (embed, pixels))
    assert _per_image_dot(embed[:0], pixels, index[:0]).shape == (0, 3, 4)
