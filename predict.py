"""Predict on images: python predict.py model=BUNDLE|RUN_DIR|CKPT|ONNX inputs=FOLDER_OR_GLOB"""

import hydra
from omegaconf import DictConfig

from headstart.entry import run_guarded
from headstart.evaluate.prediction import predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    run_guarded(predict, cfg)


if __name__ == "__main__":
    main()
