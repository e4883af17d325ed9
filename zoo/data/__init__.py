"""Datamodules of the zoo: the embedded synthetic benchmark, MedMNIST and users' own files
(folder / CSV / NPZ, :mod:`zoo.data.files`).

All datamodules share one batch layout (see :mod:`zoo.data.common`):
``{"image": (B, C, H, W) in [-1, 1], "label": (B,) long or (B, K) float,
"index": (B,) long}``, plus ``mask``/``keypoints`` for synthetic data.
:func:`create_datamodule` builds one by name, e.g. for the CLI.
"""

from __future__ import annotations

from typing import Any

from zoo.data.catalog import SYNTHETIC_NAMES, available_datasets, create_datamodule
from zoo.data.common import DatasetNotFoundError, denormalize, normalize
from zoo.data.files import CSVDataModule, FolderDataModule, NPZDataModule
from zoo.data.graphs import GraphDataModule
from zoo.data.medmnist import MedMNISTDataModule, available_flags, is_medmnist_flag
from zoo.data.synthetic import SyntheticDataModule
from zoo.data.synthetic_images import make_synthetic


def create_graph_datamodule(name: str, **kwargs: Any) -> GraphDataModule:
    """A kNN image graph (one node per image) over dataset `name` (see :mod:`zoo.data.graphs`)."""
    return GraphDataModule(flag=name, **kwargs)


__all__ = [
    "SYNTHETIC_NAMES",
    "CSVDataModule",
    "FolderDataModule",
    "NPZDataModule",
    "DatasetNotFoundError",
    "GraphDataModule",
    "create_graph_datamodule",
    "MedMNISTDataModule",
    "SyntheticDataModule",
    "available_datasets",
    "available_flags",
    "is_medmnist_flag",
    "create_datamodule",
    "denormalize",
    "make_synthetic",
    "normalize",
]
