"""Evaluate a model: python evaluate.py model=RUN_DIR|CKPT|ONNX|BUNDLE [data=...] [split=test]"""

import hydra
from omegaconf import DictConfig

from headstart.entry import run_guarded
from headstart.evaluate.evaluation import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_guarded(evaluate, cfg)


if __name__ == "__main__":
    main()
