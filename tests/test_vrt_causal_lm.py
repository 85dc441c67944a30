"""VRTCausalLM: VRTs in unmodified Hugging Face forward/generate (Qwen2, Qwen2.5-VL)."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import nn
from transformers import (
    LogitsProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.test_grammar_fixtures import train_tokenizer
from trp.grammar import TRPLogitsProcessor, add_trp_tokens, parse_ids, vrt_base_of
from trp.grammar.tokenizer import TokenVocab
from trp.vrt import ImageBinding, VRTCausalLM, VRTPrototypes

D = 32
VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


@cache
def tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer("bpe"), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_tokens(list(VISION), special_tokens=True)
    add_trp_tokens(tok)
    tok.padding_side = "left"
    return tok


def lively_prototypes() -> VRTPrototypes:
    # Trained-looking prototypes (the default starts at zero): VRT logits then dominate the
    # random text head, so greedy decoding emits VRTs and feeds them back.
    torch.manual_seed(0)
    protos = VRTPrototypes(dim=D, rank=8)
    nn.init.normal_(protos.norm.weight, std=3.0)
    return protos


def qwen2(tied: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vrt_base_of(tokenizer()),
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer().pad_token_id,
        eos_token_id=tokenizer().eos_token_id,
    )
    return Qwen2ForCausalLM(config).eval()


def prompts(n: int) -> dict:
    texts = ["what is the red dog", "a cat", "the car on the left of the person"][:n]
    return tokenizer()(texts, return_tensors="pt", padding=True)


BINDING = ImageBinding.from_grids([[2, 3], [2, 2], [1, 3], [3, 2]], [1, 2, 1], vrt_base=1)


def batch_binding() -> tuple[ImageBinding, torch.Tensor]:
    binding = ImageBinding.from_grids(BINDING.grids, [1, 2, 1], vrt_base=vrt_base_of(tokenizer()))
    features = torch.randn(binding.total_patches, D, generator=torch.Generator().manual_seed(1))
    return binding, features


class ScriptedPrefix(LogitsProcessor):
    """Steers an untrained model into a triplet: a large bonus for the next token of a fixed
    answer prefix (the grammar processor still decides what is allowed; VRTs come after)."""

    def __init__(self, prompt_length: int) -> None:
        self.prefix = tokenizer()("<Phrase>dog</Phrase>(<Unit>box</Unit>")["input_ids"]
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        if step < len(self.prefix):
            scores = scores.clone()
            scores[:, self.prefix[step]] += 1e4
        return scores


def hand_greedy(model, input_ids, attention_mask, steps: int) -> torch.Tensor:
    """Greedy decoding without cache: one full forward per step (left padding handled by
    position ids as generate does)."""
    ids, mask = input_ids, attention_mask
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("tied", [True, False])
def test_generate_matches_hand_loop_and_captures_hidden(tied):
    model = qwen2(tied)
    vlm = VRTCausalLM(
        model=model, prototypes=lively_prototypes(), vrt_base=vrt_base_of(tokenizer())
    )
    binding, features = batch_binding()
    enc = prompts(3)
    with torch.no_grad(), vlm.bind(binding=binding, features=features):
        out = vlm.generate(**enc, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        ref = hand_greedy(model, enc["input_ids"], enc["attention_mask"], 6)
    assert torch.equal(out.sequences, ref)
    new = out.sequences[:, out.prompt_length :]
    base = vlm.vrt_base
    assert bool((new >= base).any())  # VRTs were emitted and fed back
    for s in range(3):  # only the sample's own patches
        assert bool((new[s][new[s] >= base] < base + binding.patches_per_sample[s]).all())
    # the captured states are the last hidden states of the positions before each VRT
    with torch.no_grad(), vlm.bind(binding=binding, features=features):
        mask = torch.ones_like(out.sequences)
        mask[:, : out.prompt_length] = enc["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        last = model.model(input_ids=out.sequences, attention_mask=mask, position_ids=pos)
    for r in range(3):
        expected = last.last_hidden_state[r, out.vrt_positions[r] - 1]
        torch.testing.assert_close(out.vrt_hidden[r], expected, atol=1e-5, rtol=1e-5)


def test_constrained_generation_emits_own_vrts_and_parses():
    model = qwen2(True)
    tok = tokenizer()
    vlm = VRTCausalLM(model=model, prototypes=lively_prototypes(), vrt_base=vrt_base_of(tok))
    binding, features = batch_binding()
    enc = prompts(3)
    vocab = TokenVocab.from_tokenizer(tok)
    with torch.no_grad(), vlm.bind(binding=binding, features=features):
        proc = TRPLogitsProcessor(
            tokenizer=tok,
            eos_token_id=tok.eos_token_id,
            vrt_mask=vlm.own_image_mask(),
            vocab=vocab,
            max_new_tokens=24,
        )
        out = model.generate(
            **enc,
            max_new_tokens=24,
            do_sample=False,
            logits_processor=[ScriptedPrefix(enc["input_ids"].shape[1]), proc],
            pad_token_id=tok.pad_token_id,
        )
    new = out[:, enc["input_ids"].shape[1] :]
    seen_vrt = False
    for s in range(3):
        result = parse_ids(new[s], vocab=vocab)
        for triplet in result.triplets:
            for target in triplet.targets:
                if target.patches is not None:
                    seen_vrt = True
                    assert max(target.patches) < int(binding.patches_per_sample[s])
    assert seen_vrt


def tiny_qwen25_vl() -> Qwen2_5_VLForConditionalGeneration:
    tok = tokenizer()
    ids = tok.convert_tokens_to_ids(list(VISION))
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vrt_base_of(tok),
            "hidden_size": D,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
            "tie_word_embeddings": True,
            "bos_token_id": tok.eos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": D,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [0],
        },
        vision_start_token_id=ids[0],
        vision_end_token_id=ids[1],
        image_token_id=ids[2],
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def vl_inputs(grids: list[tuple[int, int]], per_sample: list[int]):
    tok = tokenizer()
    thw = torch.tensor([[1, h, w] for h, w in grids])
    pixels = torch.randn(
        int(thw.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(2)
    )
    texts, i = [], 0
    for n in per_sample:
        parts = []
        for _ in range(n):
            h, w = grids[i]
            parts.append("<|vision_start|>" + "<|image_pad|>" * (h * w // 4) + "<|vision_end|>")
            i += 1
        texts.append("".join(parts) + "what is the red dog")
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc, pixels, thw


def test_qwen25_vl_constrained_generate_and_save_load(tmp_path):
    tok = tokenizer()
    model = tiny_qwen25_vl()
    vlm = VRTCausalLM(model=model, prototypes=lively_prototypes(), vrt_base=vrt_base_of(tok))
    grids, per_sample = [(4, 6), (2, 4), (4, 4), (6, 2)], [1, 2, 1]
    enc, pixels, thw = vl_inputs(grids, per_sample)
    vocab = TokenVocab.from_tokenizer(tok)

    def run(wrapper):
        with (
            torch.no_grad(),
            wrapper.bind_images(
                pixel_values=pixels, image_grid_thw=thw, images_per_sample=per_sample
            ) as protos,
        ):
            assert protos.shape == (6 + 2 + 4 + 3, D)  # merged 2x3, 1x2, 2x2, 3x1
            proc = TRPLogitsProcessor(
                tokenizer=tok,
                eos_token_id=tok.eos_token_id,
                vrt_mask=wrapper.own_image_mask(),
                vocab=vocab,
                max_new_tokens=16,
            )
            return wrapper.generate(
                **enc,
                pixel_values=pixels,
                image_grid_thw=thw,
                max_new_tokens=16,
                do_sample=False,
                logits_processor=[ScriptedPrefix(enc["input_ids"].shape[1]), proc],
                pad_token_id=tok.pad_token_id,
            )

    out = run(vlm)
    counts = [6, 2 + 4, 3]
    new = out.sequences[:, out.prompt_length :]
    assert bool((new >= vlm.vrt_base).any())
    for s in range(3):
        assert bool((new[s][new[s] >= vlm.vrt_base] < vlm.vrt_base + counts[s]).all())
        result = parse_ids(new[s], vocab=vocab)  # strict: raises if the answer does not parse
        assert result.triplets[0].targets[0].kind == "vrt"
        assert out.vrt_hidden[s].shape == (len(out.vrt_positions[s]), D)

    vlm.save_pretrained(tmp_path)
    assert isinstance(model.get_input_embeddings(), nn.Module)
    loaded = VRTCausalLM.from_pretrained(tmp_path, model_class=Qwen2_5_VLForConditionalGeneration)
    loaded.eval()
    assert torch.equal(run(loaded).sequences, out.sequences)


def test_bind_errors():
    vlm = VRTCausalLM(model=qwen2(True), vrt_base=vrt_base_of(tokenizer()))
    binding, features = batch_binding()
    with pytest.raises(ValueError, match="rows"), vlm.bind(binding=binding, features=features[:-1]):
        pass
    with pytest.raises(ValueError, match="vrt_base"), vlm.bind(binding=BINDING, features=features):
        pass
    with pytest.raises(RuntimeError, match="no binding"):
        vlm.own_image_mask()
    with pytest.raises(ValueError, match="already wrapped"):
        VRTCausalLM(model=vlm.model)
    with pytest.raises(TypeError, match="visual encoder"):
        vlm.image_features(torch.zeros(1), torch.zeros(1, 3))


def test_training_step_with_fused_loss_reaches_prototypes():
    from trp.ops import vrt_linear_cross_entropy

    model = qwen2(False)
    vlm = VRTCausalLM(model=model, vrt_base=vrt_base_of(tokenizer()))
    binding, features = batch_binding()
    base = vlm.vrt_base
    # answers holding VRTs of each sample's own patches (labels = next token ids)
    ids = torch.tensor(
        [[5, base + 1, base + 4, 7], [9, base + 5, 3, base + 0], [2, 4, base + 2, 8]]
    )
    with vlm.bind(binding=binding, features=features) as protos:
        hidden = model.model(input_ids=ids).last_hidden_state  # R x L x D, VRT inputs embedded
        loss = vrt_linear_cross_entropy(
            hidden[:, :-1].flatten(0, 1),
            model.lm_head.weight[:base],
            protos,
            torch.arange(3).repeat_interleave(3),
            binding.sample_offsets,
            ids[:, 1:].flatten(),
        )
        logits = model(input_ids=ids).logits[:, :-1]  # the wrapped head: same vocabulary
    eager = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert vlm.prototypes.norm.weight.grad.abs().sum() > 0
