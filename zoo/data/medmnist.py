"""MedMNIST v2 (2D subsets) as a zoo datamodule.

Why: MedMNIST gives small, standardised medical benchmarks (28-224 px) on
which the zoo's models can be compared with published ResNet baselines, on a
CPU. Files are read through the ``medmnist`` package (its naming and split
keys), but the image/label arrays are converted to tensors once instead of
going through per-item PIL transforms.

The data are never downloaded implicitly: a missing file raises
:class:`~zoo.data.common.DatasetNotFoundError` at construction time, naming
the path looked for and how to provide it.

Data: Yang, J., Shi, R., Wei, D., Liu, Z., Zhao, L., Ke, B., Pfister, H., Ni, B.
"MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical
image classification." Scientific Data 10, 41 (2023). Licence CC BY 4.0 for
most subsets (DermaMNIST CC BY-NC 4.0, ChestMNIST CC0 1.0, TissueMNIST
CC BY 3.0); cite each subset's source dataset too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.data.common import (
    SPLITS,
    BaseDataModule,
    DatasetNotFoundError,
    DictDataset,
    normalize,
    subset_indices,
)
from zoo.data.synthetic_images import make_synthetic

SIZES: tuple[int, ...] = (28, 64, 128, 224)
ENV_VAR = "ZOO_DATA_DIR"


def _info() -> dict[str, dict[str, Any]]:
    # Imported lazily: ``import medmnist`` pulls in its evaluator and creates
    # ~/.medmnist, which plain ``import zoo.data`` should not do.
    from medmnist.info import INFO

    return INFO


def available_flags() -> list[str]:
    """The 2D MedMNIST subsets (3D volumes are out of scope for these models)."""
    return sorted(flag for flag, info in _info().items() if not info["python_class"].endswith("3D"))


def is_medmnist_flag(flag: str) -> bool:
    """Whether ``flag`` names any MedMNIST subset (2D or 3D)."""
    return flag in _info()


def default_root() -> Path:
    """``$ZOO_DATA_DIR`` if set, else medmnist's own default ``~/.medmnist``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path("~/.medmnist").expanduser()


def npz_filename(flag: str, size: int) -> str:
    """The file medmnist reads: ``<flag>.npz`` at 28 px, ``<flag>_<size>.npz`` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def _label_task(task: str) -> str:
    """Map MedMNIST's task string to the zoo's "multiclass" / "multilabel"."""
    if task.startswith("multi-label"):
        return "multilabel"
    # binary-class, multi-class and ordinal-regression are all single-label.
    return "multiclass"


class MedMNISTDataModule(BaseDataModule):
    """Any 2D MedMNIST subset, read from ``<root>/<flag>[_<size>].npz``.

    Batches: ``image`` (B, C, H, W) in [-1, 1]; ``label`` (B,) long for
    single-label subsets, (B, K) float 0/1 for ChestMNIST (multi-label);
    ``index`` (B,) the position in the split. ``root=None`` means
    ``$ZOO_DATA_DIR`` or ``~/.medmnist``. Construction checks the file exists
    (unless ``download=True``); ``setup`` loads the arrays.
    """

    def __init__(
        self,
        flag: str = "pneumoniamnist",
        image_size: int = 28,  # MedMNIST+ side: 28 (<flag>.npz), 64, 128 or 224 (<flag>_<side>.npz)
        root: str | None = None,
        download: bool = False,
        as_rgb: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        mmap: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        info_all = _info()
        if flag not in info_all or info_all[flag]["python_class"].endswith("3D"):
            kind = "3D subsets are not supported" if flag in info_all else "unknown MedMNIST flag"
            raise ValueError(f"{kind}: {flag!r}; available 2D flags: {', '.join(available_flags())}")
        if image_size not in SIZES:
            raise ValueError(f"image_size must be one of {list(SIZES)} for MedMNIST, got {image_size}")
        self.save_hyperparameters()
        info = info_all[flag]
        self.flag = flag
        self.info = info
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.download = bool(download)
        self.as_rgb = bool(as_rgb)
        self.mmap = bool(mmap)
        self.image_size = int(image_size)
        self.path = self.root / npz_filename(flag, self.image_size)
        self._subsets = {"train": train_subset, "val": val_subset, "test": test_subset}

        self.name = flag
        self.task = _label_task(info["task"])
        self.medmnist_task = info["task"]
        self.class_names = [info["label"][k] for k in sorted(info["label"], key=int)]
        self.num_classes = len(self.class_names)
        self.in_channels = 3 if self.as_rgb else int(info["n_channels"])
        self.license = info.get("license", "")

        # Fail now, with our own message, rather than deep inside medmnist in setup().
        if not self.download and not self.path.is_file():
            raise DatasetNotFoundError(
                f"MedMNIST dataset {flag!r} (image_size {self.image_size}) not found: looked for {self.path}. "
                f"Set {ENV_VAR} to a folder holding {self.path.name} (or pass root=...), "
                "or pass download=true (needs internet)."
            )

    # -- loading -----------------------------------------------------------
    def prepare_data(self) -> None:
        # Lightning runs this once per node: the only place a download may happen.
        if self.download:
            self._load_split("test")

    def _load_split(self, split: str) -> dict[str, torch.Tensor]:
        import medmnist

        self.root.mkdir(parents=True, exist_ok=True)  # medmnist refuses a missing root
        cls = getattr(medmnist, self.info["python_class"])
        ds = cls(
            split=split,
            root=str(self.root),
            download=self.download,
            size=self.image_size,
            as_rgb=False,  # channel replication is done here, on the tensor
            transform=None,
            mmap_mode="r" if self.mmap else None,
        )
        imgs = torch.from_numpy(np.ascontiguousarray(ds.imgs))  # (N, H, W) or (N, H, W, 3), uint8
        imgs = imgs.unsqueeze(1) if imgs.ndim == 3 else imgs.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
        if self.as_rgb and imgs.shape[1] == 1:
            imgs = imgs.expand(-1, 3, -1, -1).contiguous()
        labels = torch.from_numpy(np.asarray(ds.labels).astype(np.int64))  # (N, L)
        if self.task == "multilabel":
            labels = labels.float()  # (N, K) 0/1
        else:
            labels = labels.reshape(-1)  # (N,)
        return {"image": imgs, "label": labels}

    @staticmethod
    def _to_model_input(img: torch.Tensor) -> torch.Tensor:
        # uint8 stays uint8 in memory (4x smaller, matters at 224 px); convert per item.
        return normalize(img.float() / 255.0)

    def setup(self, stage: str | None = None) -> None:
        for i, split in enumerate(SPLITS):
            if split in self._datasets:  # idempotent
                continue
            tensors = self._load_split(split)
            idx = subset_indices(len(tensors["label"]), self._subsets[split], self.seed + i)
            self._datasets[split] = DictDataset(tensors, idx, image_transform=self._to_model_input)

    def raw(self, split: str) -> dict[str, torch.Tensor]:
        """Full-split tensors: ``image`` uint8 (N, C, H, W) and ``label`` as in batches."""
        return self.dataset(split).tensors  # type: ignore[attr-defined]

    def contrast_images(self, n: int, channels: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Synthetic evidence images at this geometry (4 classes, their own seed)."""
        data = make_synthetic(n, image_size=size, channels=channels, num_classes=4, seed=seed + 7)
        return {"synthetic": data["images"] * 2 - 1}  # [0,1] → the zoo's [-1,1]


__all__ = [
    "ENV_VAR",
    "SIZES",
    "MedMNISTDataModule",
    "available_flags",
    "default_root",
    "is_medmnist_flag",
    "npz_filename",
]
