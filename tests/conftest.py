"""Shared fixtures: small geometry for fast model tests, the shared MedMNIST folder, Hydra configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Threads: the suite runs on 2 cores, often as 2 xdist workers; one thread each avoids oversubscription.
torch.set_num_threads(int(os.environ.get("ZOO_TEST_THREADS", "1")))


def shared_medmnist_dir() -> Path | None:
    env = os.environ.get("ZOO_DATA_DIR")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "medmnist"]:
        if (candidate / "breastmnist.npz").is_file():
            return candidate
    return None


@pytest.fixture
def medmnist_dir() -> Path:
    path = shared_medmnist_dir()
    if path is None:
        pytest.skip("shared MedMNIST files not found (set ZOO_DATA_DIR)")
    return path


def compose(overrides: list[str], output_dir: Path):
    """Compose conf/train.yaml outside @hydra.main, with the run folder set to `output_dir`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from zoo.config import register_model_configs

    register_model_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=[*overrides, f"paths.output_dir={output_dir}"])
