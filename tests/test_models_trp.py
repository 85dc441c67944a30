"""TRPForConditionalGeneration on the reference host: teacher-forced forward, the token loss,
HF generate (greedy, beams, sampling, forced prefix) with states from the generation itself,
and save_pretrained / from_pretrained in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache

import pytest
import torch
from transformers import PreTrainedModel

from trp.data import ShapesDataset
from trp.grammar import IMAGE, REF
from trp.models import (
    ReferenceVLMForConditionalGeneration,
    TRPForConditionalGeneration,
    build_model,
    shift_positions,
    train_tokenizer,
)
from trp.recipes import ReferringCollator
from trp.recipes.data import IndexedDataset, corpus

MODEL_CFG = {
    "image_size": 64,
    "patch_size": 16,
    "prototype_rank": 8,
    "prototype_zero_init": False,
    "fine_channels": 8,
    "vrt_query_shift": 1,
    # Keys left out take the recipe schema's defaults (contextual VRT rows, detached queries):
    # these tests are of PaDT's prototype rows with queries that train the LM.
    "contextual_vrt": False,
    "detach_queries": False,
    "vision": {
        "name": "vit_tiny_patch16_224",
        "embed_dim": 48,
        "depth": 1,
        "num_heads": 2,
        "weights": None,
        "conv_stem": True,
        "fused_attn": False,
    },
    "language": {
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 2,
        "attn_implementation": "eager",
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


@cache
def _dataset() -> IndexedDataset:
    return IndexedDataset(ShapesDataset(num_samples=64, seed=3, image_size=64, task="rec"))


@cache
def _tokenizer():
    return train_tokenizer(corpus(_dataset(), num_samples=40), vocab_size=400)


def _model(**changes) -> TRPForConditionalGeneration:
    torch.manual_seed(0)
    return build_model({**MODEL_CFG, **changes}, tokenizer=_tokenizer()).eval()


def _batch(*, with_answers: bool, target: str = "vrt", n: int = 4, first: int = 0) -> dict:
    collate = ReferringCollator(
        tokenizer=_tokenizer(),
        grid=(4, 4),
        image_size=(64, 64),
        target=target,
        with_answers=with_answers,
        prompt_first=True,
    )
    return collate([_dataset()[i] for i in range(first, first + n)])


def test_the_host_is_a_hugging_face_model() -> None:
    model = _model()
    assert isinstance(model.vlm, ReferenceVLMForConditionalGeneration)
    assert isinstance(model.vlm, PreTrainedModel)
    with pytest.raises(TypeError, match="not a trp host"):
        TRPForConditionalGeneration(vlm=torch.nn.Linear(2, 2), tokenizer=_tokenizer(), heads={})


def test_forward_routes_one_object_per_run_and_trains() -> None:
    model = _model().train()
    batch = _batch(with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    b, length = batch["input_ids"].shape
    assert out.hidden.shape == (b, length, 48)
    assert out.vrt_rows.shape == (b * 16, 48)
    for unit in ("box", "mask"):
        routed = out.predictions[unit]
        assert sorted(routed.sample.tolist()) == list(range(b))
    assert out.predictions["box"].predictions["boxes"].shape == (b, 4)
    assert out.predictions["mask"].predictions["masks"].shape == (b, 16, 16)
    loss = model.token_loss(out, batch["labels"], batch["objects"])
    assert torch.isfinite(loss.detach()) and float(loss.detach()) > 0
    (loss + out.predictions["box"].predictions["boxes"].sum()).backward()
    assert model.vrt.prototypes.down.weight.grad is not None


def test_wrong_target_positions_raise() -> None:
    model = _model()
    batch = _batch(with_answers=True, target="ref")
    moved = [shift_positions(p, 1) for p in batch["parses"]]
    with pytest.raises(ValueError, match="target token"):
        model(batch["images"], batch["input_ids"], batch["attention_mask"], moved)


def test_image_placeholders_must_cover_the_grid() -> None:
    model = _model()
    batch = _batch(with_answers=True)
    ids = batch["input_ids"].clone()
    image_id = model.tokenizer.convert_tokens_to_ids(IMAGE)
    ids[0, ids[0].tolist().index(image_id)] = model.pad_id
    with pytest.raises(ValueError, match="16 <image> tokens"):
        model(batch["images"], ids, batch["attention_mask"], batch["parses"])
    with pytest.raises(ValueError, match="pixel_values must be"):
        model.vlm.encode_images(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("shift", [0, 1])
def test_generation_states_equal_the_teacher_forced_states(shift: int) -> None:
    """The states the heads read come out of ``generate`` (KV cache, left padding) and equal
    a teacher-forced forward over the generated sequences."""
    model = _model(vrt_query_shift=shift, contextual_vrt=True)
    torch.nn.init.normal_(model.vrt.context.proj.weight, std=0.5)
    batch = _batch(with_answers=False, n=3)
    gen = model.generate(
        batch["images"],
        batch["input_ids"],
        batch["attention_mask"],
        max_new_tokens=12,
        allow_ref=False,
    )
    assert all(p is not None for p in gen.parses), gen.parse_errors
    seq = gen.sequences
    mask = torch.cat(
        [batch["attention_mask"], torch.ones_like(seq[:, batch["input_ids"].shape[1] :])], 1
    )
    out = model(batch["images"], seq, mask, list(gen.parses))
    for unit, routed in gen.predictions.items():
        forced = out.predictions[unit].predictions
        for key in ("boxes", "masks"):
            if key in routed.predictions:
                torch.testing.assert_close(
                    routed.predictions[key], forced[key], atol=2e-4, rtol=2e-4
                )


def test_generate_modes_beams_sampling_and_return_sequences() -> None:
    model = _model()
    batch = _batch(with_answers=False, n=2)
    args = (batch["images"], batch["input_ids"], batch["attention_mask"])
    beams = model.generate(*args, max_new_tokens=12, num_beams=2, allow_ref=False)
    assert beams.sequences.shape[0] == 2 and all(p is not None for p in beams.parses)
    sampled = model.generate(
        *args, max_new_tokens=12, do_sample=True, num_return_sequences=3, allow_ref=False
    )
    assert sampled.rows_per_image == 3 and sampled.sequences.shape[0] == 6
    assert all(p is not None for p in sampled.parses)
    routed = sampled.predictions["box"]
    assert set(routed.sample.tolist()) <= set(range(6))
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(
            batch["images"], batch["input_ids"], torch.flip(batch["attention_mask"], [1])
        )


def test_forced_prefix_grounds_the_given_phrase() -> None:
    model = _model()
    batch = _batch(with_answers=False, n=3)
    prefixes = batch["answer_prefix"]
    gen = model.generate(
        batch["images"],
        batch["input_ids"],
        batch["attention_mask"],
        max_new_tokens=24,
        forced_prefix=prefixes,
        allow_ref=False,
    )
    for row, prefix in enumerate(prefixes):
        assert gen.ids[row, : len(prefix)].tolist() == prefix
        assert gen.parses[row] is not None
        assert gen.parses[row].triplets[0].concept == batch["expressions"][row]
    with pytest.raises(ValueError, match="one token list per sample"):
        model.generate(
            batch["images"], batch["input_ids"], batch["attention_mask"], forced_prefix=prefixes[:2]
        )


def test_ref_answers_decode_at_the_ref_states() -> None:
    model = _model()
    batch = _batch(with_answers=True, target="ref")
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    ref = model.tokenizer.convert_tokens_to_ids(REF)
    rows, _ = (batch["input_ids"] == ref).nonzero(as_tuple=True)
    assert rows.tolist() == list(range(4))
    assert not out.predictions["box"].is_vrt.any()


def test_detached_queries_keep_head_losses_out_of_the_lm() -> None:
    model = _model(detach_queries=True).train()
    batch = _batch(with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    out.predictions["box"].predictions["boxes"].sum().backward()
    lm = model.vlm.language.model.layers[0].self_attn.q_proj.weight
    assert lm.grad is None or float(lm.grad.abs().sum()) == 0.0


_RELOAD = """
import json, sys, torch
from trp.models import TRPForConditionalGeneration
from tests.test_models_trp import _batch
model = TRPForConditionalGeneration.from_pretrained(sys.argv[1])
batch = _batch(with_answers=False, n=3, first=8)
gen = model.generate(batch["images"], batch["input_ids"], batch["attention_mask"],
                     max_new_tokens=24, allow_ref=False, forced_prefix=batch["answer_prefix"])
print(json.dumps({"texts": gen.texts, "attn": model.vlm.language.config._attn_implementation,
                  "boxes": gen.predictions["box"].predictions["boxes"].tolist()}))
"""


def test_save_pretrained_reloads_in_a_fresh_process_with_identical_predictions(tmp_path) -> None:
    model = _model(contextual_vrt=True)
    torch.nn.init.normal_(model.vrt.context.proj.weight, std=0.5)
    model.save_pretrained(tmp_path / "m")
    saved = sorted(p.name for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert not [n for n in saved if n.endswith((".pt", ".bin", ".pkl", ".pth"))], saved
    batch = _batch(with_answers=False, n=3, first=8)
    gen = model.generate(
        batch["images"],
        batch["input_ids"],
        batch["attention_mask"],
        max_new_tokens=24,
        allow_ref=False,
        forced_prefix=batch["answer_prefix"],
    )
    assert len(gen.predictions["box"]) == 3  # the forced phrase makes every answer ground
    run = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(tmp_path / "m")],
        capture_output=True,
        text=True,
        check=True,
    )
    again = json.loads(run.stdout.strip().splitlines()[-1])
    assert again["attn"] == model.vlm.language.config._attn_implementation == "eager"
    assert tuple(again["texts"]) == gen.texts
    torch.testing.assert_close(
        torch.tensor(again["boxes"]),
        gen.predictions["box"].predictions["boxes"],
        atol=1e-6,
        rtol=1e-6,
    )
    with pytest.raises(FileNotFoundError, match="not a trp model"):
        TRPForConditionalGeneration.from_pretrained(tmp_path / "missing")


def test_pretrained_dir_of_the_reference_language_is_rejected() -> None:
    cfg = {**MODEL_CFG, "language": {**MODEL_CFG["language"], "pretrained_dir": "/x"}}
    with pytest.raises(ValueError, match="model=hf_vlm"):
        build_model(cfg, tokenizer=_tokenizer())
