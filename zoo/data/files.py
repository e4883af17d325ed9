"""Users' own data as zoo datamodules: an image folder, a CSV of image paths, or an NPZ of arrays.

* :class:`FolderDataModule` — the ImageFolder layout ``root/<class>/*.png|jpg|…`` (torchvision's
  ``find_classes``/``make_dataset``: classes are the sorted sub-folder names). Splits: ``root/train``,
  ``root/val``, ``root/test`` when ``root/train`` exists (a missing val/test is carved from train),
  else one seeded stratified split of everything.
* :class:`CSVDataModule` — a CSV with a ``path`` column (relative to the CSV's folder or
  ``image_root``) and either a ``label`` column (class names or ints, one per row → multiclass) or
  ``label_columns`` (0/1 each → multilabel, class names = the column names); optional ``split`` column.
* :class:`NPZDataModule` — MedMNIST-style arrays: ``train_images``/``train_labels``, ``val_*``,
  ``test_*`` (images (N,H,W) or (N,H,W,C) uint8; labels (N,)/(N,1) → multiclass, (N,K) 0/1 → multilabel),
  optional ``<split>_masks``.

All three share one reader: the image is converted to ``channels`` (1: PIL "L", 3: "RGB"; default
from the first image), its shorter side resized to ``image_size`` (bilinear, antialiased; default:
the first image's shorter side), then centre-cropped to a square. Masks (``mask_root``: the same
relative paths, PNG, nonzero = evidence) take the same resize with nearest interpolation.

Memory: images are decoded once, in ``setup``, and kept as uint8 (N,C,S,S), converted to [-1, 1]
floats per item like MedMNIST — 4x smaller than floats (CUB-200 at 224 px: 1.8 GB), and an unreadable
file is one clear error before the first epoch rather than a crash mid-training.

Bad input is one error naming the file or folder: a missing root, an unreadable image, a missing
label column, an empty class folder, a missing mask.

One module, over 400 lines: the three formats share the reader, the split and the error wording, which
would otherwise be spread over three modules importing each other's internals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from zoo.data.common import SPLITS, BaseDataModule, DatasetNotFoundError, DictDataset, normalize

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------- reading
def image_channels(path: Path) -> int:
    """1 for a grey-level file (PIL modes 1, L, LA, I, I;16, F), else 3."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = img.mode
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError… for broken files
        raise ValueError(f"{path}: unreadable image ({err})") from None
    return 1 if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") else 3


def image_side(path: Path) -> int:
    """The shorter side of an image file, in pixels."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return min(img.size)
    except Exception as err:
        raise ValueError(f"{path}: unreadable image ({err})") from None


def _square(t: torch.Tensor, size: int, nearest: bool) -> torch.Tensor:
    """(C,H,W) uint8 → shorter side resized to ``size``, centre crop to (C,size,size)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if min(t.shape[-2:]) != size:
        mode = InterpolationMode.NEAREST if nearest else InterpolationMode.BILINEAR
        t = TF.resize(t, [size], interpolation=mode, antialias=not nearest)
    return TF.center_crop(t, [size, size])


def read_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """One image file as uint8 (channels, size, size); see the module docstring for the geometry."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I"):  # 16-bit PNGs: PIL's convert("L") clips instead of scaling
                arr = np.asarray(img, dtype=np.float64) / 257.0
                img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
            img = img.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as err:
        raise ValueError(f"{path}: unreadable image ({err})") from None
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return _square(t.contiguous(), size, nearest=False)


def read_mask(path: Path, size: int) -> torch.Tensor:
    """A mask file as uint8 (1, size, size) in {0, 1}: nonzero pixels are evidence."""
    from PIL import Image

    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: mask not found (mask_root holds one mask per image, same relative path)")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L"), dtype=np.uint8)
    except Exception as err:
        raise ValueError(f"{path}: unreadable mask ({err})") from None
    t = torch.from_numpy((arr > 0).astype(np.uint8)).unsqueeze(0)
    return _square(t, size, nearest=True)


def mask_path(mask_root: Path, relative: Path) -> Path:
    """The mask of an image: the same relative path under ``mask_root``, else that path with ``.png``."""
    exact = mask_root / relative
    return exact if exact.is_file() else exact.with_suffix(".png")


# ------------------------------------------------------------------------------------------ splits
def seeded_split(strata: Sequence[int], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """A split name per item, stratified by ``strata`` (class index; one stratum for multilabel): in
    each stratum a seeded permutation, the first round(n·test_fraction) to test, the next
    round(n·val_fraction) to val, the rest (at least one) to train. Hand-written because sklearn's
    ``train_test_split`` refuses classes of one image and needs two calls for three splits."""
    strata = np.asarray(strata)
    out = np.full(len(strata), "train", dtype=object)
    rng = np.random.default_rng(seed)
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        idx = idx[rng.permutation(len(idx))]
        n_test = min(int(round(len(idx) * test_fraction)), max(len(idx) - 1, 0))
        n_val = min(int(round(len(idx) * val_fraction)), max(len(idx) - 1 - n_test, 0))
        out[idx[:n_test]] = "test"
        out[idx[n_test:n_test + n_val]] = "val"
    return list(out)


class _ItemDataset(DictDataset):
    """DictDataset whose uint8 masks become float {0, 1} per item (stored as uint8: 4x smaller)."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        if "mask" in item:
            item["mask"] = item["mask"].float()
        return item


def _to_model_input(img: torch.Tensor) -> torch.Tensor:
    return normalize(img.float() / 255.0)


class _FileDataModule(BaseDataModule):
    """Shared by the three: items are (file, label, split); ``setup`` decodes each split once."""

    def __init__(self, image_size: int | None, channels: int | None, val_fraction: float, test_fraction: float,
                 batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or null (from the data), got {channels}")
        if image_size is not None and image_size < 2:
            raise ValueError(f"image_size must be >= 2 or null (from the data), got {image_size}")
        for arg, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{arg} must be in [0, 1), got {value}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.mask_root: Path | None = None
        self.items: list[tuple[Path, Any, str]] = []  # (image file, label, split)

    def _finish(self, source: Path, image_size: int | None, channels: int | None) -> None:
        """Geometry from the first image, every split non-empty."""
        if not self.items:
            raise DatasetNotFoundError(f"{source}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        first = self.items[0][0]
        self.in_channels = int(channels) if channels is not None else image_channels(first)
        self.image_size = int(image_size) if image_size is not None else image_side(first)
        self.num_classes = len(self.class_names)
        if self.num_classes < 2:
            raise ValueError(f"{source}: needs at least 2 classes, found {self.class_names}")
        counts = {s: sum(1 for _, _, split in self.items if split == s) for s in SPLITS}
        empty = [s for s, n in counts.items() if n == 0]
        if empty:
            raise ValueError(f"{source}: split(s) {empty} hold no image ({counts}); add images or "
                             "change val_fraction/test_fraction")

    def _relative(self, path: Path) -> Path:
        return path.relative_to(self.image_root)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split in self._datasets:  # idempotent
                continue
            rows = [(p, y) for p, y, s in self.items if s == split]
            tensors = {"image": torch.stack([read_image(p, self.in_channels, self.image_size) for p, _ in rows]),
                       "label": self._labels([y for _, y in rows])}
            if self.mask_root is not None:
                tensors["mask"] = torch.stack([read_mask(mask_path(self.mask_root, self._relative(p)), self.image_size)
                                               for p, _ in rows])
            self._datasets[split] = _ItemDataset(tensors, image_transform=_to_model_input)

    def _labels(self, labels: list) -> torch.Tensor:
        if self.task == "multilabel":
            return torch.tensor(np.asarray(labels, dtype=np.float32))
        return torch.tensor(labels, dtype=torch.long)


def _existing_root(root: str | Path, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(f"{path}: {what} not found")
    return path


def _mask_root(mask_root: str | None) -> Path | None:
    return None if mask_root is None else _existing_root(mask_root, "mask_root folder")


# ------------------------------------------------------------------------------------------ folder
class FolderDataModule(_FileDataModule):
    """Images in class sub-folders (see the module docstring). ``name`` defaults to the folder's name."""

    def __init__(
        self,
        root: str,
        mask_root: str | None = None,
        image_size: int | None = None,  # None: the first image's shorter side
        channels: int | None = None,  # None: from the first image (grey → 1, colour → 3)
        val_fraction: float = 0.1,  # carved from train (per class, seeded) when there is no val folder
        test_fraction: float = 0.2,  # likewise when there is no test folder
        name: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(image_size, channels, val_fraction, test_fraction, batch_size, num_workers, seed)
        self.root = self.image_root = _existing_root(root, "image folder")
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: not a folder (data=folder expects root/<class>/*.png)")
        self.mask_root = _mask_root(mask_root)
        self.task, self.name = "multiclass", name or self.root.name
        split_dirs = {s: self.root / s for s in SPLITS if (self.root / s).is_dir()}
        if split_dirs and "train" not in split_dirs:
            raise ValueError(f"{self.root}: has {sorted(split_dirs)} sub-folders but no train/")
        top = split_dirs.get("train", self.root)
        self.class_names = self._classes(top)
        index = {c: k for k, c in enumerate(self.class_names)}
        if split_dirs:
            for split, folder in split_dirs.items():
                extra = sorted(set(self._classes(folder)) - set(index))
                if extra:
                    raise ValueError(f"{folder}: classes {extra} are not in {top}")
                self.items += [(p, y, split) for p, y in self._files(folder, index)]
            train = [i for i, (_, _, s) in enumerate(self.items) if s == "train"]
            fractions = (0.0 if "val" in split_dirs else self.val_fraction,
                         0.0 if "test" in split_dirs else self.test_fraction)
            carved = seeded_split([self.items[i][1] for i in train], *fractions, seed=self.seed)
            for i, split in zip(train, carved):
                self.items[i] = (self.items[i][0], self.items[i][1], split)
        else:
            files = self._files(self.root, index)
            splits = seeded_split([y for _, y in files], self.val_fraction, self.test_fraction, self.seed)
            self.items = [(p, y, s) for (p, y), s in zip(files, splits)]
        self._finish(self.root, image_size, channels)

    @staticmethod
    def _classes(folder: Path) -> list[str]:
        from torchvision.datasets.folder import find_classes

        try:
            return find_classes(str(folder))[0]
        except FileNotFoundError:
            raise DatasetNotFoundError(f"{folder}: no class sub-folders (data=folder expects "
                                       f"{folder}/<class>/*.png)") from None

    @staticmethod
    def _files(folder: Path, index: dict[str, int]) -> list[tuple[Path, int]]:
        from torchvision.datasets.folder import make_dataset

        present = {c: index[c] for c in index if (folder / c).is_dir()}
        found = make_dataset(str(folder), present, extensions=IMAGE_EXTENSIONS, allow_empty=True)
        used = {y for _, y in found}
        empty = [c for c, k in present.items() if k not in used]
        if empty:
            raise ValueError(f"{folder / empty[0]}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} file)"
                             + (f"; also empty: {empty[1:]}" if len(empty) > 1 else ""))
        return [(Path(p), int(y)) for p, y in found]


# --------------------------------------------------------------------------------------------- csv
class CSVDataModule(_FileDataModule):
    """Images listed in a CSV file (``root``); see the module docstring for its columns."""

    def __init__(
        self,
        root: str,  # the .csv file
        image_root: str | None = None,  # where the ``path`` column is relative to; None: the CSV's folder
        label_columns: list[str] | None = None,  # 0/1 columns → multilabel; None: the ``label`` column
        mask_root: str | None = None,
        image_size: int | None = None,  # None: the first image's shorter side
        channels: int | None = None,  # None: from the first image
        val_fraction: float = 0.1,  # without a ``split`` column: seeded split (stratified when single-label)
        test_fraction: float = 0.2,
        name: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        import pandas as pd

        super().__init__(image_size, channels, val_fraction, test_fraction, batch_size, num_workers, seed)
        self.root = _existing_root(root, "CSV file")
        self.image_root = Path(image_root).expanduser() if image_root is not None else self.root.parent
        self.mask_root = _mask_root(mask_root)
        self.name = name or self.root.stem
        try:
            table = pd.read_csv(self.root)
        except Exception as err:
            raise ValueError(f"{self.root}: unreadable CSV ({err})") from None
        needed = ["path", *(label_columns or ["label"])]
        missing = [c for c in needed if c not in table.columns]
        if missing:
            raise ValueError(f"{self.root}: missing column(s) {missing}; it has {list(table.columns)}")
        if label_columns:
            values = table[list(label_columns)]
            bad = ~values.isin([0, 1]).all(axis=1)
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise ValueError(f"{self.root}: label columns must be 0/1, row {row + 2} has "
                                 f"{values.iloc[row].tolist()}")
            self.task, self.class_names = "multilabel", [str(c) for c in label_columns]
            labels: list = values.to_numpy(dtype=np.float32).tolist()
            strata = [0] * len(labels)
        else:
            raw = table["label"]
            if raw.isna().any():
                raise ValueError(f"{self.root}: empty label in row {int(np.flatnonzero(raw.isna().to_numpy())[0]) + 2}")
            numeric = pd.api.types.is_integer_dtype(raw)
            names = sorted(raw.unique().tolist()) if numeric else sorted(raw.astype(str).unique().tolist())
            self.task, self.class_names = "multiclass", [str(n) for n in names]
            index = {n: k for k, n in enumerate(names)}
            labels = [index[v] for v in (raw.tolist() if numeric else raw.astype(str).tolist())]
            strata = labels
        paths = [self.image_root / str(p) for p in table["path"]]
        absent = [p for p in paths if not p.is_file()]
        if absent:
            raise DatasetNotFoundError(f"{absent[0]}: image listed in {self.root} not found"
                                       + (f" ({len(absent) - 1} more missing)" if len(absent) > 1 else ""))
        if "split" in table.columns:
            splits = table["split"].astype(str).str.strip().tolist()
            wrong = sorted(set(splits) - set(SPLITS))
            if wrong:
                raise ValueError(f"{self.root}: split column holds {wrong}; expected {list(SPLITS)}")
        else:
            splits = seeded_split(strata, self.val_fraction, self.test_fraction, self.seed)
        self.items = list(zip(paths, labels, splits))
        self._finish(self.root, image_size, channels)

    def _relative(self, path: Path) -> Path:
        return path.relative_to(self.image_root) if path.is_relative_to(self.image_root) else Path(path.name)


# --------------------------------------------------------------------------------------------- npz
class NPZDataModule(BaseDataModule):
    """MedMNIST-style arrays in one ``.npz`` file (``root``); see the module docstring for the keys."""

    def __init__(
        self,
        root: str,  # the .npz file
        class_names: list[str] | None = None,  # None: "0", "1", … (multiclass) or "label 0", … (multilabel)
        image_size: int | None = None,  # None: the stored side; otherwise resized (shorter side) + centre crop
        channels: int | None = None,  # None: as stored (N,H,W) → 1, (N,H,W,3) → 3
        val_fraction: float = 0.1,  # only used when the file has no val_* arrays
        name: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or null (from the data), got {channels}")
        self.root = _existing_root(root, "NPZ file")
        self.name = name or self.root.stem
        try:
            self._arrays = dict(np.load(self.root, allow_pickle=False))
        except Exception as err:
            raise ValueError(f"{self.root}: unreadable NPZ file ({err})") from None
        for key in ("train_images", "train_labels", "test_images", "test_labels"):
            if key not in self._arrays:
                raise ValueError(f"{self.root}: missing array {key!r}; it has {sorted(self._arrays)}")
        images, labels = self._arrays["train_images"], self._arrays["train_labels"]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
            raise ValueError(f"{self.root}: train_images must be (N,H,W) or (N,H,W,C) with C in 1/3, "
                             f"got {images.shape}")
        labels2d = labels.reshape(len(labels), -1)
        self.task = "multilabel" if labels2d.shape[1] > 1 else "multiclass"
        k = labels2d.shape[1] if self.task == "multilabel" else int(max(self._arrays[f"{s}_labels"].max()
                                                                         for s in SPLITS if f"{s}_labels" in self._arrays)) + 1
        if class_names is not None and len(class_names) != k:
            raise ValueError(f"{self.root}: {len(class_names)} class_names given, the labels have {k} classes")
        self.class_names = [str(c) for c in class_names] if class_names else \
            [f"label {i}" if self.task == "multilabel" else str(i) for i in range(k)]
        self.num_classes = k
        stored = 1 if images.ndim == 3 or images.shape[-1] == 1 else 3
        self.in_channels = int(channels) if channels is not None else stored
        self.image_size = int(image_size) if image_size is not None else int(min(images.shape[1:3]))
        if self.num_classes < 2:
            raise ValueError(f"{self.root}: needs at least 2 classes, the labels have {self.num_classes}")
        self.val_fraction = float(val_fraction)

    def _load(self, split: str) -> dict[str, torch.Tensor]:
        """The stored arrays of ``split`` as uint8 (N,C,S,S) images, labels and optional masks."""
        from torchvision.transforms.v2 import functional as TF

        a = self._arrays
        imgs = torch.from_numpy(np.ascontiguousarray(a[f"{split}_images"]).astype(np.uint8, copy=False))
        imgs = imgs.unsqueeze(1) if imgs.ndim == 3 else imgs.permute(0, 3, 1, 2).contiguous()
        if imgs.shape[1] != self.in_channels:
            imgs = imgs.expand(-1, 3, -1, -1).contiguous() if self.in_channels == 3 else TF.rgb_to_grayscale(imgs)
        labels = torch.from_numpy(a[f"{split}_labels"].reshape(len(imgs), -1).astype(np.int64))
        out = {"image": _square(imgs, self.image_size, nearest=False),
               "label": labels.float() if self.task == "multilabel" else labels.reshape(-1)}
        if f"{split}_masks" in a:
            masks = torch.from_numpy((a[f"{split}_masks"] > 0).astype(np.uint8)).reshape(len(imgs), 1, *imgs.shape[-2:])
            out["mask"] = _square(masks, self.image_size, nearest=True)
        return out

    def setup(self, stage: str | None = None) -> None:
        if self._datasets:  # idempotent
            return
        tensors = {s: self._load(s) for s in SPLITS if f"{s}_images" in self._arrays}
        if "val" not in tensors:  # carved from train: seeded, stratified when single-label
            train = tensors.pop("train")
            strata = [0] * len(train["label"]) if self.task == "multilabel" else train["label"].tolist()
            splits = np.asarray(seeded_split(strata, self.val_fraction, 0.0, self.seed))
            for s in ("train", "val"):
                keep = torch.from_numpy(splits == s)
                tensors[s] = {k: v[keep] for k, v in train.items()}
        for split in SPLITS:
            self._datasets[split] = _ItemDataset(tensors[split], image_transform=_to_model_input)


__all__ = ["CSVDataModule", "FolderDataModule", "IMAGE_EXTENSIONS", "NPZDataModule", "read_image", "seeded_split"]
