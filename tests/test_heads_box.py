"""BoxHead + BoxCriterion: shapes, ranges, overfitting, gradients, compile, bad inputs, the light
decoder (parity with the former trp.models.LightBoxHead), padding."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import requires_native
from trp.heads import BoxHead, HeadInputs
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


def _in(q, feats, idx, **kw) -> HeadInputs:
    return HeadInputs(queries=q, features=feats, image_index=idx, **kw)


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
    out = head(_in(q, _features(), torch.tensor([0, 1, 1, 0, 1])))
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
    out = head(_in(q, feats, torch.tensor([0, 1, 1])))
    # Changing image 1's queries must leave image 0's prediction unchanged.
    q2 = q.clone()
    q2[1:] = torch.randn(2, C_LM)
    out2 = head(_in(q2, feats, torch.tensor([0, 1, 1])))
    torch.testing.assert_close(out["boxes"][0], out2["boxes"][0])
    assert not torch.allclose(out["boxes"][1], out2["boxes"][1])


def test_object_index_pools_vrt_runs():
    head = _head(pooling="mean").eval()
    q = torch.randn(4, C_LM)
    feats = _features()
    pooled = head(
        _in(q, feats, torch.tensor([1, 1, 0, 0]), object_index=torch.tensor([0, 0, 1, 1]))
    )
    assert pooled["boxes"].shape == (2, 4)
    assert pooled["image_index"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="same image"):
        head(_in(q, feats, torch.tensor([1, 0, 0, 0]), object_index=torch.tensor([0, 0, 1, 1])))
    with pytest.raises(ValueError, match="no gaps"):
        head(_in(q, feats, torch.tensor([1, 1, 0, 0]), object_index=torch.tensor([0, 0, 2, 2])))


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
    out = head(_in(q, feats, idx))
    loss = sum(crit(out, tgt, pred_group=pg).values())
    loss.backward()
    assert q.grad is not None
    assert q.grad.abs().sum() > 0
    opt = torch.optim.Adam([*head.parameters(), q], lr=3e-3)
    for _ in range(300):
        losses = crit(head(_in(q, feats, idx)), tgt, pred_group=pg)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0, losses
    out = head(_in(q, feats, idx))
    assert (out["boxes"][[0, 3]] - tgt["boxes"][[0, 3]]).abs().max() < 0.02
    # Group 1 holds two queries and two targets: matched in either order.
    err = torch.cdist(out["boxes"][1:3], tgt["boxes"][1:3], p=1).amin(1)
    assert err.max() < 0.08


def test_empty_queries_return_empty_predictions():
    head = _head()
    out = head(_in(torch.zeros(0, C_LM), _features(), torch.zeros(0, dtype=torch.int64)))
    assert out["boxes"].shape == (0, 4)
    assert out["scores"].shape == (0,)
    losses = BoxCriterion()(out, {"boxes": torch.zeros(0, 4)})
    assert all(v.item() == 0 for v in losses.values())


def test_bad_inputs_raise():
    head = _head()
    feats = _features()
    q = torch.randn(2, C_LM)
    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        head(_in(q, feats, torch.tensor([0, 2])))
    with pytest.raises(ValueError, match="feature levels"):
        head(_in(q, feats[:1], torch.tensor([0, 1])))
    with pytest.raises(ValueError, match=r"features\[1\] must have shape \[B, 24, H, W\]"):
        head(_in(q, [feats[0], torch.randn(2, 8, 4, 4)], torch.tensor([0, 1])))
    with pytest.raises(ValueError, match=r"queries must have shape \[Nq, 48\]"):
        head(_in(torch.randn(2, 10), feats, torch.tensor([0, 1])))
    with pytest.raises(TypeError, match="int64"):
        head(_in(q, feats, torch.tensor([0.0, 1.0])))
    with pytest.raises(ValueError, match="one-to-one"):
        BoxCriterion()(head(_in(q, feats, torch.tensor([0, 1]))), {"boxes": torch.rand(3, 4)})


@requires_native
def test_decoder_layer_compiles_without_graph_break():
    """The fused ms_deform_attn traces as one op; the eager reference would break the graph."""
    head = _head().eval()
    layer = head.decoder.layers[0]
    b, m, d = 2, 3, 32
    feats = head.decoder.adapter(_features())
    tokens, pos = torch.randn(b, m, 1, d), torch.randn(b, m, 1, d)
    ref = torch.rand(b, m, 1, 4) * 0.5 + 0.25
    padding = torch.zeros(b, m, dtype=torch.bool)

    def run(tokens, pos, ref, padding):
        return layer(tokens, feats, pos=pos, reference_points=ref, object_padding=padding)

    args = (tokens, pos, ref, padding)
    with use_fused(True), torch.no_grad():
        explain = torch._dynamo.explain(run)(*args)
        assert explain.graph_break_count == 0, explain.break_reasons
        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(*args), run(*args), rtol=1e-4, atol=1e-5)


LIGHT = {"decoder": "light", "cross_attention": "dense", "n_heads": 2}


def test_light_decoder_starts_at_the_reference_boxes() -> None:
    head = _head(**LIGHT)
    q = torch.randn(3, C_LM)
    ref = torch.tensor([[0.3, 0.4, 0.2, 0.1], [float("nan")] * 4, [0.7, 0.6, 0.5, 0.3]])
    out = head(_in(q, _features(), torch.tensor([0, 1, 1]), reference_boxes=ref))
    assert out["aux"] == [] and out["scores"].shape == (3,)
    # The refinement starts at zero: given rows are the references, the NaN row a guess.
    torch.testing.assert_close(out["boxes"][[0, 2]], ref[[0, 2]], atol=1e-5, rtol=0)
    assert out["boxes"][1].isfinite().all()
    out["boxes"][1].sum().backward()
    assert head.init_box.layers[0].weight.grad.abs().sum() > 0  # the guess trains
    with pytest.raises(ValueError, match="reference_boxes"):
        head(_in(q, _features(), torch.tensor([0, 1, 1]), reference_boxes=ref[:2]))


@pytest.mark.parametrize("cross_attention", ["dense", "deformable"])
def test_light_decoder_overfits_with_either_cross_attention(cross_attention) -> None:
    """300 Adam steps (lr 3e-3): the light decoder's boxes come within 0.06 of the targets with
    dense and with deformable cross-attention (the two are interchangeable)."""
    head = _head(decoder="light", cross_attention=cross_attention)
    feats = _features()
    q = torch.randn(3, C_LM)
    idx = torch.tensor([0, 1, 1])
    tgt = {
        "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.2, 0.7, 0.1, 0.2]])
    }
    crit = BoxCriterion()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(300):
        loss = sum(crit(head(_in(q, feats, idx)), tgt).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (head(_in(q, feats, idx))["boxes"] - tgt["boxes"]).abs().max() < 0.06


def test_region_box_reads_its_box_off_the_region_map() -> None:
    from trp.heads import masks_to_boxes

    feats = [torch.randn(2, 24, 4, 4)]
    head = _head(**LIGHT, in_channels=[24], region=True, mask_dim=8, fine_channels=4)
    fine = torch.randn(2, 4, 16, 16)
    q = torch.randn(3, C_LM)
    ref = torch.tensor([[0.3, 0.4, 0.2, 0.1], [float("nan")] * 4, [0.7, 0.6, 0.5, 0.3]])
    inputs = _in(
        q,
        feats,
        torch.tensor([0, 1, 1]),
        image_size=(64, 64),
        reference_boxes=ref,
        fine_features=fine,
    )
    out = head(inputs)
    region = out["region_logits"]
    assert region.shape == (3, 16, 16)
    # The refinement starts at zero: every box is the extent of its map's positive pixels
    # (rows whose map is empty fall back to the reference).
    extent = masks_to_boxes(region > 0)
    found = extent[:, 2] > 0
    assert found.any()
    torch.testing.assert_close(out["boxes"][found], extent[found], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["boxes"][~found], ref[~found], atol=1e-4, rtol=0)
    region.sum().backward()
    assert head.region.fine.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="fine_features"):
        head(inputs.replace(fine_features=None))


def test_extent_scale_reads_edges_between_cells() -> None:
    from torch.nn import functional as F

    from trp.heads import masks_to_boxes

    head = _head(
        **LIGHT, in_channels=[24], region=True, mask_dim=8, fine_channels=4, extent_scale=4
    )
    feats = [torch.randn(2, 24, 4, 4)]
    inputs = _in(
        torch.randn(3, C_LM),
        feats,
        torch.tensor([0, 1, 1]),
        image_size=(64, 64),
        fine_features=torch.randn(2, 4, 16, 16),
    )
    out = head(inputs)
    region = out["region_logits"].detach()
    up = F.interpolate(region[:, None], size=(64, 64), mode="bilinear", align_corners=False)
    extent = masks_to_boxes(up[:, 0] > 0)
    found = extent[:, 2] > 0
    assert found.any()
    torch.testing.assert_close(out["boxes"][found], extent[found], atol=1e-4, rtol=0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="extent_scale"):
            _head(**LIGHT, region=True, extent_scale=bad)
    with pytest.raises(ValueError, match="decoder='light'"):
        _head(region=True)


FIXTURE = Path(__file__).parent / "fixtures" / "light_heads_parity.safetensors"


def _former_names(state: dict, prefix: str) -> dict:
    """A ``trp.models.LightBoxHead`` / ``LightMaskHead`` state dict under the names of
    ``BoxHead`` / ``MaskHead(decoder="light")``."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        key = key.replace("cross_attn.", "cross_attn.attn.").replace("ffn.2.", "ffn.3.")
        key = re.sub(r"^(box_embed|score_embed)\.", r"\1.0.", key)
        out[key] = value
    return out


def test_light_heads_match_the_former_trp_models_light_heads() -> None:
    """The frozen outputs of the former ``trp.models.LightBoxHead`` / ``LightMaskHead`` (seeded,
    weights perturbed; ``tests/fixtures/light_heads_parity.safetensors``) come out of
    ``BoxHead`` / ``MaskHead(decoder="light")`` given the old state dicts under the new names:
    the move changed the module layout only (the default demo's score depends on these heads)."""
    from trp.heads import MaskHead

    t = load_file(FIXTURE)
    kw = {
        "in_dim": 12,
        "in_channels": [20],
        "d_model": 16,
        "n_heads": 2,
        "dim_feedforward": 16,
        "num_layers": 2,
        "decoder": "light",
        "cross_attention": "dense",
        "mask_dim": 8,
        "fine_channels": 4,
    }
    box = BoxHead(**kw, region=True, extent_scale=4).eval()
    mask = MaskHead(**kw, box_prior=True).eval()
    box.load_state_dict(_former_names(t, "box.sd."), strict=True)
    mask.load_state_dict(_former_names(t, "mask.sd."), strict=True)
    inputs = HeadInputs(
        queries=t["in.queries"],
        features=[t["in.features"]],
        image_index=t["in.image_index"],
        object_index=t["in.object_index"],
        image_size=(64, 64),
        reference_boxes=t["in.reference_boxes"],
        fine_features=t["in.fine_features"],
    )
    with torch.no_grad():
        b, m = box(inputs), mask(inputs)
    for key in ("boxes", "scores", "region_logits"):
        torch.testing.assert_close(b[key], t[f"box.out.{key}"], atol=1e-5, rtol=1e-5)
    for key in ("masks", "mask_embed", "pixel_features"):
        torch.testing.assert_close(m[key], t[f"mask.out.{key}"], atol=1e-5, rtol=1e-5)


def _perturbed(head: torch.nn.Module) -> torch.nn.Module:
    """``head`` with noise on every weight: the zero-initialised refinements then read the
    features, so a test on the outputs sees what the decoder read."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return head


def test_light_heads_draw_the_former_seeded_initialisation() -> None:
    """Under one seed the light heads start from exactly the weights the former
    ``trp.models`` heads drew (the sums of squares and of magnitudes of all weights, computed
    from them): a seeded recipe starts where it started before the move."""
    from trp.heads import MaskHead

    kw = {
        "in_dim": 12,
        "in_channels": [20],
        "d_model": 16,
        "n_heads": 2,
        "dim_feedforward": 16,
        "num_layers": 2,
        "mask_dim": 8,
        "fine_channels": 4,
        "decoder": "light",
        "cross_attention": "dense",
    }
    torch.manual_seed(0)
    box = BoxHead(**kw, region=True, extent_scale=4)
    torch.manual_seed(0)
    mask = MaskHead(**kw)
    for head, squares, magnitudes in (
        (box, 1990.3887472295132, 2602.751542449274),
        (mask, 1952.4278567552385, 2483.1958976868336),
    ):
        state = head.state_dict().values()
        assert sum(float((v.double() ** 2).sum()) for v in state) == pytest.approx(
            squares, rel=1e-12
        )
        assert sum(float(v.double().abs().sum()) for v in state) == pytest.approx(
            magnitudes, rel=1e-12
        )


def _padded(features: list[torch.Tensor], extra: int) -> tuple[list, list]:
    """Each level of image 0 padded by ``extra`` cells at the finest level (scaled per level)
    below and right, with random junk in the padding; image 1 a random other image."""
    g = torch.Generator().manual_seed(7)
    finest = features[0].shape[-1]
    padded, masks = [], []
    for f in features:
        h, w = f.shape[-2:]
        e = extra * h // finest
        big = torch.randn(2, f.shape[1], h + e, w + e, generator=g) * 3
        big[0, :, :h, :w] = f[0]
        m = torch.ones(2, h + e, w + e, dtype=torch.bool)
        m[0, :h, :w] = False
        m[1, :, :] = False
        padded.append(big)
        masks.append(m)
    return padded, masks


@pytest.mark.parametrize(
    "kw",
    [{}, {"cross_attention": "dense"}, {**LIGHT}, {"decoder": "light"}],
    ids=["detr-deformable", "detr-dense", "light-dense", "light-deformable"],
)
def test_padding_does_not_change_a_padded_images_boxes(kw) -> None:
    """Image 0 alone vs the same image padded onto a larger grid (junk in the padding) next to
    another image: its boxes (in its own normalised frame) and scores agree to 1e-4."""
    head = _perturbed(_head(**kw).eval())
    feats = [f[:1] for f in _features()]
    q = torch.randn(2, C_LM)
    alone = head(_in(q, feats, torch.tensor([0, 0])))
    big, masks = _padded(feats, extra=4)
    together = head(_in(q, big, torch.tensor([0, 0]), padding_masks=masks))
    torch.testing.assert_close(together["boxes"], alone["boxes"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together["scores"], alone["scores"], atol=1e-4, rtol=1e-4)
    # Without the mask the junk is read: the padding mask is what keeps the boxes.
    unmasked = head(_in(q, big, torch.tensor([0, 0])))
    assert (unmasked["boxes"] - alone["boxes"]).abs().max() > 1e-3


def test_padding_does_not_change_a_padded_images_region_box() -> None:
    head = _head(
        **LIGHT, in_channels=[24], region=True, mask_dim=8, fine_channels=4, extent_scale=4
    ).eval()
    head = _perturbed(head)  # a region map with edges inside the image
    feats = [torch.randn(1, 24, 4, 4)]
    fine = torch.randn(1, 4, 16, 16)
    q = torch.randn(2, C_LM)
    ref = torch.tensor([[0.4, 0.4, 0.5, 0.5], [0.6, 0.5, 0.3, 0.2]])
    alone = head(
        _in(
            q,
            feats,
            torch.tensor([0, 0]),
            image_size=(64, 64),
            reference_boxes=ref,
            fine_features=fine,
        )
    )
    big, masks = _padded(feats, extra=2)
    big_fine = torch.randn(2, 4, 24, 24) * 3
    big_fine[0, :, :16, :16] = fine[0]
    together = head(
        _in(
            q,
            big,
            torch.tensor([0, 0]),
            image_size=(96, 96),
            reference_boxes=ref,
            fine_features=big_fine,
            padding_masks=masks,
        )
    )
    torch.testing.assert_close(
        together["region_logits"][:, :16, :16], alone["region_logits"], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(together["boxes"], alone["boxes"], atol=1e-4, rtol=1e-4)
