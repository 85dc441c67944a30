"""The reference VLM: offline tokenizer, builders, teacher-forced forward, constrained
generation, light heads, and checkpoint round trips."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from trp.data import ShapesDataset
from trp.grammar import IMAGE, REF, TRP_SPECIAL_TOKENS, encode_text, vrt_base_of
from trp.heads import masks_to_boxes
from trp.losses import box_region_loss
from trp.models import (
    ConvStem,
    LightBoxHead,
    LightMaskHead,
    StemDownsample,
    build_head,
    build_vlm,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from trp.models.light_heads import box_prior_coefficients, coordinate_channels
from trp.recipes import ReferringCollator, load_checkpoint, save_checkpoint
from trp.recipes.data import IndexedDataset, corpus

MODEL_CFG = {
    "image_size": 64,
    "patch_size": 16,
    "prototype_rank": 8,
    "vision": {
        "name": "vit_tiny_patch16_224",
        "embed_dim": 48,
        "depth": 1,
        "num_heads": 2,
        "weights": None,
    },
    "language": {
        "pretrained_dir": None,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 2,
    },
    "tokenizer": {"dir": None, "vocab_size": 400},
    "heads": {
        "box": {
            "impl": "light",
            "d_model": 32,
            "n_heads": 2,
            "dim_feedforward": 64,
            "num_layers": 1,
        },
        "mask": {
            "impl": "light",
            "d_model": 32,
            "n_heads": 2,
            "dim_feedforward": 64,
            "num_layers": 1,
            "mask_dim": 8,
        },
    },
}


# A light head small enough for unit tests (queries of width 16, 24-channel features).
TINY_HEAD = {
    "in_dim": 16,
    "in_channels": [24],
    "d_model": 32,
    "n_heads": 2,
    "dim_feedforward": 32,
    "num_layers": 1,
}


@cache
def _dataset() -> IndexedDataset:
    return IndexedDataset(ShapesDataset(num_samples=64, seed=3, image_size=64, task="rec"))


@cache
def _tokenizer():
    return train_tokenizer(corpus(_dataset(), num_samples=40), vocab_size=400)


def _model():
    torch.manual_seed(0)
    return build_vlm(MODEL_CFG, tokenizer=_tokenizer()).eval()


def _batch(model, *, with_answers: bool, target: str = "vrt", n: int = 4) -> dict:
    collate = ReferringCollator(
        tokenizer=model.tokenizer,
        grid=model.grid,
        image_size=model.image_size,
        target=target,
        with_answers=with_answers,
    )
    return collate([_dataset()[i] for i in range(n)])


def test_tokenizer_is_trained_offline_with_trp_tokens(tmp_path) -> None:
    tok = _tokenizer()
    vocab = tok.get_vocab()
    for t in (*TRP_SPECIAL_TOKENS, IMAGE, "<|im_start|>", "<|im_end|>"):
        assert t in vocab
    assert vrt_base_of(tok) == len(tok)
    ids = encode_text(tok, "<Phrase>red circle</Phrase>(<Unit>box</Unit><|VRT_3|>).")
    assert len(tok) + 3 in ids
    assert (
        tok.decode([i for i in ids if i < len(tok)])
        == "<Phrase>red circle</Phrase>(<Unit>box</Unit>)."
    )
    again = load_tokenizer(save_tokenizer(tok, tmp_path / "tok"))
    assert again.get_vocab() == vocab
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b"], vocab_size=10)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_forward_gathers_one_query_run_per_target() -> None:
    model = _model()
    batch = _batch(model, with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    b, length = batch["input_ids"].shape
    assert out["hidden"].shape == (b, length, 48)
    assert out["prototypes"].shape == (b * 16, 48)
    targets = out["targets"]
    assert sorted(targets.sample.tolist()) == list(range(b))
    assert set(targets.units) <= {"box", "mask"}
    # One query per VRT of each run.
    runs = [len(p.triplets[0].targets[0].patches) for p in batch["parses"]]
    assert targets.queries.shape == (sum(runs), 48)
    assert out["heads"]["box"]["boxes"].shape == (b, 4)
    assert out["heads"]["mask"]["masks"].shape == (b, 16, 16)
    logits = model.logits(out["hidden"], out["vrt_rows"], out["binding"])
    assert logits.shape == (b, length, model.vrt_base + 16)


def test_ref_targets_query_the_ref_token_state() -> None:
    model = _model()
    batch = _batch(model, with_answers=True, target="ref")
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    ref = model.tokenizer.convert_tokens_to_ids(REF)
    rows, cols = (batch["input_ids"] == ref).nonzero(as_tuple=True)
    assert rows.tolist() == list(range(4))  # one <REF> per sample
    sample = out["targets"].sample
    assert torch.equal(out["targets"].queries, out["hidden"][sample, cols[sample]])
    assert not out["targets"].is_vrt.any()


def test_image_placeholders_must_cover_the_grid() -> None:
    model = _model()
    batch = _batch(model, with_answers=True)
    fmap, patches, protos = model.encode_images(batch["images"])
    ids = batch["input_ids"].clone()
    ids[0, ids[0].tolist().index(model.image_id)] = model.pad_id
    with pytest.raises(ValueError, match="16 <image> tokens"):
        model.embed_inputs(ids, patches, protos, model.binding(ids.shape[0]))
    with pytest.raises(ValueError, match="images must be"):
        model.encode_images(torch.zeros(1, 3, 32, 32))


def test_constrained_generation_always_parses() -> None:
    model = _model()
    batch = _batch(model, with_answers=False, n=3)
    gen, out = model.generate(
        batch["images"], batch["input_ids"], batch["attention_mask"], max_new_tokens=16
    )
    assert all(p is not None for p in gen.parses)
    assert gen.ids.shape[0] == 3
    assert gen.ids.shape[1] <= 16
    n = len(out["targets"])
    assert out["heads"]["box"]["boxes"].shape == (n, 4)


def test_generation_with_a_forced_phrase_grounds_the_given_phrase() -> None:
    model = _model()
    batch = _batch(model, with_answers=False, n=3)
    prefixes = batch["answer_prefix"]
    # The prefix is how a training answer starts, up to and including </Unit>.
    collate = ReferringCollator(
        tokenizer=model.tokenizer, grid=model.grid, image_size=model.image_size
    )
    answers = collate([_dataset()[i] for i in range(3)])
    for row, prefix in enumerate(prefixes):
        labels = answers["labels"][row]
        answer = labels[labels != -100].tolist()
        assert answer[: len(prefix)] == prefix
    gen, out = model.generate(
        batch["images"],
        batch["input_ids"],
        batch["attention_mask"],
        max_new_tokens=24,
        forced_prefix=prefixes,
    )
    for row, prefix in enumerate(prefixes):
        assert gen.ids[row, : len(prefix)].tolist() == prefix
        assert gen.parses[row] is not None
        assert gen.parses[row].triplets[0].concept == batch["expressions"][row]
    with pytest.raises(ValueError, match="one token list per sample"):
        model.generate(
            batch["images"], batch["input_ids"], batch["attention_mask"], forced_prefix=prefixes[:2]
        )
    with pytest.raises(ValueError, match="leaves no room"):
        model.generate(
            batch["images"],
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens=4,
            forced_prefix=prefixes,
        )


def test_light_heads_shapes_and_empty_queries() -> None:
    feats = [torch.randn(2, 24, 4, 4)]
    box = LightBoxHead(
        in_dim=16, in_channels=[24], d_model=32, n_heads=2, dim_feedforward=32, num_layers=1
    )
    mask = LightMaskHead(**TINY_HEAD, mask_dim=8)
    q = torch.randn(5, 16)
    image = torch.tensor([0, 0, 1, 1, 1])
    obj = torch.tensor([0, 0, 1, 2, 2])
    b = box(q, feats, image, object_index=obj, image_size=(64, 64))
    assert b["boxes"].shape == (3, 4)
    assert ((b["boxes"] > 0) & (b["boxes"] < 1)).all()
    assert b["image_index"].tolist() == [0, 1, 1]
    m = mask(q, feats, image, object_index=obj, image_size=(64, 64))
    assert m["masks"].shape == (3, 16, 16)
    # 8 learned channels + the 5 coordinate channels of the box prior.
    assert m["pixel_features"].shape == (2, 13, 16, 16)
    empty = box(q[:0], feats, image[:0], image_size=(64, 64))
    assert empty["boxes"].shape == (0, 4)
    with pytest.raises(IndexError):
        box(q, feats, image + 5)


def test_build_head_rejects_unknown_units_and_impls() -> None:
    with pytest.raises(ValueError, match="no head for unit"):
        build_head("points", {"impl": "light"}, in_dim=8, in_channels=[8])
    with pytest.raises(ValueError, match="unknown box head impl"):
        build_head("box", {"impl": "magic"}, in_dim=8, in_channels=[8])
    # The light head's settings on another impl: named, not a TypeError from inside it.
    with pytest.raises(ValueError, match=r"BoxHead \('deformable'\) takes no \['extent_scale'"):
        build_head(
            "box",
            {"impl": "deformable", "extent_scale": 4, "region": True},
            in_dim=8,
            in_channels=[8],
        )


def test_checkpoint_round_trip_is_exact(tmp_path) -> None:
    model = _model()
    cfg = OmegaConf.create({"model": MODEL_CFG, "recipe": {"name": "t", "target": "vrt"}})
    save_checkpoint(model, cfg, tmp_path / "ck")
    again, saved = load_checkpoint(tmp_path / "ck")
    assert saved.recipe.name == "t"
    batch = _batch(model, with_answers=True)
    args = (batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    with torch.no_grad():
        a, b = model(*args), again(*args)
    assert torch.equal(a["hidden"], b["hidden"])
    assert torch.equal(a["heads"]["box"]["boxes"], b["heads"]["box"]["boxes"])
    assert torch.equal(a["heads"]["mask"]["masks"], b["heads"]["mask"]["masks"])


def test_trp_heads_plug_in_through_the_config() -> None:
    cfg = {
        **MODEL_CFG,
        "heads": {
            "box": {
                "impl": "deformable",
                "d_model": 32,
                "n_heads": 2,
                "n_points": 2,
                "dim_feedforward": 64,
                "num_layers": 2,
            },
            "mask": {
                "impl": "two_way",
                "d_model": 32,
                "n_heads": 2,
                "num_blocks": 1,
                "mlp_dim": 64,
                "mask_dim": 8,
            },
        },
    }
    torch.manual_seed(0)
    model = build_vlm(cfg, tokenizer=_tokenizer())
    batch = _batch(model, with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    box, mask = out["heads"]["box"], out["heads"]["mask"]
    assert box["boxes"].shape == (4, 4)
    assert len(box["aux"]) == 1  # iterative refinement: one earlier layer
    assert mask["masks"].shape == (4, 16, 16)
    (box["boxes"].sum() + mask["masks"].mean()).backward()
    assert model.language.get_input_embeddings().weight.grad is not None


@pytest.mark.parametrize("shift", [0, 1])
def test_vrt_queries_are_the_emitting_or_own_states(shift: int) -> None:
    model = build_vlm({**MODEL_CFG, "vrt_query_shift": shift}, tokenizer=_tokenizer()).eval()
    batch = _batch(model, with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    targets = out["targets"]
    expected = []
    for s in targets.sample.tolist():
        cols = (batch["input_ids"][s] >= model.vrt_base).nonzero().flatten() - shift
        expected.append(out["hidden"][s, cols])
    assert torch.equal(targets.queries, torch.cat(expected))
    with pytest.raises(ValueError, match="vrt_query_shift"):
        build_vlm({**MODEL_CFG, "vrt_query_shift": 2}, tokenizer=_tokenizer())


def test_light_box_head_starts_at_the_reference_boxes() -> None:
    feats = [torch.randn(2, 24, 4, 4)]
    box = LightBoxHead(
        in_dim=16, in_channels=[24], d_model=32, n_heads=2, dim_feedforward=32, num_layers=1
    )
    q = torch.randn(3, 16)
    image = torch.tensor([0, 1, 1])
    ref = torch.tensor([[0.3, 0.4, 0.2, 0.1], [float("nan")] * 4, [0.7, 0.6, 0.5, 0.3]])
    out = box(q, feats, image, reference_boxes=ref)
    # The refinement starts at zero: given rows are the references, the NaN row a guess.
    torch.testing.assert_close(out["boxes"][[0, 2]], ref[[0, 2]], atol=1e-5, rtol=0)
    assert out["boxes"][1].isfinite().all()
    out["boxes"][1].sum().backward()
    assert box.init_box.layers[0].weight.grad.abs().sum() > 0  # the guess trains
    with pytest.raises(ValueError, match="reference_boxes"):
        box(q, feats, image, reference_boxes=ref[:2])


def test_light_mask_head_box_prior_peaks_inside_the_reference() -> None:
    torch.manual_seed(0)
    feats = [torch.zeros(1, 24, 4, 4)]
    mask = LightMaskHead(
        in_dim=16, in_channels=[24], d_model=32, n_heads=2, dim_feedforward=32, num_layers=1
    )
    ref = torch.tensor([[0.25, 0.25, 0.25, 0.25], [float("nan")] * 4])
    q = torch.randn(2, 16)
    with torch.no_grad():
        for p in mask.readout.embed.parameters():
            p.zero_()  # only the prior is left
        out = mask(q, feats, torch.tensor([0, 0]), image_size=(64, 64), reference_boxes=ref)
    m = out["masks"]  # 2 x 16 x 16
    assert m[0, 4, 4] == m[0].max() and m[0, 4, 4] > 1.5 and m[0, 14, 14] < -10
    assert m[1].abs().max() == 0  # no reference, no prior
    # The same logits come out of mask_embed . pixel_features (what the point loss samples).
    again = torch.einsum("nc,chw->nhw", out["mask_embed"], out["pixel_features"][0])
    torch.testing.assert_close(again, m, atol=1e-4, rtol=1e-5)


def test_box_prior_coefficients_match_the_quadratic() -> None:
    coords = coordinate_channels(8, 8)
    ref = torch.tensor([[0.5, 0.25, 0.5, 0.25]])
    coeffs = box_prior_coefficients(ref, torch.tensor([3.0]), torch.tensor([1.0]), (0.1, 0.0))
    got = torch.einsum("nc,chw->nhw", coeffs, coords)[0]
    x, y = coords[1], coords[3]
    want = 1.0 - 3.0 * ((x - 0.5) ** 2 / 0.35**2 + (y - 0.25) ** 2 / 0.125**2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_reference_boxes_surround_the_named_patches() -> None:
    model = _model()  # 64 x 64 images, a 4 x 4 patch grid
    batch = _batch(model, with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    targets = out["targets"]
    for q, s in enumerate(targets.sample.tolist()):
        patches = batch["parses"][s].triplets[0].targets[0].patches  # one connected object
        rows = torch.tensor([p // 4 for p in patches], dtype=torch.float32)
        cols = torch.tensor([p % 4 for p in patches], dtype=torch.float32)
        x0, x1 = cols.min() / 4, (cols.max() + 1) / 4
        y0, y1 = rows.min() / 4, (rows.max() + 1) / 4
        want = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
        torch.testing.assert_close(targets.reference_boxes[q], want)
    # <REF> targets name no patch: no reference.
    ref_batch = _batch(model, with_answers=True, target="ref")
    ref_out = model(
        ref_batch["images"],
        ref_batch["input_ids"],
        ref_batch["attention_mask"],
        ref_batch["parses"],
    )
    assert ref_out["targets"].reference_boxes.isnan().all()


def test_reference_box_ignores_a_stray_vrt() -> None:
    model = _model()  # 4 x 4 grid
    base = model.vrt_base
    # Run: patches 5, 6 (row 1, cols 1-2), a stray 12 (row 3, col 0), then 10 (row 2, col 2).
    ids = torch.tensor([[7, base + 5, base + 6, base + 12, base + 10, 7]])
    boxes = model.vrt_reference_boxes(
        ids, torch.tensor([0, 0]), torch.tensor([[1, 2, 3, 4], [0, 5, -1, -1]])
    )
    torch.testing.assert_close(boxes[0], torch.tensor([0.5, 0.5, 0.5, 0.5]))
    assert boxes[1].isnan().all()  # no VRT among its tokens


def test_conv_stem_is_stride_four_and_checks_its_input() -> None:
    stem = ConvStem(6)
    assert stem(torch.randn(2, 3, 32, 48)).shape == (2, 6, 8, 12)
    with pytest.raises(ValueError, match="divisible by 4"):
        stem(torch.randn(2, 3, 30, 32))
    with pytest.raises(ValueError, match="channels"):
        ConvStem(0)


def test_conv_stem_cells_are_centred_on_their_pixel_blocks() -> None:
    # The receptive field of the two convolutions of cell (j, j) is centred on pixel 4j + 1.5,
    # the centre of the 4 x 4 block the cell stands for.
    stem = ConvStem(2)
    convs = [m for m in stem.layers if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:
            conv.weight.fill_(1.0)
            conv.bias.zero_()
    image = torch.zeros(1, 3, 32, 32, requires_grad=True)
    out = convs[1](convs[0](image))
    for j in (2, 3, 5):
        (grad,) = torch.autograd.grad(out[0, 0, j, j], image, retain_graph=True)
        weight = grad[0, 0]
        coords = torch.arange(32, dtype=torch.float32)
        cy = float((weight.sum(1) * coords).sum() / weight.sum())
        cx = float((weight.sum(0) * coords).sum() / weight.sum())
        assert cy == pytest.approx(4 * j + 1.5) and cx == pytest.approx(4 * j + 1.5)


def test_stem_downsample_continues_the_shared_stem_to_the_patch_grid() -> None:
    stem = ConvStem(6)
    down = StemDownsample(stem, 2)
    assert down.stride == 16 and down.num_features == 24
    assert down.stem is stem
    assert down(torch.randn(2, 3, 32, 48)).shape == (2, 24, 2, 3)
    with pytest.raises(ValueError, match="divisible by 16"):
        down(torch.randn(2, 3, 24, 32))
    with pytest.raises(ValueError, match="depth"):
        StemDownsample(stem, 0)
    vision = {**MODEL_CFG["vision"], "conv_stem": True, "stem_downsample": 2}
    torch.manual_seed(0)
    model = build_vlm({**MODEL_CFG, "fine_channels": 4, "vision": vision}, tokenizer=_tokenizer())
    embed = model.vision.patch_embed
    assert embed.backbone.stem is model.fine_stem
    assert embed.proj.kernel_size == (1, 1)  # the blocks reach the 16-pixel grid themselves
    batch = _batch(model, with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    out["hidden"].sum().backward()
    assert model.fine_stem.layers[0].weight.grad.abs().sum() > 0
    no_stem = {**MODEL_CFG, "fine_channels": 4, "vision": {**vision, "conv_stem": False}}
    with pytest.raises(ValueError, match="stem_downsample"):
        build_vlm(no_stem, tokenizer=_tokenizer())
    deep = {**MODEL_CFG, "fine_channels": 4, "vision": {**vision, "stem_downsample": 3}}
    with pytest.raises(ValueError, match="divisible by the stem stride 32"):
        build_vlm(deep, tokenizer=_tokenizer())


def test_light_box_head_reads_its_box_off_the_region_map() -> None:
    torch.manual_seed(0)
    feats = [torch.randn(2, 24, 4, 4)]
    fine = torch.randn(2, 4, 16, 16)
    box = LightBoxHead(**TINY_HEAD, region=True, mask_dim=8, fine_channels=4)
    q = torch.randn(3, 16)
    image = torch.tensor([0, 1, 1])
    ref = torch.tensor([[0.3, 0.4, 0.2, 0.1], [float("nan")] * 4, [0.7, 0.6, 0.5, 0.3]])
    out = box(q, feats, image, image_size=(64, 64), reference_boxes=ref, fine_features=fine)
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
    assert box.region.fine.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="fine_features"):
        box(q, feats, image, image_size=(64, 64))


def test_light_box_head_extent_scale_reads_edges_between_cells() -> None:
    torch.manual_seed(0)
    feats = [torch.randn(2, 24, 4, 4)]
    fine = torch.randn(2, 4, 16, 16)
    box = LightBoxHead(**TINY_HEAD, region=True, mask_dim=8, fine_channels=4, extent_scale=4)
    q = torch.randn(3, 16)
    image = torch.tensor([0, 1, 1])
    out = box(q, feats, image, image_size=(64, 64), fine_features=fine)
    region = out["region_logits"].detach()
    # The zero-initialised refinement keeps the extent of the 4x upsampled logit map.
    up = F.interpolate(region[:, None], size=(64, 64), mode="bilinear", align_corners=False)
    extent = masks_to_boxes(up[:, 0] > 0)
    found = extent[:, 2] > 0
    assert found.any()
    torch.testing.assert_close(out["boxes"][found], extent[found], atol=1e-4, rtol=0)
    # A 1D step in logits between two cells: the upsampled zero crossing lies between them.
    logits = torch.full((1, 4, 4), -1.0)
    logits[0, :, 2:] = 3.0  # the crossing sits a quarter of the way from cell 1 to cell 2
    coarse = masks_to_boxes(logits > 0)
    fine_ext = masks_to_boxes(
        F.interpolate(logits[:, None], scale_factor=4, mode="bilinear")[:, 0] > 0
    )
    x0_coarse = float(coarse[0, 0] - coarse[0, 2] / 2) * 4
    x0_fine = float(fine_ext[0, 0] - fine_ext[0, 2] / 2) * 4
    assert x0_coarse == 2.0 and 1.5 < x0_fine < 2.0
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="extent_scale"):
            LightBoxHead(**TINY_HEAD, region=True, extent_scale=bad)


def test_conv_stem_runs_once_per_forward() -> None:
    cfg = {**MODEL_CFG, "fine_channels": 4, "vision": {**MODEL_CFG["vision"], "conv_stem": True}}
    torch.manual_seed(0)
    model = build_vlm(cfg, tokenizer=_tokenizer()).eval()
    calls = []
    model.fine_stem.register_forward_hook(lambda *_: calls.append(1))
    batch = _batch(model, with_answers=True)
    with torch.no_grad():
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    assert len(calls) == 1
    # The heads got the stem's map of these images: decoding again with a fresh stem run
    # gives the same outputs.
    fmap, fine = out["fmap"], model.fine_features(batch["images"])
    with torch.no_grad():
        again = model.decode_targets(out["targets"], fmap, fine=fine)
    torch.testing.assert_close(again["mask"]["masks"], out["heads"]["mask"]["masks"])
    # Without the conv-stem ViT the stem still runs (once) for the heads.
    plain = build_vlm({**cfg, "vision": MODEL_CFG["vision"]}, tokenizer=_tokenizer()).eval()
    calls.clear()
    plain.fine_stem.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        plain(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    assert len(calls) == 1


def test_vlm_with_fine_stem_feeds_the_heads_and_region_losses_train() -> None:
    from trp.recipes.module import ReferringModule

    cfg = {**MODEL_CFG, "fine_channels": 4}
    cfg["heads"] = {**MODEL_CFG["heads"], "box": {**MODEL_CFG["heads"]["box"], "region": True}}
    torch.manual_seed(0)
    model = build_vlm(cfg, tokenizer=_tokenizer())
    assert isinstance(model.fine_stem, ConvStem)
    batch = _batch(model, with_answers=True)
    weights = {
        "token": 1,
        "box_l1": 5,
        "box_giou": 2,
        "box_score": 1,
        "box_region": 3,
        "mask_ce": 5,
        "mask_dice": 5,
        "mask_points": 64,
    }
    module = ReferringModule(
        model=model, optim={"lr": 1e-3}, loss=weights, eval={"max_new_tokens": 8}
    )
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    assert out["heads"]["box"]["region_logits"].shape == (len(out["targets"]), 16, 16)
    losses = module.head_losses(out["heads"], out["targets"], batch)
    assert {"box/loss_region_ce", "box/loss_region_dice"} <= set(losses)
    # box_region_target: mask trains the region map on the objects' masks at 1/4 size.
    on_masks = ReferringModule(
        model=model,
        optim={"lr": 1e-3},
        loss={**weights, "box_region_target": "mask"},
        eval={"max_new_tokens": 8},
    ).head_losses(out["heads"], out["targets"], batch)
    sample = out["targets"].sample
    want = box_region_loss(
        out["heads"]["box"]["region_logits"],
        batch["boxes"][sample],
        masks=batch["masks_small"][sample],
    )
    torch.testing.assert_close(on_masks["box/loss_region_dice"], 3 * want["loss_region_dice"])
    assert not torch.allclose(on_masks["box/loss_region_ce"], losses["box/loss_region_ce"])
    sum(losses.values()).backward()
    assert model.fine_stem.layers[0].weight.grad.abs().sum() > 0


def test_conv_stem_vit_shares_the_fine_stem_and_round_trips(tmp_path) -> None:
    cfg = {**MODEL_CFG, "fine_channels": 4, "vision": {**MODEL_CFG["vision"], "conv_stem": True}}
    torch.manual_seed(0)
    model = build_vlm(cfg, tokenizer=_tokenizer()).eval()
    assert model.vision.patch_embed.backbone is model.fine_stem
    batch = _batch(model, with_answers=True)
    args = (batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    save_checkpoint(model, OmegaConf.create({"model": cfg, "recipe": {"name": "t"}}), tmp_path)
    again, _ = load_checkpoint(tmp_path)
    assert again.vision.patch_embed.backbone is again.fine_stem
    with torch.no_grad():
        a, b = model(*args), again(*args)
    assert torch.equal(a["hidden"], b["hidden"])
    assert torch.equal(a["heads"]["mask"]["masks"], b["heads"]["mask"]["masks"])
    with pytest.raises(ValueError, match="conv_stem"):
        build_vlm({**cfg, "fine_channels": 0}, tokenizer=_tokenizer())


def test_detached_queries_keep_head_losses_out_of_the_lm() -> None:
    torch.manual_seed(0)
    model = build_vlm({**MODEL_CFG, "detach_queries": True}, tokenizer=_tokenizer())
    batch = _batch(model, with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    (out["heads"]["box"]["boxes"].sum() + out["heads"]["mask"]["masks"].mean()).backward()
    lm_grads = [p.grad for p in model.language.model.layers.parameters()]
    assert all(g is None or not g.any() for g in lm_grads)
    assert model.vision.patch_embed.proj.weight.grad.abs().sum() > 0  # through the feature map


def test_contextual_vrt_rows_read_the_lm_states_at_the_patches() -> None:
    torch.manual_seed(0)
    model = build_vlm({**MODEL_CFG, "contextual_vrt": True}, tokenizer=_tokenizer())
    assert _model().vrt_context is None
    batch = _batch(model, with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    assert torch.equal(out["vrt_rows"], out["prototypes"])  # zero-initialised context
    with torch.no_grad():
        model.vrt_context.proj.weight.normal_()
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    is_image = batch["input_ids"] == model.image_id
    want = model.vrt_context(out["prototypes"], out["hidden"][is_image])
    torch.testing.assert_close(out["vrt_rows"], want)
    # A patch's row changes with what the LM read before the image (here: its first token).
    ids = batch["input_ids"].clone()
    ids[0, 0] = model.pad_id
    again = model(batch["images"], ids, batch["attention_mask"], batch["parses"])
    assert not torch.allclose(again["vrt_rows"][:16], out["vrt_rows"][:16])
    torch.testing.assert_close(again["vrt_rows"][16:], out["vrt_rows"][16:])
    # Generation scores VRTs against the same rows: its answers still parse.
    model.eval()
    prompts = _batch(model, with_answers=False, n=3)
    gen, _ = model.generate(
        prompts["images"], prompts["input_ids"], prompts["attention_mask"], max_new_tokens=16
    )
    assert all(p is not None for p in gen.parses)
    with pytest.raises(ValueError, match="contextual VRT rows need 16 <image> tokens"):
        model.vrt_rows(out["hidden"], ids.masked_fill(is_image, model.pad_id), out["prototypes"])
