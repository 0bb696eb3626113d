"""Prune a trained model: python prune.py model=RUN_DIR_OR_CKPT [pruning.ratio=0.5] [pruning.steps=8]"""

import hydra
from omegaconf import DictConfig

from headstart.entry import run_guarded
from headstart.prune.recipe import prune


@hydra.main(version_base="1.3", config_path="conf", config_name="prune")
def main(cfg: DictConfig) -> None:
    run_guarded(prune, cfg)


if __name__ == "__main__":
    main()
