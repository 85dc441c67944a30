"""Prediction overlays as PNG (PIL drawing): boxes, masks, keypoints and depth maps.

Ground truth is drawn in green, predictions in red (masks tinted), visual prompts in blue;
keypoints as points joined in order, depth maps as colour maps beside the image; the answer text
is written below. Images are upscaled so small synthetic scenes stay readable.
:func:`draw_task_overlay` picks what to draw from a unified sample's task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["DEPTH_COLORMAP", "depth_to_rgb", "draw_overlay", "draw_task_overlay", "save_overlays"]

GT_COLOR = (40, 200, 60)
PRED_COLOR = (230, 40, 40)
PROMPT_COLOR = (40, 110, 240)
# Viridis at 9 evenly spaced stops (near = dark purple, far = yellow): perceptually uniform and
# readable in grey, unlike a blue-yellow ramp; interpolated linearly in between.
DEPTH_COLORMAP: tuple[tuple[int, int, int], ...] = (
    (68, 1, 84),
    (71, 45, 123),
    (59, 82, 139),
    (44, 114, 142),
    (33, 145, 140),
    (40, 174, 128),
    (94, 201, 98),
    (173, 220, 48),
    (253, 231, 37),
)


def _to_uint8(image: Tensor) -> np.ndarray:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W] in [0, 1], got {list(image.shape)}")
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def depth_to_rgb(
    depth: Tensor, *, vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """uint8 ``[H, W, 3]``: ``depth`` (``[H, W]``) through :data:`DEPTH_COLORMAP`.

    ``vmin``/``vmax`` fix the range (default: the map's own), so a prediction and its ground
    truth drawn with one range compare by colour. Non-finite pixels are drawn black.
    """
    if not isinstance(depth, Tensor) or depth.dim() != 2:
        raise ValueError("depth must be a Tensor[H, W]")
    d = depth.detach().float().cpu().numpy()
    finite = np.isfinite(d)
    seen = d[finite] if finite.any() else np.zeros(1)
    lo = float(seen.min()) if vmin is None else float(vmin)
    hi = float(seen.max()) if vmax is None else float(vmax)
    t = np.clip((np.where(finite, d, lo) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    stops = np.asarray(DEPTH_COLORMAP, dtype=np.float64)
    x = np.linspace(0.0, 1.0, len(stops))
    rgb = np.stack([np.interp(t, x, stops[:, c]) for c in range(3)], axis=-1)
    rgb[~finite] = 0
    return rgb.round().astype(np.uint8)


def _as_list(value: Tensor | Sequence | None, width: int, name: str) -> list:
    """``[N, width]``-like input (or one ``[width]`` row) as a list of rows."""
    if value is None:
        return []
    t = value if isinstance(value, Tensor) else np.asarray(value, dtype=np.float64)
    t = t.detach().cpu().numpy() if isinstance(t, Tensor) else t
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != width:
        raise ValueError(f"{name} must be [{width}] or [N, {width}], got {list(t.shape)}")
    return t.tolist()


def _keypoint_sets(value: Tensor | None, name: str) -> list[np.ndarray]:
    if value is None:
        return []
    k = value.detach().cpu().float().numpy()
    if k.ndim == 2:
        k = k[None]
    if k.ndim != 3 or k.shape[-1] != 3:
        raise ValueError(f"{name} must be [K, 3] or [N, K, 3] (x, y, v), got {list(k.shape)}")
    return list(k)


def _draw_keypoints(
    draw: ImageDraw.ImageDraw, sets: list[np.ndarray], color: tuple, scale: int, radius: float
) -> None:
    """Each instance's visible points joined in order (its outline), then the points: filled
    when visible (v = 2), hollow when labelled but hidden (v = 1)."""
    for kp in sets:
        pts = [(float(x) * scale, float(y) * scale, v) for x, y, v in kp.tolist() if v > 0]
        if len(pts) >= 2:
            draw.line([(x, y) for x, y, _ in pts], fill=color, width=1)
        for x, y, v in pts:
            box = [x - radius, y - radius, x + radius, y + radius]
            if v >= 2:
                draw.ellipse(box, fill=color)
            else:
                draw.ellipse(box, outline=color, width=1)


def draw_overlay(
    image: Tensor,
    *,
    box: Sequence[float] | Tensor | None = None,
    target_box: Sequence[float] | Tensor | None = None,
    mask: Tensor | None = None,
    target_mask: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    keypoints: Tensor | None = None,
    target_keypoints: Tensor | None = None,
    depth: Tensor | None = None,
    target_depth: Tensor | None = None,
    text: str = "",
    scale: int = 3,
) -> Image.Image:
    """Draw predictions (red) and ground truth (green) over ``image`` (``[3, H, W]`` in [0, 1]).

    Args:
        box / target_box: xyxy pixels, one ``[4]`` or several ``[N, 4]``.
        mask: bool ``[H, W]`` or ``[N, H, W]`` (tinted red); target_mask: outlined in green.
        prompt_mask: bool ``[H, W]``, a visual prompt (tinted blue).
        keypoints / target_keypoints: ``[K, 3]`` or ``[N, K, 3]`` rows ``(x, y, v)`` in
            pixels; ``v > 0`` are drawn (hollow when ``v = 1``, hidden), joined in order.
        depth / target_depth: ``[H, W]``; drawn as colour maps (:data:`DEPTH_COLORMAP`, one
            shared range) to the right of the image, prediction first.
        text: caption written under the image. scale: integer upscaling factor (>= 1).
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    rgb = _to_uint8(image).astype(np.float32)
    h, w = rgb.shape[:2]
    for m, color in ((prompt_mask, PROMPT_COLOR), (mask, PRED_COLOR)):
        if m is not None:
            mm = m.detach().cpu().bool()
            mm = mm.any(0) if mm.dim() == 3 else mm
            if tuple(mm.shape) != (h, w):
                raise ValueError(f"masks must be [H, W] = {[h, w]}, got {list(m.shape)}")
            sel = mm.numpy()
            rgb[sel] = 0.5 * rgb[sel] + 0.5 * np.array(color, dtype=np.float32)
    if target_mask is not None:
        tm = target_mask.detach().cpu().bool()
        tm = tm.any(0) if tm.dim() == 3 else tm
        if tuple(tm.shape) != (h, w):
            raise ValueError(f"target_mask must be [H, W] = {[h, w]}, got {list(tm.shape)}")
        t = tm.numpy()
        inner = t.copy()
        inner[1:-1, 1:-1] = t[1:-1, 1:-1] & t[:-2, 1:-1] & t[2:, 1:-1] & t[1:-1, :-2] & t[1:-1, 2:]
        rgb[t & ~inner] = np.array(GT_COLOR, dtype=np.float32)
    panels = [rgb.astype(np.uint8)]
    maps = [d for d in (depth, target_depth) if d is not None]
    if maps:
        for d in maps:
            if tuple(d.shape) != (h, w):
                raise ValueError(f"depth maps must be [H, W] = {[h, w]}, got {list(d.shape)}")
        both = [d.detach().float().cpu() for d in maps]
        finite = [d[d.isfinite()] for d in both]
        lo = min((float(f.min()) for f in finite if f.numel()), default=0.0)
        hi = max((float(f.max()) for f in finite if f.numel()), default=1.0)
        panels += [depth_to_rgb(d, vmin=lo, vmax=hi) for d in both]
    canvas = Image.fromarray(np.concatenate(panels, axis=1)).resize(
        (w * len(panels) * scale, h * scale), Image.NEAREST
    )
    lines = max(1, (len(text) * 6) // max(canvas.width, 1) + 1) if text else 0
    out = Image.new(
        "RGB", (canvas.width, canvas.height + 12 * lines + (4 if text else 0)), (255, 255, 255)
    )
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    for boxes, color in ((target_box, GT_COLOR), (box, PRED_COLOR)):
        for x0, y0, x1, y1 in _as_list(boxes, 4, "boxes"):
            if x1 >= x0 and y1 >= y0:
                draw.rectangle(
                    [x0 * scale, y0 * scale, x1 * scale, y1 * scale], outline=color, width=2
                )
    radius = max(2.0, scale)
    _draw_keypoints(
        draw, _keypoint_sets(target_keypoints, "target_keypoints"), GT_COLOR, scale, radius
    )
    _draw_keypoints(draw, _keypoint_sets(keypoints, "keypoints"), PRED_COLOR, scale, radius)
    if text:
        per_line = max(1, canvas.width // 6)
        for i in range(lines):
            draw.text(
                (2, canvas.height + 2 + 12 * i),
                text[i * per_line : (i + 1) * per_line],
                fill=(0, 0, 0),
            )
    return out


def draw_task_overlay(
    sample: Mapping[str, Any], prediction: Mapping[str, Any] | None, *, scale: int = 3
) -> Image.Image:
    """The overlay a task calls for, from a :class:`trp.data.UnifiedShapesDataset` sample and
    the model's prediction for it.

    ``prediction`` keys (all optional; ``None``: nothing predicted): ``text`` (the answer),
    ``boxes`` ``[M, 4]`` xyxy, ``masks`` bool ``[M, H, W]``, ``keypoints`` ``[M, K, 3]``,
    ``depth`` ``[H, W]``. Boxes are drawn for box tasks, masks for mask tasks, keypoints (with the
    ground truth's) for ``keypoints``, the depth map beside its ground truth for ``depth``, the
    visual prompt for ``region_caption``; the text shows the prompt, the answer and, for text
    answers, the reference.
    """
    for key in ("image", "task", "prompt"):
        if key not in sample:
            raise KeyError(f"sample lacks {key!r} (expected a UnifiedShapesDataset sample)")
    p = dict(prediction or {})
    task = sample["task"]
    kwargs: dict[str, Any] = {}
    if task in ("rec", "det", "grounded_caption"):
        kwargs.update(box=p.get("boxes"), target_box=sample.get("boxes"))
    elif task in ("res", "seg"):
        kwargs.update(mask=p.get("masks"), target_mask=sample.get("masks"))
    elif task == "keypoints":
        kwargs.update(
            keypoints=p.get("keypoints"),
            target_keypoints=sample.get("keypoints"),
            target_box=sample.get("boxes"),
        )
    elif task == "depth":
        kwargs.update(depth=p.get("depth"), target_depth=sample.get("depth"))
    elif task == "region_caption":
        kwargs.update(prompt_mask=sample.get("prompt_mask"))
    if kwargs.get("box") is not None and len(kwargs["box"]) == 0:
        kwargs["box"] = None
    if kwargs.get("target_box") is not None and len(kwargs["target_box"]) == 0:
        kwargs["target_box"] = None
    answer = p.get("text", "(no answer)")
    text = f"[{task}] {sample['prompt']} -> {answer}"
    if sample.get("reference"):
        text += f" | ref: {sample['reference']}"
    return draw_overlay(sample["image"], text=text, scale=scale, **kwargs)


def save_overlays(samples: Sequence[dict], directory: str | Path) -> list[Path]:
    """Save one PNG per prediction dict (keys ``image`` and optional ``box``, ``target_box``,
    ``mask``, ``target_mask``, ``prompt_mask``, ``keypoints``, ``target_keypoints``, ``depth``,
    ``target_depth``, ``text``, ``name``); returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys = (
        "box",
        "target_box",
        "mask",
        "target_mask",
        "prompt_mask",
        "keypoints",
        "target_keypoints",
        "depth",
        "target_depth",
    )
    paths = []
    for i, s in enumerate(samples):
        img = draw_overlay(s["image"], text=s.get("text", ""), **{k: s.get(k) for k in keys})
        path = directory / f"{s.get('name', f'sample_{i:04d}')}.png"
        img.save(path)
        paths.append(path)
    return paths
