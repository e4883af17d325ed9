"""Pieces shared by the zoo's datamodules.

Every datamodule hands out batches with the same dict layout (``image`` in
[-1, 1], ``label``, ``index`` and optional extras such as ``mask``), so models,
metrics and explanation code never need to know which dataset they run on.
This module holds that convention in one place: the normalisation, the
dict-returning dataset, the seeded subset helper and the base datamodule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Images are stored in [0, 1] and fed to models as (x - MEAN) / STD, i.e. in [-1, 1].
MEAN: float = 0.5
STD: float = 0.5


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file is missing and downloading was not allowed."""


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Map images from [0, 1] to [-1, 1]."""
    return (x - MEAN) / STD


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Map normalised images back to [0, 1] (clamped), e.g. for plotting."""
    return (x * STD + MEAN).clamp(0.0, 1.0)


def subset_indices(n_total: int, n_subset: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded random subset of ``range(n_total)``.

    A random (not leading) subset keeps the class mix of the full split even
    when the stored order is sorted by class. ``None`` or a size >= n_total
    keeps everything.
    """
    if n_subset is None or n_subset >= n_total:
        return torch.arange(n_total)
    if n_subset < 1:
        raise ValueError(f"subset size must be >= 1 or None, got {n_subset}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n_subset].sort().values


class DictDataset(Dataset):
    """TensorDataset-like dataset whose items are dicts.

    ``tensors`` share their first dimension; ``indices`` selects the rows this
    dataset exposes (a subset), and ``item["index"]`` is the row's index in the
    full split so explanations can be traced back to the stored sample.
    ``image_key`` is passed through ``image_transform`` per item, which lets
    large uint8 image stores stay uint8 in memory (4x smaller than float).
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        indices: torch.Tensor | None = None,
        image_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        image_key: str = "image",
    ) -> None:
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"tensors must share their first dimension, got {lengths}")
        n = next(iter(lengths.values()))
        self.tensors = tensors
        self.indices = torch.arange(n) if indices is None else indices.long()
        self.image_transform = image_transform
        self.image_key = image_key

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.indices[i])
        item = {k: v[j] for k, v in self.tensors.items()}
        if self.image_transform is not None and self.image_key in item:
            item[self.image_key] = self.image_transform(item[self.image_key])
        item["index"] = torch.tensor(j, dtype=torch.long)
        return item


class EpochShuffleSampler(Sampler[int]):
    """The shuffled order of epoch ``e`` as a function of (seed, e) alone, so that a run resumed at
    epoch e sees the data in the order an uninterrupted run does (Lightning calls ``set_epoch``).

    The order equals what ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``
    gives in its e-th epoch under Lightning — that loader's generator, replayed: per epoch one int64
    draw (the workers' base seed), the permutation, and RandomSampler's trailing empty permutation when
    the last batch is a partial one (Lightning stops after ``len(loader)`` batches: with ``n`` a multiple
    of ``batch_size`` the sampler is never run to its end) — so earlier runs keep their data order.
    Like that generator, a pass without ``set_epoch`` before it (e.g. GdVAE's BatchNorm recalibration
    after fit) gets the next order."""

    def __init__(self, n: int, seed: int = 0, batch_size: int = 1) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self._partial_last_batch = self.n % int(batch_size) != 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch):
            torch.empty((), dtype=torch.int64).random_(generator=g)
            torch.randperm(self.n, generator=g)
            if self._partial_last_batch:
                torch.randperm(self.n, generator=g)
        torch.empty((), dtype=torch.int64).random_(generator=g)
        return iter(torch.randperm(self.n, generator=g).tolist())


class ShardSampler(DistributedSampler):
    """Evaluation under DDP: rank r reads items r, r + world, …, each item exactly once. (The
    DistributedSampler it refines pads the split with repeats, which would bias val/test metrics.)"""

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, shuffle=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class BaseDataModule(L.LightningDataModule):
    """Loaders, split access and ``denormalize`` shared by all datamodules.

    Subclasses set ``num_classes``, ``in_channels``, ``image_size``, ``task``,
    ``class_names`` and ``name`` in ``__init__`` and fill ``self._datasets``
    (split -> Dataset) in ``setup``.
    """

    num_classes: int
    in_channels: int
    image_size: int
    task: str
    class_names: list[str]
    name: str

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self._datasets: dict[str, Dataset] = {}

    # -- data access -------------------------------------------------------
    def dataset(self, split: str) -> Dataset:
        """The Dataset of ``split`` ("train", "val" or "test"); runs setup if needed."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        if split not in self._datasets:
            self.setup()
        return self._datasets[split]

    @staticmethod
    def denormalize(x: torch.Tensor) -> torch.Tensor:
        """Batch images back to [0, 1] for plotting."""
        return denormalize(x)

    # -- loaders -----------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:  # DDP: Lightning keeps a DistributedSampler it is given (set_epoch is called on it)
            sampler = DistributedSampler(dataset, shuffle=True, seed=self.seed) if shuffle else ShardSampler(dataset)
        else:
            sampler = EpochShuffleSampler(len(dataset), self.seed, self.batch_size) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # Only seeds the workers (the order is the sampler's): never draws from the global RNG.
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # -- optional hooks ----------------------------------------------------
    # zoo.training calls these on every datamodule (never probing for them); the defaults add nothing.
    input_kind: str = "image"  # what a batch holds: "image" (B,C,H,W), or "graph" (GraphDataModule)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Model sizes only the data knows, passed to the model besides the geometry (a graph's
        node-feature and context sizes)."""
        return {}

    def reference_rows(self) -> dict[str, dict[str, float]]:
        """Rows of a reference model the data was built with (the image CNN behind a graph)."""
        return {}

    def export(self, folder: str | Path) -> None:
        """Write what a saved model needs besides its weights next to it (a graph's recipe + encoder)."""

    def contrast_images(self, n: int, channels: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Images of *another* dataset at this geometry (name → (≤n,C,H,W) in [-1, 1]), e.g. the
        out-of-distribution set of an uncertainty report; {} where there is none."""
        return {}
