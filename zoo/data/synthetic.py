"""The synthetic benchmark as a datamodule: :func:`zoo.data.synthetic_images.make_synthetic` drawn
once per split (train/val/test, independent seeds), with evidence masks and part keypoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.data.common import BaseDataModule, DictDataset, normalize, subset_indices
from zoo.data.medmnist import MedMNISTDataModule, default_root
from zoo.data.synthetic_images import (
    EVIDENCE_KEYPOINTS,
    INTERACTION_KEYPOINTS,
    MODES,
    _check_args,
    class_names,
    make_synthetic,
)


class SyntheticDataModule(BaseDataModule):
    """Lightning datamodule over :func:`make_synthetic` (train/val/test).

    Batches: ``image`` (B, C, H, W) in [-1, 1], ``label`` (B,) long, ``index``
    (B,), ``mask`` (B, 1, H, W) 0/1 and ``keypoints`` (B, P, 3).
    ``num_classes=None`` means 4 for evidence and 2 for interaction mode.
    Splits use seeds ``seed*1000 + {0, 1, 2}`` (independent draws).
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        num_classes: int | None = None,
        mode: str = "evidence",
        n_train: int = 4000,
        n_val: int = 500,
        n_test: int = 1000,
        distractors: int = 2,
        noise: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if mode not in MODES:  # checked before num_classes so the message lists the modes
            raise ValueError(f"unknown mode {mode!r}; available modes: {list(MODES)}")
        if num_classes is None:
            num_classes = 2 if mode == "interaction" else 4
        _check_args(image_size, channels, num_classes, mode, distractors, noise)
        for arg, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if value < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        self.save_hyperparameters()
        self.mode = mode
        self.num_classes = int(num_classes)
        self.in_channels = int(channels)
        self.image_size = int(image_size)
        self.task = "multiclass"
        self.class_names = class_names(mode, self.num_classes)
        self.name = "synthetic" if mode == "evidence" else "synthetic-interaction"
        self.keypoint_names = list(EVIDENCE_KEYPOINTS if mode == "evidence" else INTERACTION_KEYPOINTS)
        self.distractors = int(distractors)
        self.noise = float(noise)
        self._sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        self._subsets = {"train": train_subset, "val": val_subset, "test": test_subset}
        self._data: dict[str, dict[str, torch.Tensor]] = {}  # split -> raw generated tensors

    def raw(self, split: str) -> dict[str, torch.Tensor]:
        """The generated tensors of a full split (images in [0, 1]), see make_synthetic."""
        self.dataset(split)
        return self._data[split]

    def contrast_images(self, n: int, channels: int, size: int, seed: int = 0) -> dict[str, Tensor]:
        """PneumoniaMNIST test images resized to this geometry, when its file is found ($ZOO_DATA_DIR)."""
        root = default_root()
        if not (root / "pneumoniamnist.npz").is_file():
            return {}
        dm = MedMNISTDataModule(flag="pneumoniamnist", root=str(root), image_size=28, as_rgb=channels == 3)
        test = dm.dataset("test")
        images = torch.stack([test[i]["image"] for i in range(min(n, len(test)))])
        return {"pneumoniamnist": F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)}

    def setup(self, stage: str | None = None) -> None:
        for i, split in enumerate(("train", "val", "test")):
            if split in self._datasets:  # idempotent: generate once per instance
                continue
            data = make_synthetic(
                self._sizes[split],
                image_size=self.image_size,
                channels=self.in_channels,
                num_classes=self.num_classes,
                seed=self.seed * 1000 + i,
                mode=self.mode,
                distractors=self.distractors,
                noise=self.noise,
            )
            self._data[split] = data
            tensors = {
                "image": normalize(data["images"]),
                "label": data["labels"],
                "mask": data["masks"],
                "keypoints": data["keypoints"],
            }
            idx = subset_indices(self._sizes[split], self._subsets[split], self.seed + i)
            self._datasets[split] = DictDataset(tensors, idx)


__all__ = ["SyntheticDataModule"]
