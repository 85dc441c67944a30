"""Real Hugging Face VLMs (tiny random Qwen2.5-VL, Qwen2-VL, LLaVA saved to a local directory)
as trp models: training steps with and without LoRA, generation, and save -> load in a fresh
process with identical predictions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.test_models_trp import MODEL_CFG
from trp.grammar import encode_text
from trp.models import TRPForConditionalGeneration
from trp.models.build import build_hf_model
from trp.models.hf_conversation import encode_hf_conversations
from trp.models.tiny_hf import TINY_FAMILIES, save_tiny_vlm

HEADS = MODEL_CFG["heads"]
PROMPTS = ["Locate the red circle.", "Locate the star."]
ANSWERS = [
    "<Phrase>the red circle</Phrase>(<Unit>box</Unit><|VRT_0|><|VRT_1|>).",
    "<Phrase>the star</Phrase>(<Unit>box</Unit>[0]<REF>).",
]


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def checkpoint(request, tmp_path_factory):
    return request.param, save_tiny_vlm(request.param, tmp_path_factory.mktemp(request.param))


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # Two aspect ratios: Qwen's dynamic resolution gives the two images different grids.
    return [torch.rand(3, 56, 84, generator=g), torch.rand(3, 84, 56, generator=g)]


def _cfg(directory, **changes) -> dict:
    return {
        "pretrained_dir": str(directory),
        "heads": HEADS,
        "prototype_rank": 8,
        **changes,
    }


def _prefixes(model) -> list[list[int]]:
    return [
        encode_text(model.tokenizer, "<Phrase>the red circle</Phrase>(<Unit>box</Unit>"),
        encode_text(model.tokenizer, "<Phrase>the star</Phrase>(<Unit>box</Unit>"),
    ]


def _predict(model) -> dict:
    batch = encode_hf_conversations(model.processor, _images(), PROMPTS)
    gen = model.generate(
        batch["pixel_values"],
        batch["input_ids"],
        batch["attention_mask"],
        max_new_tokens=20,
        allow_ref=False,
        forced_prefix=_prefixes(model),
        image_inputs=batch["image_inputs"],
    )
    return {"texts": list(gen.texts), "boxes": gen.predictions["box"].predictions["boxes"].tolist()}


@pytest.mark.parametrize("lora", [False, True])
def test_training_steps_generation_and_reload(checkpoint, lora, tmp_path) -> None:
    family, directory = checkpoint
    torch.manual_seed(0)
    lora_cfg = {
        "enabled": lora,
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
    }
    model = build_hf_model(_cfg(directory, lora=lora_cfg))
    batch = encode_hf_conversations(model.processor, _images(), PROMPTS, ANSWERS)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(3):
        out = model(
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"],
            batch["parses"],
            **batch["image_inputs"],
        )
        loss = model.token_loss(out, batch["labels"])
        box = out.predictions["box"].predictions["boxes"]
        assert box.shape == (2, 4)
        (loss + box.sum() * 0.01).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    if lora:
        layers = [n for n in changed if ".layers." in n and "language_model" in n]
        assert layers and all("lora_" in n for n in layers), layers[:4]
    assert any(n.startswith("vrt.prototypes") for n in changed)
    assert any(n.startswith("router.heads.box") for n in changed)
    model.eval()
    expected = _predict(model)
    assert len(expected["boxes"]) >= 2  # the forced phrases make both answers ground
    model.save_pretrained(tmp_path / "m")
    files = [p.name for p in (tmp_path / "m").rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    if lora:
        assert "trp_adapter.safetensors" in files and "model.safetensors" not in files
    script = (
        "import json, sys\n"
        "from trp.models import TRPForConditionalGeneration\n"
        "from tests.test_models_hf import _predict\n"
        "m = TRPForConditionalGeneration.from_pretrained(sys.argv[1])\n"
        "print(json.dumps(_predict(m)))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "m")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    again = json.loads(run.stdout.strip().splitlines()[-1])
    assert again["texts"] == expected["texts"]
    torch.testing.assert_close(
        torch.tensor(again["boxes"]), torch.tensor(expected["boxes"]), atol=1e-5, rtol=1e-5
    )


def test_generation_states_equal_teacher_forced_states(checkpoint) -> None:
    _, directory = checkpoint
    torch.manual_seed(0)
    model = build_hf_model(_cfg(directory)).eval()
    batch = encode_hf_conversations(model.processor, _images(), PROMPTS)
    gen = model.generate(
        batch["pixel_values"],
        batch["input_ids"],
        batch["attention_mask"],
        max_new_tokens=20,
        allow_ref=False,
        forced_prefix=_prefixes(model),
        image_inputs=batch["image_inputs"],
    )
    seq = gen.sequences
    extra = dict(batch["image_inputs"])
    width = seq.shape[1] - batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones(2, width, dtype=torch.long)], 1)
    for key, value in extra.items():
        if value.shape == batch["input_ids"].shape:  # per-token inputs grow with the answer
            extra[key] = torch.cat([value, torch.zeros(2, width, dtype=value.dtype)], 1)
    out = model(batch["pixel_values"], seq, mask, list(gen.parses), **extra)
    torch.testing.assert_close(
        gen.predictions["box"].predictions["boxes"],
        out.predictions["box"].predictions["boxes"],
        atol=2e-4,
        rtol=2e-4,
    )


def test_bad_hf_configs_fail_naming_the_key(tmp_path, checkpoint) -> None:
    _, directory = checkpoint
    with pytest.raises(FileNotFoundError, match="pretrained_dir"):
        build_hf_model(_cfg(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="target_modules"):
        build_hf_model(_cfg(directory, lora={"enabled": True, "target_modules": ["nope"]}))
    with pytest.raises(ValueError, match="torch_dtype"):
        build_hf_model(_cfg(directory, torch_dtype="float8"))
    with pytest.raises(ValueError, match=r"model\.freeze\.eyes: unknown key"):
        build_hf_model(_cfg(directory, freeze={"eyes": True}))


def test_frozen_parts_do_not_train(checkpoint) -> None:
    _, directory = checkpoint
    model = build_hf_model(_cfg(directory, freeze={"vision": True, "projector": False}))
    host = model.vlm
    for name, p in host.model.named_parameters():
        if host.part_of(name) == "vision":
            assert not p.requires_grad, name
    assert isinstance(model, TRPForConditionalGeneration)
