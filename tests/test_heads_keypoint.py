"""KeypointHead + KeypointCriterion (regression and heatmap modes, OKS matching)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import requires_native
from trp.heads import HeadInputs, KeypointHead
from trp.losses import KeypointCriterion, object_keypoint_similarity
from trp.ops import use_fused

C_LM = 48
K = 5
SIGMAS = [0.05] * K


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


def _head(mode: str = "regression") -> KeypointHead:
    torch.manual_seed(0)
    return KeypointHead(
        in_dim=C_LM,
        in_channels=[16, 24],
        num_keypoints=K,
        mode=mode,
        d_model=32,
        n_heads=4,
        n_points=2,
        dim_feedforward=64,
        num_layers=2,
        heatmap_dim=16,
    )


def _targets() -> dict:
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(3, K, 2, generator=g) * 0.6 + 0.2
    v = torch.full((3, K, 1), 2.0)
    v[0, 1] = 0.0
    return {
        "keypoints": torch.cat([xy, v], -1),
        "areas": torch.tensor([0.1, 0.2, 0.15]),
        "group": torch.tensor([0, 1, 1]),
    }


@pytest.mark.parametrize("mode", ["regression", "heatmap"])
def test_shapes_and_ranges(mode):
    head = _head(mode)
    out = _call(
        head, torch.randn(3, C_LM), _features(), torch.tensor([0, 1, 1]), image_size=(32, 28)
    )
    assert out["keypoints"].shape == (3, K, 2)
    assert ((out["keypoints"] >= 0) & (out["keypoints"] <= 1)).all()
    assert out["visibility"].shape == (3, K)
    if mode == "heatmap":
        assert out["heatmaps"].shape == (3, K, 8, 7)
    post = KeypointHead.postprocess(out, (32, 28))
    assert post.shape == (3, K, 3)
    assert (post[..., 0] <= 28).all()


@pytest.mark.parametrize(("mode", "threshold"), [("regression", 0.35), ("heatmap", 0.6)])
def test_overfits_tiny_batch_and_grad_reaches_queries(mode, threshold):
    """Weighted L1 + OKS + visibility (+ aux), from ~8, falls below ``threshold`` within 300
    Adam steps (lr 3e-3), and the mean error of visible keypoints is < 0.03 (group 1 matched by
    OKS in either order)."""
    head = _head(mode)
    feats = _features()
    q = torch.randn(3, C_LM, requires_grad=True)
    idx = torch.tensor([0, 1, 1])
    tgt = _targets()
    crit = KeypointCriterion(num_keypoints=K, sigmas=SIGMAS)
    pg = torch.tensor([0, 1, 1])
    opt = torch.optim.Adam([*head.parameters(), q], lr=3e-3)
    for step in range(300):
        out = _call(head, q, feats, idx, image_size=(32, 32))
        losses = crit(out, tgt, pred_group=pg)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert q.grad.abs().sum() > 0
        opt.step()
    assert loss.item() < threshold, losses
    pi, ti = crit.match(out["keypoints"], tgt, pg)
    vis = tgt["keypoints"][ti, :, 2] > 0
    err = (out["keypoints"][pi] - tgt["keypoints"][ti, :, :2]).norm(dim=-1)[vis]
    assert err.mean() < 0.03


def test_oks_matching_picks_the_closer_instance():
    tgt = _targets()
    crit = KeypointCriterion(num_keypoints=K, sigmas=SIGMAS)
    # Predictions of group 1 in swapped order: the matcher must undo the swap.
    pred = tgt["keypoints"][[0, 2, 1], :, :2] + 0.01
    pi, ti = crit.match(pred, tgt, torch.tensor([0, 1, 1]))
    assert list(zip(pi.tolist(), ti.tolist())) == [(0, 0), (2, 1), (1, 2)]


def test_oks_values():
    tgt = _targets()["keypoints"]
    areas = torch.tensor([0.1, 0.2, 0.15])
    sig = torch.tensor(SIGMAS)
    torch.testing.assert_close(
        object_keypoint_similarity(tgt[..., :2], tgt, areas, sig), torch.ones(3)
    )
    # One visible point off by d: exp(-d^2 / (2 * area * (2 sigma)^2)), invisible points ignored.
    pred = tgt[..., :2].clone()
    pred[0, 0, 0] += 0.05
    pred[0, 1] += 0.5
    oks = object_keypoint_similarity(pred, tgt, areas, sig)[0]
    expected = (3 + torch.exp(torch.tensor(-(0.05**2) / (2 * 0.1 * 0.1**2)))) / 4
    torch.testing.assert_close(oks, expected)


def test_empty_and_bad_inputs():
    head = _head("heatmap")
    out = _call(
        head,
        torch.zeros(0, C_LM),
        _features(),
        torch.zeros(0, dtype=torch.int64),
        image_size=(32, 32),
    )
    assert out["keypoints"].shape == (0, K, 2)
    assert out["heatmaps"].shape == (0, K, 8, 8)
    crit = KeypointCriterion(num_keypoints=K, sigmas=SIGMAS)
    losses = crit(out, {"keypoints": torch.zeros(0, K, 3), "areas": torch.zeros(0)})
    assert all(v.item() == 0 for v in losses.values())
    with pytest.raises(ValueError, match="image_size"):
        _call(head, torch.randn(1, C_LM), _features(), torch.tensor([0]))
    with pytest.raises(IndexError):
        _call(head, torch.randn(1, C_LM), _features(), torch.tensor([2]), image_size=(32, 32))
    with pytest.raises(ValueError, match="sigmas"):
        KeypointCriterion(num_keypoints=K)
    with pytest.raises(ValueError, match="mode"):
        _head("dense")
    with pytest.raises(ValueError, match="areas"):
        crit(out, {"keypoints": torch.zeros(0, K, 3), "areas": torch.zeros(2)})


@requires_native
def test_decoder_layer_compiles_without_graph_break():
    """The keypoint layer (self-attention among an instance's K tokens, deformable attention
    around 2-d points) traces with the fused ms_deform_attn as one op."""
    head = _head().eval()
    layer = head.decoder.layers[0]
    feats = head.decoder.adapter(_features())
    b, m = 2, 2

    def run(tokens, pos, ref):
        return layer(tokens, feats, pos=pos, reference_points=ref)

    args = (
        torch.randn(b, m, K, 32),
        torch.randn(b, m, K, 32),
        torch.rand(b, m, K, 2) * 0.5 + 0.25,
    )
    with use_fused(True), torch.no_grad():
        explain = torch._dynamo.explain(run)(*args)
        assert explain.graph_break_count == 0, explain.break_reasons
        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(*args), run(*args), rtol=1e-4, atol=1e-5)
