"""Answer a prompt about one image with a saved trp model; prints JSON on its last line.

    python examples/predict.py checkpoint=outputs/<run>/checkpoint image=cat.png \\
        prompt="Locate the cat." [overlay=out.png] [max_new_tokens=64] [constrained=true]

Per triplet: the phrase, the unit and, per target, the score, the box (xyxy, pixels of the
original image), the mask (COCO RLE at the original size), keypoints or a depth PNG path. The
same as one Python call: ``trp.models.predict(model, load_image(path), prompt)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("checkpoint", "image", "prompt", "overlay", "max_new_tokens", "constrained")


def parse_args(argv: list[str]) -> dict[str, str]:
    args = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(f"unknown argument {item!r}; use key=value with keys {list(KEYS)}")
        args[key] = value
    missing = [k for k in ("checkpoint", "image", "prompt") if k not in args]
    if missing:
        raise SystemExit(f"missing {missing}: predict.py checkpoint=DIR image=PATH prompt=TEXT")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    from omegaconf import OmegaConf

    from trp.models import load_image, predict, save_overlay
    from trp.recipes import load_checkpoint

    model, cfg = load_checkpoint(args["checkpoint"])
    image = load_image(args["image"])
    out_dir = Path(args["overlay"]).parent if "overlay" in args else None
    result = predict(
        model,
        image,
        args["prompt"],
        max_new_tokens=int(args.get("max_new_tokens", 64)),
        constrained=args.get("constrained", "true").lower() in ("1", "true", "yes"),
        prompt_first=bool(OmegaConf.select(cfg, "recipe.prompt_first", default=True)),
        output_dir=out_dir,
    )
    if "overlay" in args:
        result["overlay"] = str(save_overlay(image, result, args["overlay"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
