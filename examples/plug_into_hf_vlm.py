"""Plug trp's decoder heads into a Hugging Face VLM (Qwen2.5-VL): train a step, then generate.

1. TRP tokens into the host's tokenizer and embeddings; the VLM wrapped as a trp host
   (``HFVLMHost``: its vision tower runs once per step, its own ``generate`` runs unmodified);
2. box, mask, keypoint and depth heads behind one ``TRPForConditionalGeneration`` that routes
   each parsed triplet's ``<REF>`` / VRT hidden states to the head of its ``<Unit>``;
3. a training step: the VRT token loss plus every head's criterion;
4. grammar-constrained generation and the decoded boxes and masks.

By default a tiny random Qwen2.5-VL is saved to a temporary directory first (the answers are
garbage, the code path is the real one); ``--model PATH`` uses a local checkpoint instead.

    python examples/plug_into_hf_vlm.py [--model PATH] [--image-size 112] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import torch
from transformers import AutoProcessor

from trp.data import MAX_KEYPOINTS, ShapesDataset
from trp.grammar import (
    add_trp_tokens,
    encode_text,
    format_depth,
    format_detection,
    format_rec,
    format_res,
    resize_embeddings,
)
from trp.heads import BoxHead, DepthHead, KeypointHead, MaskHead
from trp.losses import (
    BoxCriterion,
    DepthCriterion,
    KeypointCriterion,
    MaskCriterion,
    RoutedCriterion,
    unit_targets,
)
from trp.models import HFVLMHost, TRPForConditionalGeneration
from trp.models.hf_conversation import encode_hf_conversations, token_grid
from trp.models.tiny_hf import save_tiny_vlm
from trp.vrt import mask_coverage, sample_target_patches, target_patches


def build(model_dir: str) -> TRPForConditionalGeneration:
    """The host VLM + TRP tokens + four heads reading its merged patch features."""
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    add_trp_tokens(processor.tokenizer)
    host = HFVLMHost.from_pretrained(model_dir)
    resize_embeddings(host.model, processor.tokenizer)
    d = host.vision_dim  # merged patch features are at the LM width
    common = {"in_dim": d, "in_channels": [d], "d_model": 32, "n_heads": 4}
    heads = {
        "box": BoxHead(**common, n_points=2, dim_feedforward=64, num_layers=2),
        "mask": MaskHead(**common, mlp_dim=64, mask_dim=16),
        "keypoint": KeypointHead(
            **common, num_keypoints=MAX_KEYPOINTS, n_points=2, dim_feedforward=64, num_layers=2
        ),
        "depth": DepthHead(**common, hidden_dim=16),
    }
    model = TRPForConditionalGeneration(
        vlm=host,
        tokenizer=processor.tokenizer,
        heads=heads,
        route="unit",  # each triplet's targets go to the head of its <Unit>
        vrt_query_shift=1,  # a VRT's query: the state that emitted it (PaDT)
        image_token=processor.tokenizer.convert_ids_to_tokens(host.image_token_id),
    )
    model.processor = processor
    return model


def samples(image_size: int, grid: tuple[int, int], seed: int) -> list[dict[str, Any]]:
    """One synthetic sample per unit, with its prompt, TRP answer and ground truth."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for task in ("rec", "res", "keypoints", "depth"):
        s = ShapesDataset(num_samples=1, seed=seed, image_size=image_size, task=task)[0]
        if task == "rec":  # a <REF> slot
            s.update(unit="box", prompt=f"Locate {s['expression']}.", boxes=s["box"][None])
            s["answer"] = format_rec(s["expression"]).text
        elif task == "res":  # a run of VRTs naming the patches the mask covers
            cells = target_patches(mask_coverage(s["mask"], grid))
            run = sample_target_patches(cells, grid, num=3, generator=gen).tolist()
            s.update(unit="mask", prompt=f"Segment {s['expression']}.", masks=s["mask"][None])
            s["answer"] = format_res(s["expression"], patches=run).text
        elif task == "keypoints":
            s.update(unit="keypoint", prompt=f"Keypoints of every {s['category']}.")
            s["answer"] = format_detection(
                [(s["category"], None)] * len(s["boxes"]), unit="keypoint"
            ).text
        else:
            s.update(unit="depth", prompt="Estimate the depth.", answer=format_depth().text)
        s["image"] = (s["image"] * 255).round().to(torch.uint8)
        out.append(s)
    return out


def run(model_dir: str | None = None, *, image_size: int = 112, seed: int = 0,
        max_new_tokens: int = 24) -> dict[str, Any]:  # fmt: skip
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(model_dir or str(save_tiny_vlm("qwen2_5_vl", tmp)))
    batch_samples = samples(image_size, token_grid(model.processor, (image_size,) * 2), seed)
    images = [s["image"] for s in batch_samples]
    criterion = RoutedCriterion({
        "box": BoxCriterion(),
        "mask": MaskCriterion(num_points=1024),
        "keypoint": KeypointCriterion(num_keypoints=MAX_KEYPOINTS, sigmas=[0.08] * MAX_KEYPOINTS),
        "depth": DepthCriterion(),
    })  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    # ---- training step: token loss over text + own VRTs, and every routed head's criterion
    batch = encode_hf_conversations(
        model.processor, images, [s["prompt"] for s in batch_samples],
        [s["answer"] for s in batch_samples],
    )  # fmt: skip
    model.train()
    out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                batch["parses"], **batch["image_inputs"])  # fmt: skip
    targets = unit_targets(batch_samples, [(image_size, image_size)] * len(batch_samples))
    losses = {"loss_lm": model.token_loss(out, batch["labels"])}
    losses.update(criterion(out.predictions, targets))
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()

    # ---- generation: the host's generate under the grammar; heads decode the parsed targets
    model.eval()
    asks = batch_samples[:2]  # a box and a mask request
    prompts = encode_hf_conversations(model.processor, images[:2], [s["prompt"] for s in asks])
    forced = [  # steer the random model into a triplet (a trained one needs no prefix)
        encode_text(model.tokenizer, f"<Phrase>{s['expression']}</Phrase>(<Unit>{s['unit']}</Unit>")
        for s in asks
    ]
    gen = model.generate(
        prompts["pixel_values"], prompts["input_ids"], prompts["attention_mask"],
        max_new_tokens=max_new_tokens, forced_prefix=forced, image_inputs=prompts["image_inputs"],
    )  # fmt: skip
    box, mask = gen.predictions["box"], gen.predictions["mask"]
    decoded = {
        "text": list(gen.texts),
        "boxes": box.predictions["boxes"],  # cxcywh in [0, 1]
        "box_owner": list(zip(box.sample.tolist(), box.concepts)),
        "masks": MaskHead.postprocess(mask.predictions, (image_size, image_size)),
        "mask_owner": list(zip(mask.sample.tolist(), mask.concepts)),
    }
    return {"losses": {k: float(v) for k, v in losses.items()}, "decoded": decoded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local VLM directory (save_pretrained)")
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
    print("masks:", tuple(d["masks"]["masks"].shape), "for", d["mask_owner"])
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
