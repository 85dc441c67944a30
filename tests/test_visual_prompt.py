"""Visual-prompt encoder: masks from every prompt kind, aspect-correct pooling, [VPT] splicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trp.data import visual_prompt
from trp.grammar import VPT, VisualPrompt
from trp.vrt import ImageBinding
from trp.vrt.visual_prompt import (
    VisualPromptEncoder,
    expand_vpt,
    prompt_coverage,
    prompt_masks,
    splice_prompt_tokens,
)


def _encoder(c: int = 8, d: int = 16, k: int = 3) -> VisualPromptEncoder:
    torch.manual_seed(0)
    return VisualPromptEncoder(in_dim=c, out_dim=d, num_tokens=k, num_heads=2).eval()


def test_every_prompt_kind_becomes_a_mask_at_the_image_size() -> None:
    obj = np.zeros((32, 48), dtype=bool)
    obj[4:12, 30:44] = True
    box = np.array([30, 4, 44, 12], dtype=np.float32)
    rng = np.random.default_rng(0)
    rendered = [torch.from_numpy(visual_prompt(k, obj, box, rng)) for k in ("point", "scribble")]
    prompts = [
        VisualPrompt("point", (40, 8)),
        VisualPrompt("box", (30, 4, 43, 11)),
        VisualPrompt("scribble", [(31, 5), (42, 10)]),
        VisualPrompt("mask", torch.from_numpy(obj)),
        *rendered,
    ]
    masks = prompt_masks(prompts, (32, 48))
    assert masks.shape == (6, 32, 48) and masks.dtype == torch.bool
    assert torch.equal(masks[1], torch.from_numpy(obj))  # inclusive box = the object's pixels
    assert torch.equal(masks[3], torch.from_numpy(obj))
    assert bool(masks[0, 8, 40]) and int(masks[0].sum()) < 20
    for m in masks:  # every prompt touches the object
        assert bool((m & torch.from_numpy(obj)).any())
    with pytest.raises(ValueError, match="covers no pixel"):
        prompt_masks([torch.zeros(32, 48, dtype=torch.bool)], (32, 48))
    with pytest.raises(ValueError, match="shape"):
        prompt_masks([torch.ones(48, 32, dtype=torch.bool)], (32, 48))
    with pytest.raises(TypeError, match="threshold"):
        prompt_masks([torch.ones(32, 48)], (32, 48))
    with pytest.raises(TypeError, match="VisualPrompt"):
        prompt_masks(["box"], (32, 48))  # type: ignore[list-item]


def test_coverage_keeps_the_aspect_of_non_square_images() -> None:
    # 64 x 128 image, 4 x 8 grid of 16-pixel cells; the prompt is the top-right cell pair.
    mask = torch.zeros(1, 64, 128, dtype=torch.bool)
    mask[0, 0:16, 96:128] = True
    cover = prompt_coverage(mask, (4, 8))
    expected = torch.zeros(4, 8)
    expected[0, 6:8] = 1
    assert torch.equal(cover[0], expected)
    # REF-VLM's mix-up: resizing to (w, h) and reading it as (h, w) puts the prompt elsewhere.
    swapped = prompt_coverage(mask, (8, 4)).reshape(1, 4, 8)
    assert not torch.equal(swapped[0], expected)
    half = torch.zeros(1, 64, 128, dtype=torch.bool)
    half[0, 0:8, 0:16] = True
    assert prompt_coverage(half, (4, 8))[0, 0, 0].item() == 0.5


def test_tokens_read_only_the_features_under_the_mask_on_a_non_square_map() -> None:
    enc = _encoder()
    feats = torch.randn(2, 8, 4, 8)
    masks = torch.zeros(3, 64, 128, dtype=torch.bool)
    masks[0, 0:16, 96:128] = True  # image 0, top right
    masks[1, 48:64, 0:32] = True  # image 1, bottom left
    masks[2, 16:48, 32:64] = True  # image 1, middle
    index = torch.tensor([0, 1, 1])
    out = enc(feats, masks, index)
    assert out.shape == (3, 3, 16)
    outside = feats.clone()
    outside[0, :, :, :6] = torch.randn(8, 4, 6)
    outside[0, :, 1:] = torch.randn(8, 3, 8)
    outside[1, :, 0:1] = torch.randn(8, 1, 8)
    again = enc(outside, masks, index)
    # Nothing under any prompt changed (image 1's row 0 is outside prompts 1 and 2).
    assert torch.allclose(again, out, atol=1e-6)
    middle = feats.clone()
    middle[1, :, 1, 2] += 1.0  # a cell of prompt 2 only
    moved = enc(middle, masks, index)
    assert torch.allclose(moved[:2], out[:2], atol=1e-6) and not torch.allclose(moved[2], out[2])
    inside = feats.clone()
    inside[0, :, 0, 7] += 1.0
    assert not torch.allclose(enc(inside, masks, index)[0], out[0])
    # One prompt per image by default; bad inputs name what is wrong.
    assert torch.allclose(enc(feats, masks[:2]), enc(feats, masks[:2], torch.arange(2)))
    with pytest.raises(ValueError, match="image_index"):
        enc(feats, masks)
    with pytest.raises(ValueError, match="lie in"):
        enc(feats, masks, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="channels"):
        enc(torch.randn(2, 4, 4, 8), masks, index)
    with pytest.raises(ValueError, match="empty"):
        enc(feats, torch.zeros(1, 64, 128, dtype=torch.bool))


def test_flat_features_of_an_hf_binding_match_per_image_maps() -> None:
    enc = _encoder()
    grids = [(1, 4, 6), (1, 6, 4)]  # a landscape and a portrait image
    binding = ImageBinding.from_grids(grids, [1, 1], vrt_base=100)
    flat = torch.randn(binding.total_patches, 8)
    maps = [flat[:24].T.reshape(8, 4, 6), flat[24:].T.reshape(8, 6, 4)]
    m0 = torch.zeros(64, 96, dtype=torch.bool)
    m0[0:16, 64:96] = True  # image 0 (4 x 6 cells of 16 px): top-right two cells
    m1 = torch.zeros(96, 64, dtype=torch.bool)
    m1[80:96, 0:16] = True  # image 1 (6 x 4 cells): bottom-left cell
    maps_p, padding = binding.feature_maps(flat)
    assert maps_p.shape == (2, 8, 6, 6)
    # Each image's mask (its own size) lands on its own (h_i, w_i) block of the padded map.
    alone = torch.cat([enc(maps[0][None], m0[None]), enc(maps[1][None], m1[None])])
    both = enc.forward_flat(flat, binding, [m0, m1], torch.tensor([0, 1]))
    assert torch.allclose(both, alone, atol=1e-5)
    # Without the padding the portrait mask would spread over the 6 x 6 map: a different token.
    wrong = enc(maps_p[1:], m1[None])
    assert not torch.allclose(wrong, alone[1:], atol=1e-3)


def test_splice_replaces_exactly_the_vpt_rows() -> None:
    vpt = 7
    ids = torch.tensor([[1, vpt, vpt, 2, 0], [vpt, vpt, vpt, vpt, 3]])
    emb = torch.randn(2, 5, 4, requires_grad=True)
    tokens = torch.randn(3, 2, 4, requires_grad=True)
    out = splice_prompt_tokens(emb, ids, tokens, vpt_id=vpt, prompt_sample=torch.tensor([0, 1, 1]))
    assert torch.equal(out[0, 1:3], tokens[0].detach())
    assert torch.equal(out[1, :2], tokens[1].detach()) and torch.equal(out[1, 2:4], tokens[2])
    keep = ids != vpt
    assert torch.equal(out[keep], emb[keep].detach())
    out.sum().backward()
    assert torch.equal(tokens.grad, torch.ones_like(tokens))
    assert torch.equal(emb.grad, keep[..., None].float().expand(2, 5, 4))
    with pytest.raises(ValueError, match="6 \\[VPT\\] tokens for 2 prompts"):
        splice_prompt_tokens(emb, ids, tokens[:2], vpt_id=vpt)
    with pytest.raises(ValueError, match="per row"):
        splice_prompt_tokens(emb, ids, tokens, vpt_id=vpt, prompt_sample=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="prompt_tokens"):
        splice_prompt_tokens(emb, ids, torch.randn(3, 2, 5), vpt_id=vpt)
    assert expand_vpt(f"Describe {VPT} and {VPT}.", 2) == f"Describe {VPT * 2} and {VPT * 2}."


def test_encoder_trains_and_rejects_bad_settings() -> None:
    enc = VisualPromptEncoder(in_dim=8, out_dim=16, num_tokens=2, num_heads=2)
    feats = torch.randn(1, 8, 4, 4, requires_grad=True)
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, :8, :8] = True
    # A random projection: the plain sum of LayerNorm outputs has no gradient.
    (enc(feats, mask) * torch.randn(1, 2, 16)).sum().backward()
    assert enc.queries.grad is not None and feats.grad is not None
    # Only the covered cell gets a gradient.
    g = feats.grad.abs().sum(1)[0]
    assert g[0, 0] > 0 and float(g.sum() - g[0, 0]) == 0.0
    with pytest.raises(ValueError, match="divide"):
        VisualPromptEncoder(in_dim=8, out_dim=10, num_heads=4)
    with pytest.raises(ValueError, match="num_tokens"):
        VisualPromptEncoder(in_dim=8, out_dim=16, num_tokens=0)
