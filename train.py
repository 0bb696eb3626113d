"""Train a model: python train.py [experiment=NAME] [group=option ...] [key=value ...]"""

import hydra
from omegaconf import DictConfig

from headstart.entry import run_guarded
from headstart.train.recipe import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_guarded(train, cfg)


if __name__ == "__main__":
    main()
