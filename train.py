"""Train, test, measure and save a zoo model: ``python train.py [model=...] [data=...] [key=value ...]``.

A thin Hydra entry point; the work happens in the testable ``zoo.training.train(cfg)``.
"""

import sys

import hydra
from omegaconf import DictConfig

from zoo.cli import user_errors
from zoo.config import register_model_configs
from zoo.training import train

register_model_configs()  # conf/model/*.yaml start from the model signatures' defaults


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with user_errors():
        train(cfg)


if __name__ == "__main__":
    sys.exit(main())
