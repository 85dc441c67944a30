"""DepthHead + DepthCriterion."""

from __future__ import annotations

import pytest
import torch

from trp.heads import DepthHead, HeadInputs
from trp.losses import DepthCriterion

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


def _head(**kw) -> DepthHead:
    torch.manual_seed(0)
    return DepthHead(in_dim=C_LM, in_channels=[16, 24], d_model=32, hidden_dim=16, n_heads=4, **kw)


@pytest.mark.parametrize("activation", ["softplus", "exp"])
def test_shapes_positive_and_postprocess(activation):
    head = _head(activation=activation)
    out = _call(
        head, torch.randn(3, C_LM), _features(), torch.tensor([0, 1, 1]), image_size=(30, 18)
    )
    assert out["depth"].shape == (3, 8, 5)
    assert (out["depth"] > 0).all()
    up = DepthHead.postprocess(out, (30, 18))
    assert up.shape == (3, 30, 18)
    assert (up > 0).all()


def test_overfits_tiny_batch_and_grad_reaches_queries():
    """SILog + gradient loss < 0.03 within 150 Adam steps (lr 3e-3), targets at output res."""
    head = _head()
    feats = _features()
    q = torch.randn(3, C_LM, requires_grad=True)
    idx = torch.tensor([0, 1, 1])
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 4), torch.linspace(0, 1, 4), indexing="ij")
    gt = {"depth": torch.stack([1 + 3 * xx, 2 + 2 * yy, 4 - 2 * xx * yy])}
    crit = DepthCriterion()
    opt = torch.optim.Adam([*head.parameters(), q], lr=3e-3)
    first = None
    for step in range(150):
        losses = crit(_call(head, q, feats, idx, image_size=(16, 16)), gt)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            first = loss.item()
            assert q.grad.abs().sum() > 0
        opt.step()
    assert loss.item() < 0.03 < first, losses


def test_empty_and_bad_inputs():
    head = _head()
    out = _call(
        head,
        torch.zeros(0, C_LM),
        _features(),
        torch.zeros(0, dtype=torch.int64),
        image_size=(16, 16),
    )
    assert out["depth"].shape == (0, 4, 4)
    assert DepthHead.postprocess(out, (16, 16)).shape == (0, 16, 16)
    with pytest.raises(ValueError, match="image_size"):
        _call(head, torch.randn(1, C_LM), _features(), torch.tensor([0]), image_size=None)
    with pytest.raises(IndexError):
        _call(head, torch.randn(1, C_LM), _features(), torch.tensor([-1]), image_size=(16, 16))
    with pytest.raises(ValueError, match="activation"):
        _head(activation="relu")


def test_silog_is_scale_invariant_and_grad_term_zero_for_scaled_depth():
    crit = DepthCriterion(lambd=1.0)
    gt = torch.rand(2, 6, 6) + 0.5
    losses = crit({"depth": gt * 3.0}, {"depth": gt})
    assert losses["loss_silog"].item() < 1e-3
    assert losses["loss_grad"].item() < 1e-5
    worse = crit({"depth": gt.flip(-1)}, {"depth": gt})
    assert worse["loss_silog"] > 0.05
    assert worse["loss_grad"] > 0.05


def test_invalid_pixels_are_ignored():
    crit = DepthCriterion()
    gt = torch.rand(1, 6, 6) + 0.5
    pred = gt.clone()
    pred[0, :3] = 50.0
    valid = torch.zeros(1, 6, 6, dtype=torch.bool)
    valid[0, 3:] = True
    losses = crit({"depth": pred}, {"depth": gt, "valid": valid})
    assert losses["loss_silog"].item() < 1e-3
    with pytest.raises(ValueError, match="targets\\['depth'\\]"):
        crit({"depth": pred}, {"depth": gt[0]})


def test_depth_criterion_matches_within_groups() -> None:
    """Like every criterion, DepthCriterion takes groups: two depth queries of one triplet pair
    with the closer of its two targets, whatever their order."""
    crit = DepthCriterion()
    near, far = torch.full((1, 8, 8), 1.0), torch.full((1, 8, 8), 10.0)
    pred = {"depth": torch.cat([far, near]) * 1.01}
    group = torch.tensor([3, 3])
    targets = {"depth": torch.cat([near, far]), "group": group}
    matched = crit(pred, targets, pred_group=group)
    in_order = crit(pred, {"depth": targets["depth"]})
    swapped = crit({"depth": pred["depth"].flip(0)}, {"depth": targets["depth"]})
    for k in matched:
        torch.testing.assert_close(matched[k], swapped[k])
    # Matched: a 1 % scale error (SILog ~0.004); in order: 10x off (SILog ~0.9).
    assert matched["loss_silog"] < 0.01 < 0.5 < in_order["loss_silog"]
    with pytest.raises(ValueError, match="both pred_group"):
        crit(pred, targets)
    with pytest.raises(ValueError, match="one-to-one"):
        crit(pred, {"depth": targets["depth"][:1]})
