"""Datamodules of the zoo: the embedded synthetic benchmark and MedMNIST.

All datamodules share one batch layout (see :mod:`zoo.data.common`):
``{"image": (B, C, H, W) in [-1, 1], "label": (B,) long or (B, K) float,
"index": (B,) long}``, plus ``mask``/``keypoints`` for synthetic data.
:func:`create_datamodule` builds one by name, e.g. for the CLI.
"""

from __future__ import annotations

from typing import Any

from zoo.data.common import DatasetNotFoundError, denormalize, normalize
from zoo.data.graphs import GraphDataModule
from zoo.data.medmnist import MedMNISTDataModule, available_flags, is_medmnist_flag
from zoo.data.synthetic import SyntheticDataModule, make_synthetic

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


def create_graph_datamodule(name: str, **kwargs: Any) -> GraphDataModule:
    """A kNN image graph (one node per image) over dataset `name` (see :mod:`zoo.data.graphs`)."""
    return GraphDataModule(flag=name, **kwargs)


__all__ = [
    "DatasetNotFoundError",
    "GraphDataModule",
    "create_graph_datamodule",
    "MedMNISTDataModule",
    "SyntheticDataModule",
    "available_datasets",
    "create_datamodule",
    "denormalize",
    "make_synthetic",
    "normalize",
]
