"""The reference VLM host: offline tokenizer, the convolutional stem (stride 4, centred cells,
shared with the ViT, run once per forward) and config validation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.test_models_trp import MODEL_CFG, _batch, _model, _tokenizer
from trp.grammar import IMAGE, TRP_SPECIAL_TOKENS, encode_text, vrt_base_of
from trp.models import (
    ConvStem,
    ReferenceVLMConfig,
    StemDownsample,
    build_model,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)


def test_tokenizer_is_trained_offline_with_trp_tokens(tmp_path) -> None:
    tok = _tokenizer()
    vocab = tok.get_vocab()
    for t in (*TRP_SPECIAL_TOKENS, IMAGE, "<|im_start|>", "<|im_end|>"):
        assert t in vocab
    assert vrt_base_of(tok) == len(tok)
    ids = encode_text(tok, "<Phrase>red circle</Phrase>(<Unit>box</Unit><|VRT_3|>).")
    assert len(tok) + 3 in ids
    again = load_tokenizer(save_tokenizer(tok, tmp_path / "tok"))
    assert again.get_vocab() == vocab
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b"], vocab_size=10)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("kind", ["patchify", "strided"])
def test_conv_stem_is_stride_four_and_checks_its_input(kind) -> None:
    stem = ConvStem(6, kind=kind)
    assert stem.kind == kind
    assert stem(torch.randn(2, 3, 32, 48)).shape == (2, 6, 8, 12)
    with pytest.raises(ValueError, match="divisible by 4"):
        stem(torch.randn(2, 3, 30, 32))
    with pytest.raises(ValueError, match="channels"):
        ConvStem(0, kind=kind)


def test_conv_stem_kinds_and_the_saved_configs_default() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        ConvStem(4, kind="3x3")
    first = [m for m in ConvStem(4).layers if isinstance(m, torch.nn.Conv2d)][0]
    assert first.stride == (4, 4)  # patchify is the default form
    text = {"hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}
    # A config saved before fine_stem existed has the strided stem it was trained with.
    assert ReferenceVLMConfig(text_config=text, fine_channels=4).fine_stem == "strided"
    with pytest.raises(ValueError, match="fine_stem"):
        ReferenceVLMConfig(text_config=text, fine_channels=4, fine_stem="3x3")
    model = build_model({**MODEL_CFG, "fine_channels": 4}, tokenizer=_tokenizer())
    assert model.vlm.config.fine_stem == "patchify" and model.vlm.fine_stem.kind == "patchify"


@pytest.mark.parametrize("kind", ["patchify", "strided"])
def test_conv_stem_cells_are_centred_on_their_pixel_blocks(kind) -> None:
    # The receptive field of the two convolutions of cell (j, j) is centred on pixel 4j + 1.5,
    # the centre of the 4 x 4 block the cell stands for.
    stem = ConvStem(2, kind=kind)
    convs = [m for m in stem.layers if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:
            conv.weight.fill_(1.0)
            conv.bias.zero_()
    image = torch.zeros(1, 3, 32, 32, requires_grad=True)
    out = convs[1](convs[0](image))
    coords = torch.arange(32, dtype=torch.float32)
    for j in (2, 3, 5):
        (grad,) = torch.autograd.grad(out[0, 0, j, j], image, retain_graph=True)
        weight = grad[0, 0]
        cy = float((weight.sum(1) * coords).sum() / weight.sum())
        cx = float((weight.sum(0) * coords).sum() / weight.sum())
        assert cy == pytest.approx(4 * j + 1.5) and cx == pytest.approx(4 * j + 1.5)


def test_the_stem_runs_once_and_feeds_both_the_vit_and_the_heads() -> None:
    model = _model().train()
    calls = []
    model.vlm.fine_stem.register_forward_hook(lambda *_: calls.append(1))
    batch = _batch(with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    assert len(calls) == 1
    assert out.images.fine.shape == (4, 8, 16, 16)
    out.hidden.sum().backward()
    assert model.vlm.fine_stem.layers[0].weight.grad.abs().sum() > 0


def test_stem_downsample_continues_the_shared_stem_to_the_patch_grid() -> None:
    stem = ConvStem(6)
    down = StemDownsample(stem, 2)
    assert down.stride == 16 and down.num_features == 24
    assert down.stem is stem
    assert down(torch.randn(2, 3, 32, 48)).shape == (2, 24, 2, 3)
    with pytest.raises(ValueError, match="depth"):
        StemDownsample(stem, 0)
    vision = {**MODEL_CFG["vision"], "conv_stem": True, "stem_downsample": 2}
    model = build_model({**MODEL_CFG, "fine_channels": 4, "vision": vision}, tokenizer=_tokenizer())
    assert model.vlm.vit_stem.stem is model.vlm.fine_stem
    assert model.vlm.vision.patch_embed.proj.kernel_size == (1, 1)
    batch = _batch(with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    assert out.hidden.shape[:2] == batch["input_ids"].shape


def test_reference_config_rejects_bad_values() -> None:
    text = {"hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}
    vit = {k: v for k, v in MODEL_CFG["vision"].items() if k != "weights"}
    with pytest.raises(ValueError, match="unknown keys"):
        ReferenceVLMConfig(vision={"name": "vit_tiny_patch16_224", "colour": 1}, text_config=text)
    with pytest.raises(ValueError, match="conv_stem needs a stem"):
        ReferenceVLMConfig(vision={**vit, "conv_stem": True}, text_config=text)
    with pytest.raises(ValueError, match="divisible"):
        ReferenceVLMConfig(image_size=60, patch_size=16, text_config=text)
    with pytest.raises(ValueError, match="stem_downsample"):
        ReferenceVLMConfig(
            vision={**vit, "conv_stem": False, "stem_downsample": 1},
            text_config=text,
            fine_channels=4,
        )


def test_vision_weights_load_strictly(tmp_path) -> None:
    from safetensors.torch import save_file

    model = _model()
    state = {k: v.contiguous() for k, v in model.vlm.vision.state_dict().items()}
    save_file(state, tmp_path / "vit.safetensors")
    vision = {**MODEL_CFG["vision"], "weights": str(tmp_path / "vit.safetensors")}
    again = build_model({**MODEL_CFG, "vision": vision}, tokenizer=_tokenizer())
    for k, v in again.vlm.vision.state_dict().items():
        assert torch.equal(v, state[k])
    save_file({"nope": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="missing keys"):
        build_model(
            {**MODEL_CFG, "vision": {**vision, "weights": str(tmp_path / "bad.safetensors")}},
            tokenizer=_tokenizer(),
        )


def test_a_checkpoint_from_before_the_keys_loads_with_its_strided_stem_and_causal_images(
    tmp_path,
) -> None:
    from trp.recipes import load_checkpoint
    from trp.recipes.checkpoint import save_checkpoint

    language = {**MODEL_CFG["language"], "image_attention": "causal"}
    model = build_model(
        {**MODEL_CFG, "fine_channels": 4, "fine_stem": "strided", "language": language},
        tokenizer=_tokenizer(),
    )
    # The recipe config and the host config of a run from before the key: no fine_stem in
    # either (what an older save_pretrained wrote).
    recipe = {"model": {"fine_channels": 4, "language": {"hidden_size": 48}}}
    save_checkpoint(model, recipe, tmp_path / "ckpt")
    host = tmp_path / "ckpt" / "vlm" / "config.json"
    saved = json.loads(host.read_text())
    assert saved.pop("fine_stem") == "strided"
    assert saved.pop("image_attention") == "causal"
    host.write_text(json.dumps(saved))
    again, cfg = load_checkpoint(tmp_path / "ckpt")
    assert again.vlm.fine_stem.kind == "strided" and cfg.model.fine_stem == "strided"
    # ... and with the causal image attention it was trained with
    assert again.vlm.config.image_attention == "causal"
    assert cfg.model.language.image_attention == "causal"


def _image_attention_model(mode: str, attn: str):
    language = {**MODEL_CFG["language"], "image_attention": mode, "attn_implementation": attn}
    return _model(language=language).vlm


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bidirectional_image_attention_lets_every_patch_see_the_whole_image(attn) -> None:
    batch = _batch(with_answers=False, n=2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    states = {}
    for mode in ("causal", "bidirectional"):
        vlm = _image_attention_model(mode, attn)
        assert vlm.config.image_attention == mode
        is_image = ids == vlm.config.image_token_id
        encoding = vlm.encode_images(batch["images"])
        patches = encoding.host_inputs["image_embeds"]
        changed = patches.clone()
        changed[:, -1] += 1.0  # the last patch of every image
        runs = []
        for image_embeds in (patches, changed):
            with torch.no_grad():
                out = vlm(input_ids=ids, attention_mask=mask, image_embeds=image_embeds)
                hidden = vlm.language_states(
                    ids,
                    mask,
                    dataclasses.replace(encoding, host_inputs={"image_embeds": image_embeds}),
                )
            runs.append((out.logits, hidden))
        (logits, hidden), (logits2, hidden2) = runs
        # forward and language_states see the same mask
        torch.testing.assert_close(vlm.get_output_embeddings()(hidden), logits)
        first_patch = is_image.float().argmax(1)
        rows = torch.arange(ids.shape[0])
        moved = (hidden2 - hidden)[rows, first_patch].abs().amax()
        text_before = (~is_image).cumsum(1) == torch.arange(1, ids.shape[1] + 1)
        text_before &= mask.bool()
        states[mode] = moved
        # the text before the image never sees the patches; the text after always does
        assert (hidden2 - hidden)[text_before].abs().amax() == 0
        assert (logits2 - logits)[:, -1].abs().amax() > 0
    assert states["causal"] == 0  # the first patch cannot see the last one
    assert states["bidirectional"] > 1e-4


def test_bidirectional_image_attention_decodes_with_the_cache_as_without() -> None:
    vlm = _image_attention_model("bidirectional", "eager")
    batch = _batch(with_answers=False, n=2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image_embeds = vlm.encode_images(batch["images"]).host_inputs["image_embeds"]
    extra = torch.tensor([[5, 6, 7], [8, 9, 10]])
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    with torch.no_grad():
        whole = vlm(input_ids=full_ids, attention_mask=full_mask, image_embeds=image_embeds)
        step = vlm(input_ids=ids, attention_mask=mask, image_embeds=image_embeds, use_cache=True)
        logits = [step.logits]
        cache = step.cache
        for k in range(extra.shape[1]):
            length = ids.shape[1] + k + 1
            step = vlm(
                input_ids=extra[:, k : k + 1],
                attention_mask=full_mask[:, :length],
                cache=cache,
                use_cache=True,
            )
            logits.append(step.logits)
            cache = step.cache
    real = full_mask.bool()  # left padding's rows attend to nothing and are never read
    torch.testing.assert_close(torch.cat(logits, 1)[real], whole.logits[real], rtol=1e-4, atol=1e-4)
    # placeholders after cached tokens cannot be made bidirectional: refused, not ignored
    with pytest.raises(ValueError, match="first forward call"):
        vlm(
            input_ids=ids,
            attention_mask=torch.cat([full_mask, mask], 1),
            image_embeds=image_embeds,
            cache=cache,
            use_cache=True,
        )


def test_image_attention_is_validated() -> None:
    text = {"hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}
    assert ReferenceVLMConfig(text_config=text).image_attention == "causal"  # saved configs
    with pytest.raises(ValueError, match="image_attention must be one of"):
        ReferenceVLMConfig(text_config=text, image_attention="full")
    with pytest.raises(ValueError, match="image_attention"):
        build_model(
            {**MODEL_CFG, "language": {**MODEL_CFG["language"], "image_attention": "full"}},
            tokenizer=_tokenizer(),
        )
