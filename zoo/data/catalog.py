"""Dataset names → image datamodules: "synthetic", "synthetic-interaction" or a 2D MedMNIST flag."""

from __future__ import annotations

from typing import Any

from zoo.data.medmnist import MedMNISTDataModule, available_flags, is_medmnist_flag
from zoo.data.synthetic import SyntheticDataModule

SYNTHETIC_NAMES: tuple[str, ...] = ("synthetic", "synthetic-interaction")


def available_datasets() -> list[str]:
    """Names accepted by :func:`create_datamodule`."""
    return [*SYNTHETIC_NAMES, *available_flags()]


def create_datamodule(name: str, **kwargs: Any) -> SyntheticDataModule | MedMNISTDataModule:
    """Build a datamodule by name: "synthetic", "synthetic-interaction" or a 2D MedMNIST flag.

    ``kwargs`` go to the datamodule's constructor.
    """
    if name == "synthetic":
        return SyntheticDataModule(**kwargs)
    if name == "synthetic-interaction":
        kwargs.setdefault("num_classes", 2)
        return SyntheticDataModule(mode="interaction", **kwargs)
    if is_medmnist_flag(name):  # 3D flags get MedMNISTDataModule's specific error
        return MedMNISTDataModule(flag=name, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
