"""Prediction overlays as PNG (PIL drawing): boxes, masks, keypoints and depth maps.

Ground truth is drawn in green, predictions in red (mask tinted); the answer text is written
below the image. Images are upscaled so small synthetic scenes stay readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["draw_overlay", "save_overlays"]

GT_COLOR = (40, 200, 60)
PRED_COLOR = (230, 40, 40)


def _to_uint8(image: Tensor) -> np.ndarray:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W] in [0, 1], got {list(image.shape)}")
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _depth_to_rgb(depth: Tensor) -> np.ndarray:
    d = depth.detach().float()
    lo, hi = float(d.min()), float(d.max())
    t = ((d - lo) / max(hi - lo, 1e-6)).numpy()
    # A blue (near) -> yellow (far) ramp.
    return (np.stack([t, t, 1 - t], axis=-1) * 255).astype(np.uint8)


def draw_overlay(
    image: Tensor,
    *,
    box: Sequence[float] | None = None,
    target_box: Sequence[float] | None = None,
    mask: Tensor | None = None,
    keypoints: Tensor | None = None,
    depth: Tensor | None = None,
    text: str = "",
    scale: int = 3,
) -> Image.Image:
    """Draw predictions (and ground truth) over ``image`` (``[3, H, W]`` in [0, 1]).

    Args:
        box / target_box: xyxy pixels. mask: bool ``[H, W]`` (tinted red).
        keypoints: ``[K, 3]`` rows ``(x, y, v)`` in pixels; ``v > 0`` are drawn.
        depth: ``[H, W]``; drawn as a colour map to the right of the image.
        text: caption written under the image. scale: integer upscaling factor (>= 1).
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    rgb = _to_uint8(image).astype(np.float32)
    if mask is not None:
        m = mask.detach().cpu().bool().numpy()
        rgb[m] = 0.5 * rgb[m] + 0.5 * np.array(PRED_COLOR, dtype=np.float32)
    h, w = rgb.shape[:2]
    panels = [rgb.astype(np.uint8)]
    if depth is not None:
        panels.append(_depth_to_rgb(depth.cpu()))
    canvas = Image.fromarray(np.concatenate(panels, axis=1)).resize(
        (w * len(panels) * scale, h * scale), Image.NEAREST
    )
    lines = max(1, (len(text) * 6) // max(canvas.width, 1) + 1) if text else 0
    out = Image.new(
        "RGB", (canvas.width, canvas.height + 12 * lines + (4 if text else 0)), (255, 255, 255)
    )
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    for b, color in ((target_box, GT_COLOR), (box, PRED_COLOR)):
        if b is not None:
            x0, y0, x1, y1 = (float(v) * scale for v in b)
            if x1 >= x0 and y1 >= y0:
                draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
    if keypoints is not None:
        for x, y, v in keypoints.detach().cpu().tolist():
            if v > 0:
                cx, cy = x * scale, y * scale
                draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=PRED_COLOR)
    if text:
        per_line = max(1, canvas.width // 6)
        for i in range(lines):
            draw.text(
                (2, canvas.height + 2 + 12 * i),
                text[i * per_line : (i + 1) * per_line],
                fill=(0, 0, 0),
            )
    return out


def save_overlays(samples: Sequence[dict], directory: str | Path) -> list[Path]:
    """Save one PNG per prediction dict (keys ``image`` and optional ``box``, ``target_box``,
    ``mask``, ``keypoints``, ``depth``, ``text``, ``name``); returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(samples):
        img = draw_overlay(
            s["image"],
            box=s.get("box"),
            target_box=s.get("target_box"),
            mask=s.get("mask"),
            keypoints=s.get("keypoints"),
            depth=s.get("depth"),
            text=s.get("text", ""),
        )
        path = directory / f"{s.get('name', f'sample_{i:04d}')}.png"
        img.save(path)
        paths.append(path)
    return paths
