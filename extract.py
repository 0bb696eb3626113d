"""Extract a DoF feature set: python extract.py [experiment=NAME] [extract.views=K] [verify=true]"""

import hydra
from omegaconf import DictConfig

from headstart.entry import run_guarded
from headstart.train.extract import INTERRUPTED, extract


@hydra.main(version_base="1.3", config_path="conf", config_name="extract")
def main(cfg: DictConfig) -> None:
    run_guarded(extract, cfg, interrupted=INTERRUPTED)


if __name__ == "__main__":
    main()
