"""Plug trp's decoder heads into a Hugging Face Qwen2.5-VL: one training step, then generation.

What it shows, end to end on CPU:

1. the TRP tokens (``<Phrase>``, ``<Unit>``, ``<REF>``, …) added to the tokenizer and the
   embeddings (``trp.grammar``), and visual reference tokens bound per image
   (``trp.vrt.VRTCausalLM``: every merged patch is a token the LM can read and emit);
2. box, mask, keypoint and depth heads (``trp.heads``) behind a ``DecoderRouter`` that routes
   each parsed triplet's ``<REF>`` / VRT hidden states to the head of its ``<Unit>``;
3. a training step on a synthetic batch (``trp.data.ShapesDataset``): LM cross-entropy plus
   every head's losses (``trp.losses``);
4. grammar-constrained generation (``trp.grammar.TRPLogitsProcessor``), parsing of the answer,
   and decoding it into boxes and masks at the image size.

By default the model is built from a tiny config with random weights (the answer is garbage,
the code path is the real one). ``--model PATH`` loads a local Qwen2.5-VL checkpoint (and its
processor) instead; nothing is downloaded.

    python examples/plug_into_hf_vlm.py [--model PATH] [--image-size 112] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    LogitsProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

from trp.data import MAX_KEYPOINTS, ShapesDataset
from trp.grammar import (
    TokenVocab,
    TRPLogitsProcessor,
    add_trp_tokens,
    encode_text,
    format_depth,
    format_detection,
    format_rec,
    format_res,
    parse_ids,
    resize_embeddings,
    vrt_base_of,
)
from trp.heads import BoxHead, DecoderRouter, DepthHead, KeypointHead, MaskHead, triplet_group
from trp.losses import BoxCriterion, DepthCriterion, KeypointCriterion, MaskCriterion
from trp.vrt import ImageBinding, VRTCausalLM, mask_coverage, sample_target_patches, target_patches

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
UNITS = ("box", "mask", "keypoint", "depth")


# --------------------------------------------------------------------------- model + tokenizer
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on TRP answers (offline stand-in for Qwen's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [
        format_rec(f"the {c} {s}").text + " " + format_res(f"a {s}").text
        for c in ("red", "green", "blue", "yellow")
        for s in ("circle", "square", "triangle", "star", "cross")
    ] + ["Where is it? Segment, locate, keypoints and depth of the image."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.add_tokens(list(VISION_TOKENS), special_tokens=True)
    return hf


def tiny_qwen25_vl(tokenizer: Any, hidden: int = 64) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL from a tiny config (vision depth 1, 2 LM layers), random weights."""
    ids = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "tie_word_embeddings": True,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [0],
        },
        vision_start_token_id=ids[0],
        vision_end_token_id=ids[1],
        image_token_id=ids[2],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def load(model_path: str | None) -> tuple[nn.Module, Any, Qwen2VLImageProcessor]:
    if model_path is None:
        tokenizer = tiny_tokenizer()
        add_trp_tokens(tokenizer)
        model = tiny_qwen25_vl(tokenizer)
        return model, tokenizer, Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, local_files_only=True)
    tokenizer = processor.tokenizer
    add_trp_tokens(tokenizer)
    resize_embeddings(model, tokenizer)
    return model, tokenizer, processor.image_processor


# --------------------------------------------------------------------------- heads
def build_heads(lm_width: int, vision_width: int) -> DecoderRouter:
    """Small heads over two levels: the merged patch grid and a 2x pooled copy of it."""
    common = {"in_dim": lm_width, "in_channels": [vision_width, vision_width], "d_model": 32}
    return DecoderRouter(
        {
            "box": BoxHead(**common, n_heads=4, n_points=2, dim_feedforward=64, num_layers=2),
            "mask": MaskHead(**common, n_heads=4, mlp_dim=64, mask_dim=16),
            "keypoint": KeypointHead(
                **common,
                num_keypoints=MAX_KEYPOINTS,
                n_heads=4,
                n_points=2,
                dim_feedforward=64,
                num_layers=2,
            ),
            "depth": DepthHead(**common, hidden_dim=16, n_heads=4),
        },
        shift=1,  # VRT targets: the state that emitted each VRT (PaDT)
    )


def image_levels(patch_features: Tensor, grids: Tensor, merge: int) -> list[Tensor]:
    """Merged patch features ``[ΣP, D]`` -> levels ``[B, D, h, w]`` and ``[B, D, h/2, w/2]``."""
    maps, start = [], 0
    for _, gh, gw in grids.tolist():
        h, w = gh // merge, gw // merge
        maps.append(patch_features[start : start + h * w].T.reshape(-1, h, w))
        start += h * w
    level0 = torch.stack(maps)  # images share one size here
    return [level0, F.avg_pool2d(level0, 2, ceil_mode=True)]


# --------------------------------------------------------------------------- data
def synthetic_batch(image_size: int, seed: int, grid: tuple[int, int]) -> list[dict]:
    """One sample per unit: REC (box, a ``<REF>`` target), RES (mask, a run of VRTs naming the
    patches the mask covers: PaDT style), keypoints of a class, depth. ``grid``: merged grid."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for task, unit in (
        ("rec", "box"),
        ("res", "mask"),
        ("keypoints", "keypoint"),
        ("depth", "depth"),
    ):
        s = ShapesDataset(num_samples=1, seed=seed, image_size=image_size, task=task, max_shapes=3)[
            0
        ]
        if unit == "box":
            answer = format_rec(s["expression"]).text
            question = f"Please locate {s['expression']}."
        elif unit == "mask":
            cells = target_patches(mask_coverage(s["mask"], grid))
            run = sample_target_patches(cells, grid, num=3, generator=gen).tolist()
            answer = format_res(s["expression"], patches=run).text
            question = f"Please segment {s['expression']}."
        elif unit == "keypoint":
            n = len(s["boxes"])
            answer = format_detection([(s["category"], None)] * n, unit="keypoint").text
            question = f"Keypoints of every {s['category']}."
        else:
            answer = format_depth().text
            question = "Estimate the depth."
        out.append({**s, "unit": unit, "question": question, "answer": answer})
    return out


def encode(
    tokenizer: Any, image_processor: Any, samples: list[dict], *, with_answer: bool, vrt_base: int
):
    """Token ids (answers right-padded for training, prompts left-padded for generation),
    pixel values, grids and prompt lengths. VRTs in answers encode as ``vrt_base + k``."""
    images = [s["image"] for s in samples]
    vis = image_processor(images=images, return_tensors="pt", do_rescale=False)
    merge = image_processor.merge_size
    rows, prompt_lens = [], []
    for s, thw in zip(samples, vis["image_grid_thw"]):
        n_img = int(thw.prod()) // merge**2
        prompt = "<|vision_start|>" + "<|image_pad|>" * n_img + "<|vision_end|>" + s["question"]
        ids = encode_text(tokenizer, prompt, vrt_base=vrt_base)
        prompt_lens.append(len(ids))
        if with_answer:
            ids += encode_text(tokenizer, s["answer"], vrt_base=vrt_base) + [tokenizer.eos_token_id]
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for b, r in enumerate(rows):
        cols = slice(0, len(r)) if with_answer else slice(width - len(r), width)
        input_ids[b, cols] = torch.tensor(r)
        attention[b, cols] = 1
    enc = {"input_ids": input_ids, "attention_mask": attention}
    return enc, vis["pixel_values"], vis["image_grid_thw"], prompt_lens


def targets_for(routed, samples: list[dict], image_size: int) -> dict[str, dict]:
    """Per unit, the criterion's targets in the router's group ids."""
    size = float(image_size)

    def cxcywh(xyxy: Tensor) -> Tensor:
        x0, y0, x1, y1 = (xyxy / size).unbind(-1)
        return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)

    def group(b: int) -> Tensor:
        return triplet_group(torch.tensor([b]), torch.tensor([0]))

    t: dict[str, dict] = {}
    for b, s in enumerate(samples):
        if s["unit"] == "box":
            t["box"] = {"boxes": cxcywh(s["box"])[None], "group": group(b)}
        elif s["unit"] == "mask":
            t["mask"] = {"masks": s["mask"][None].float(), "group": group(b)}
        elif s["unit"] == "keypoint":
            k = s["keypoints"].clone()
            k[..., :2] /= size
            boxes = cxcywh(s["boxes"])
            t["keypoint"] = {
                "keypoints": k,
                "areas": boxes[:, 2] * boxes[:, 3],
                "group": group(b).expand(len(k)).clone(),
            }
        else:
            t["depth"] = {"depth": s["depth"][None]}
    return t


# --------------------------------------------------------------------------- generation helper
class ForcedPrefix(LogitsProcessor):
    """Steers a random-weight model into a triplet by favouring a fixed answer prefix per row
    (the grammar processor still decides what is allowed). Not needed for a trained model."""

    def __init__(self, prefixes: list[list[int]], prompt_length: int) -> None:
        self.prefixes = prefixes
        self.prompt_length = prompt_length

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        step = input_ids.shape[1] - self.prompt_length
        scores = scores.clone()
        for row, prefix in enumerate(self.prefixes):
            if step < len(prefix):
                scores[row, prefix[step]] += 1e4
        return scores


# --------------------------------------------------------------------------- main
def run(
    model_path: str | None = None, *, image_size: int = 112, seed: int = 0, max_new_tokens: int = 24
) -> dict[str, Any]:
    """Train one step and generate; returns the losses and the decoded predictions."""
    torch.manual_seed(seed)
    model, tokenizer, image_processor = load(model_path)
    vlm = VRTCausalLM(model=model, vrt_base=vrt_base_of(tokenizer))
    vocab = TokenVocab.from_tokenizer(tokenizer)
    merge = int(model.config.vision_config.spatial_merge_size)
    lm_width = int(model.get_input_embeddings().weight.shape[1])
    router = build_heads(lm_width, lm_width)
    criteria = {
        "box": BoxCriterion(),
        "mask": MaskCriterion(num_points=1024),
        "keypoint": KeypointCriterion(num_keypoints=MAX_KEYPOINTS, sigmas=[0.08] * MAX_KEYPOINTS),
        "depth": DepthCriterion(),
    }
    params = [*vlm.parameters(), *router.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    # ---- training step
    probe = image_processor(
        images=[torch.zeros(3, image_size, image_size)], return_tensors="pt", do_rescale=False
    )["image_grid_thw"][0]
    samples = synthetic_batch(image_size, seed, (int(probe[1]) // merge, int(probe[2]) // merge))
    enc, pixels, thw, prompt_lens = encode(
        tokenizer, image_processor, samples, with_answer=True, vrt_base=vlm.vrt_base
    )
    vlm.train()
    router.train()
    patch_features = vlm.image_features(pixels, thw)  # ΣP x D
    binding = ImageBinding.from_grid_thw(
        thw, [1] * len(samples), vrt_base=vlm.vrt_base, spatial_merge_size=merge
    )
    with vlm.bind(binding=binding, features=patch_features):
        out = vlm(**enc, pixel_values=pixels, image_grid_thw=thw, output_hidden_states=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for b, n in enumerate(prompt_lens):
        labels[b, :n] = -100
    loss_lm = F.cross_entropy(
        out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )
    hidden = out.hidden_states[-1]  # B x T x D
    results = [
        parse_ids(ids[m.bool()], vocab=vocab)
        for ids, m in zip(enc["input_ids"], enc["attention_mask"])
    ]
    features = image_levels(patch_features, thw, merge)
    routed = router(results, hidden, features, image_size=(image_size, image_size))
    targets = targets_for(routed, samples, image_size)
    losses: dict[str, Tensor] = {"loss_lm": loss_lm}
    for unit in UNITS:
        r = routed[unit]
        kw = {} if unit == "depth" else {"pred_group": r.group}
        for name, value in criteria[unit](r.predictions, targets[unit], **kw).items():
            losses[f"{unit}/{name}"] = value
    total = sum(losses.values())
    optimizer.zero_grad()
    total.backward()
    optimizer.step()

    # ---- generation, parsing, decoding
    vlm.eval()
    router.eval()
    gen_samples = samples[:2]  # a box and a mask request
    enc, pixels, thw, _ = encode(
        tokenizer, image_processor, gen_samples, with_answer=False, vrt_base=vlm.vrt_base
    )
    prefixes = [
        tokenizer(f"<Phrase>{s['expression']}</Phrase>(<Unit>{s['unit']}</Unit>")["input_ids"]
        for s in gen_samples
    ]
    with torch.no_grad():
        patch_features = vlm.image_features(pixels, thw)
        binding = ImageBinding.from_grid_thw(
            thw, [1] * len(gen_samples), vrt_base=vlm.vrt_base, spatial_merge_size=merge
        )
        with vlm.bind(binding=binding, features=patch_features):
            grammar = TRPLogitsProcessor(
                tokenizer=tokenizer,
                eos_token_id=tokenizer.eos_token_id,
                vrt_mask=vlm.own_image_mask(),
                vocab=vocab,
                units=UNITS,
                max_new_tokens=max_new_tokens,
            )
            gen = vlm.generate(
                **enc,
                pixel_values=pixels,
                image_grid_thw=thw,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                logits_processor=[ForcedPrefix(prefixes, enc["input_ids"].shape[1]), grammar],
            )
            sequences = gen.sequences
            mask = (sequences != tokenizer.pad_token_id).long()
            # One forward pass over prompt + answer gives every target token's hidden state.
            hidden = vlm(
                input_ids=sequences,
                attention_mask=mask,
                pixel_values=pixels,
                image_grid_thw=thw,
                output_hidden_states=True,
            ).hidden_states[-1]
        answers = [parse_ids(row, vocab=vocab) for row in sequences]  # strict: must parse
        features = image_levels(patch_features, thw, merge)
        routed = router(answers, hidden, features, image_size=(image_size, image_size))
    decoded = {
        "text": [vocab.decode(row[gen.prompt_length :].tolist()) for row in sequences],
        "boxes": routed["box"].predictions["boxes"],
        "box_owner": list(zip(routed["box"].sample.tolist(), routed["box"].concepts)),
        "masks": MaskHead.postprocess(routed["mask"].predictions, (image_size, image_size)),
        "mask_owner": list(zip(routed["mask"].sample.tolist(), routed["mask"].concepts)),
    }
    return {"losses": {k: v.item() for k, v in losses.items()}, "decoded": decoded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local Qwen2.5-VL checkpoint directory")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    out = run(args.model, image_size=args.image_size, seed=args.seed)
    for name, value in out["losses"].items():
        print(f"{name:28s} {value:.4f}")
    d = out["decoded"]
    for i, text in enumerate(d["text"]):
        print(f"answer {i}: {text!r}")
    print("boxes (cxcywh):", d["boxes"].tolist(), "for", d["box_owner"])
    print(
        "masks:",
        tuple(d["masks"]["masks"].shape),
        "mask boxes:",
        d["masks"]["boxes"].tolist(),
        "for",
        d["mask_owner"],
    )
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
