"""Measure a saved model: ``python evaluate.py model_path=<folder|pretrained name|.ckpt> data=<data>``.

Prints accuracy, AUROC and the explanation metrics (hit rate, energy in mask, deletion/insertion AUC,
stability) of the model's own explanation; ``baseline=<folder|name>`` adds the post-hoc rows of a
black-box model (Grad-CAM at the last and at the best layer, Integrated Gradients).
"""

import sys

import hydra
from omegaconf import DictConfig

from zoo.cli import user_errors
from zoo.evaluation import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    sys.exit(main())
