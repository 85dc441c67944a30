"""BoxHead + BoxCriterion: shapes, ranges, overfitting, gradients, compile, bad inputs."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import requires_native
from trp.heads import BoxHead
from trp.losses import BoxCriterion
from trp.ops import use_fused

C_LM = 48


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: a second OpenMP thread only adds synchronisation (and stalls on a busy box).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


CHANNELS = [16, 24]


def _features(batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 16, 8, 8, generator=g), torch.randn(batch, 24, 4, 4, generator=g)]


def _head(**kw) -> BoxHead:
    torch.manual_seed(0)
    args = {
        "in_dim": C_LM,
        "in_channels": CHANNELS,
        "d_model": 32,
        "n_heads": 4,
        "n_points": 2,
        "dim_feedforward": 64,
        "num_layers": 2,
    }
    args.update(kw)
    return BoxHead(**args)


def test_shapes_and_ranges():
    head = _head()
    q = torch.randn(5, C_LM)
    out = head(q, _features(), torch.tensor([0, 1, 1, 0, 1]))
    assert out["boxes"].shape == (5, 4)
    assert out["scores"].shape == (5,)
    assert ((out["boxes"] > 0) & (out["boxes"] < 1)).all()
    assert out["image_index"].tolist() == [0, 1, 1, 0, 1]
    assert len(out["aux"]) == 1
    assert out["aux"][0]["boxes"].shape == (5, 4)


def test_queries_of_one_image_do_not_see_other_images():
    head = _head().eval()
    feats = _features()
    q = torch.randn(3, C_LM)
    out = head(q, feats, torch.tensor([0, 1, 1]))
    # Changing image 1's queries must leave image 0's prediction unchanged.
    q2 = q.clone()
    q2[1:] = torch.randn(2, C_LM)
    out2 = head(q2, feats, torch.tensor([0, 1, 1]))
    torch.testing.assert_close(out["boxes"][0], out2["boxes"][0])
    assert not torch.allclose(out["boxes"][1], out2["boxes"][1])


def test_object_index_pools_vrt_runs():
    head = _head(pooling="mean").eval()
    q = torch.randn(4, C_LM)
    feats = _features()
    pooled = head(q, feats, torch.tensor([1, 1, 0, 0]), object_index=torch.tensor([0, 0, 1, 1]))
    assert pooled["boxes"].shape == (2, 4)
    assert pooled["image_index"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="same image"):
        head(q, feats, torch.tensor([1, 0, 0, 0]), object_index=torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="no gaps"):
        head(q, feats, torch.tensor([1, 1, 0, 0]), object_index=torch.tensor([0, 0, 2, 2]))


def test_overfits_tiny_batch_and_grad_reaches_queries():
    """Within 300 Adam steps (lr 3e-3) the total weighted loss (L1, GIoU, score, aux) falls from
    ~16 to < 1 and every box coordinate is within 0.02 of its target."""
    head = _head()
    feats = _features()
    q = torch.randn(4, C_LM, requires_grad=True)
    idx = torch.tensor([0, 1, 1, 1])
    tgt = {
        "boxes": torch.tensor(
            [[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.2, 0.7, 0.1, 0.2], [0.8, 0.2, 0.2, 0.1]]
        ),
        "group": torch.tensor([0, 1, 1, 2]),
    }
    pg = torch.tensor([0, 1, 1, 2])
    crit = BoxCriterion()
    out = head(q, feats, idx)
    loss = sum(crit(out, tgt, pred_group=pg).values())
    loss.backward()
    assert q.grad is not None
    assert q.grad.abs().sum() > 0
    opt = torch.optim.Adam([*head.parameters(), q], lr=3e-3)
    for _ in range(300):
        losses = crit(head(q, feats, idx), tgt, pred_group=pg)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0, losses
    out = head(q, feats, idx)
    assert (out["boxes"][[0, 3]] - tgt["boxes"][[0, 3]]).abs().max() < 0.02
    # Group 1 holds two queries and two targets: matched in either order.
    err = torch.cdist(out["boxes"][1:3], tgt["boxes"][1:3], p=1).amin(1)
    assert err.max() < 0.08


def test_empty_queries_return_empty_predictions():
    head = _head()
    out = head(torch.zeros(0, C_LM), _features(), torch.zeros(0, dtype=torch.int64))
    assert out["boxes"].shape == (0, 4)
    assert out["scores"].shape == (0,)
    losses = BoxCriterion()(out, {"boxes": torch.zeros(0, 4)})
    assert all(v.item() == 0 for v in losses.values())


def test_bad_inputs_raise():
    head = _head()
    feats = _features()
    q = torch.randn(2, C_LM)
    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        head(q, feats, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="feature levels"):
        head(q, feats[:1], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"features\[1\] must have shape \[B, 24, H, W\]"):
        head(q, [feats[0], torch.randn(2, 8, 4, 4)], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"queries must have shape \[Nq, 48\]"):
        head(torch.randn(2, 10), feats, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="int64"):
        head(q, feats, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="one-to-one"):
        BoxCriterion()(head(q, feats, torch.tensor([0, 1])), {"boxes": torch.rand(3, 4)})


@requires_native
def test_decoder_layer_compiles_without_graph_break():
    """The fused ms_deform_attn traces as one op; the eager reference would break the graph."""
    head = _head().eval()
    layer = head.layers[0]
    b, m, d = 2, 3, 32
    feats = head.adapter(_features())
    args = (
        torch.randn(b, m, d),
        torch.randn(b, m, d),
        torch.rand(b, m, 2, 4) * 0.5 + 0.25,
        feats.flat.detach(),
        feats.spatial_shapes,
        feats.level_start_index,
        torch.zeros(b, m, dtype=torch.bool),
    )
    with use_fused(True):
        explain = torch._dynamo.explain(layer)(*args)
        assert explain.graph_break_count == 0, explain.break_reasons
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(*args), layer(*args), rtol=1e-4, atol=1e-5)
