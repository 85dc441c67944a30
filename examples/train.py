"""Train and evaluate a trp recipe with one command (Hydra overrides on the command line).

    python examples/train.py                                   # default recipe: shapes_vrt
    python examples/train.py recipe=shapes_trp trainer.max_steps=100
    python examples/train.py recipe=refcoco_vrt data.root=/data/refcoco
    python examples/train.py trainer=ddp_cpu threads=1         # 2 DDP processes on the CPU

The configs are packaged in ``trp.configs``; outputs go to ``outputs/<recipe>-<time>/``.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from trp.recipes import train


@hydra.main(config_path="pkg://trp.configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Hydra's run directory is the output directory (DDP children are given the parent's).
    with open_dict(cfg):
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    train(cfg)


if __name__ == "__main__":
    main()
