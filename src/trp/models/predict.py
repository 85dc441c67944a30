"""``predict``: one image and one prompt in, the decoded triplets out (for users, not recipes).

Works for both hosts: the reference VLM (the image is resized to its input size, the prompt laid
out as the recipes lay it out) and Hugging Face VLMs (the host's processor). Boxes come back in
pixels of the *original* image (xyxy), masks as COCO RLE at the original size, keypoints in
pixels, depth maps as 16-bit PNG files when ``output_dir`` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from trp.grammar import IMAGE, ChatTemplate, encode_text
from trp.heads.box_format import box_cxcywh_to_xyxy
from trp.models.trp_model import TRPForConditionalGeneration

__all__ = ["load_image", "predict", "save_overlay"]


def load_image(path: str | Path) -> Tensor:
    """An image file -> ``Tensor[3, H, W]`` float in [0, 1]."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _reference_inputs(model: TRPForConditionalGeneration, image: Tensor, prompt: str, first: bool):
    size = model.image_size
    pixels = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
    grid = model.vlm.config.grid
    images = IMAGE * (grid[0] * grid[1])
    user = f"{prompt}\n{images}" if first else f"{images}\n{prompt}"
    t = ChatTemplate()
    text = (
        t.turn_start.format(role="user")
        + user
        + t.turn_end
        + t.turn_start.format(role=t.answer_role)
    )
    ids = torch.tensor([encode_text(model.tokenizer, text)])
    return pixels, ids, torch.ones_like(ids), {}


def _hf_inputs(model: TRPForConditionalGeneration, image: Tensor, prompt: str):
    from trp.models.hf_conversation import encode_hf_conversations

    uint8 = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    batch = encode_hf_conversations(model.processor, [uint8], [prompt])
    return batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["image_inputs"]


@torch.no_grad()
def predict(
    model: TRPForConditionalGeneration,
    image: Tensor,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    constrained: bool = True,
    mask_threshold: float = 0.5,
    prompt_first: bool = True,
    answer_prefix: str | None = None,
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Answer ``prompt`` about ``image`` (``Tensor[3, H, W]`` in [0, 1]).

    Returns ``{"answer": text, "parsed": bool, "triplets": [...]}``; each triplet has
    ``phrase``, ``unit`` and one entry per target with ``score``, ``box`` (xyxy pixels of the
    original image), ``mask`` (COCO RLE), ``keypoints`` or ``depth`` (a PNG path) — whatever
    the model's heads decode. ``answer_prefix`` (e.g.
    ``"<Phrase>the cat</Phrase>(<Unit>box</Unit>"``) is forced as the answer's start, so the
    model grounds the given phrase (Kosmos-2's protocol).
    """
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError("image must be a Tensor[3, H, W] (use trp.models.load_image)")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    model.eval()
    height, width = int(image.shape[1]), int(image.shape[2])
    if model.processor is not None:
        pixels, ids, mask, extra = _hf_inputs(model, image, prompt)
    else:
        pixels, ids, mask, extra = _reference_inputs(model, image, prompt, prompt_first)
    forced = None
    if answer_prefix is not None:
        forced = [encode_text(model.tokenizer, answer_prefix, vrt_base=model.vrt_base)]
    gen = model.generate(
        pixels,
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        constrained=constrained,
        forced_prefix=forced,
        image_inputs=extra,
    )
    parse = gen.parses[0]
    result: dict[str, Any] = {"answer": gen.texts[0], "parsed": parse is not None, "triplets": []}
    if parse is None:
        result["error"] = gen.parse_errors[0]
        return result
    decoded = {
        unit: _decode(unit, routed, height, width, mask_threshold)
        for unit, routed in gen.predictions.items()
    }
    for t, triplet in enumerate(parse.triplets):
        targets = []
        for k in range(len(triplet.targets)):
            entry: dict[str, Any] = {}
            for routed, values in decoded.values():
                rows = ((routed.triplet == t) & (routed.instance == k)).nonzero().flatten()
                if rows.numel():
                    entry.update(values(int(rows[0]), output_dir, f"t{t}_{k}"))
            targets.append(entry)
        result["triplets"].append(
            {"phrase": triplet.concept, "unit": triplet.unit, "targets": targets}
        )
    return result


def _decode(unit: str, routed, height: int, width: int, threshold: float):
    """-> ``(routed, row -> dict)``: the JSON fields of one object of ``unit``'s head."""
    preds = routed.predictions
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)

    def values(row: int, output_dir, name: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "boxes" in preds:
            box = box_cxcywh_to_xyxy(preds["boxes"][row].float().cpu()).clamp(0, 1) * scale
            out["box"] = [round(float(v), 2) for v in box]
        if "scores" in preds:
            out["score"] = round(float(preds["scores"][row].float().sigmoid()), 4)
        if "masks" in preds:
            from pycocotools import mask as mask_utils

            logits = F.interpolate(
                preds["masks"][row][None, None].float(),
                size=(height, width),
                mode="bilinear",
                align_corners=False,
            )[0, 0]
            binary = (logits.sigmoid() > threshold).numpy().astype(np.uint8)
            rle = mask_utils.encode(np.asfortranarray(binary))
            out["mask"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        if "keypoints" in preds:
            kp = preds["keypoints"][row].float().cpu()
            out["keypoints"] = (kp[..., :2] * torch.tensor([width, height])).tolist()
        if "depth" in preds and output_dir is not None:
            from PIL import Image

            depth = F.interpolate(
                preds["depth"][row][None, None].float(),
                size=(height, width),
                mode="bilinear",
                align_corners=False,
            )[0, 0].cpu()
            path = Path(output_dir) / f"depth_{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            top = float(depth.max()) or 1.0
            Image.fromarray((depth / top * 65535).clamp(0, 65535).numpy().astype(np.uint16)).save(
                path
            )
            out["depth"] = str(path)
            out["depth_max"] = top
        return out

    return routed, values


def save_overlay(image: Tensor, result: dict[str, Any], path: str | Path) -> Path:
    """Draw ``predict``'s boxes and masks over ``image`` and save a PNG."""
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().copy()
    colours = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
    entries = [e for t in result["triplets"] for e in t["targets"]]
    for i, entry in enumerate(entries):
        if "mask" in entry:
            rle = {"size": entry["mask"]["size"], "counts": entry["mask"]["counts"].encode()}
            m = mask_utils.decode(rle).astype(bool)
            array[m] = (0.5 * array[m] + 0.5 * np.array(colours[i % 5])).astype(np.uint8)
    canvas = Image.fromarray(array)
    draw = ImageDraw.Draw(canvas)
    for i, entry in enumerate(entries):
        if "box" in entry:
            draw.rectangle(entry["box"], outline=colours[i % 5], width=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
