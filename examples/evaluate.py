"""Evaluate a trp checkpoint on a dataset; writes metrics.json, predictions.json and overlays.

    python examples/evaluate.py checkpoint=outputs/<run>/checkpoint             # held-out shapes
    python examples/evaluate.py checkpoint=... data=refcoco data.root=/data/refcoco \\
        data.eval_split=testA
    python examples/evaluate.py checkpoint=... data=coco \\
        data.annotation_file=/data/coco/annotations/instances_val2017.json \\
        data.image_dir=/data/coco/val2017

The model, tokenizer and recipe come from the checkpoint; data / eval / trainer settings from
the packaged config and the overrides. Outputs go to ``outputs/eval-<time>/``.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from trp.recipes import evaluate


@hydra.main(config_path="pkg://trp.configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if not cfg.checkpoint:
        raise SystemExit("set checkpoint=<directory written by examples/train.py>")
    with open_dict(cfg):
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    evaluate(cfg.checkpoint, cfg)


if __name__ == "__main__":
    main()
