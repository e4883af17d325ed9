"""Tests of zoo.data: the synthetic generator's ground truth and both datamodules."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.data import (
    DatasetNotFoundError,
    MedMNISTDataModule,
    SyntheticDataModule,
    create_datamodule,
    make_synthetic,
)

SHARED_MEDMNIST = Path(os.environ.get("ZOO_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared/data/medmnist")


def _needs_file(name: str) -> Path:
    if not (SHARED_MEDMNIST / name).is_file():
        pytest.skip(f"{SHARED_MEDMNIST / name} not available")
    return SHARED_MEDMNIST


# ---------------------------------------------------------------------------
# make_synthetic
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_synthetic_shapes_dtypes_ranges(channels: int) -> None:
    d = make_synthetic(48, image_size=32, channels=channels, num_classes=6, seed=1)
    assert d["images"].shape == (48, channels, 32, 32) and d["images"].dtype == torch.float32
    assert d["images"].min() >= 0 and d["images"].max() <= 1
    assert d["labels"].shape == (48,) and d["labels"].dtype == torch.long
    assert set(d["labels"].tolist()) == set(range(6))
    assert d["masks"].shape == (48, 1, 32, 32)
    assert set(d["masks"].unique().tolist()) <= {0.0, 1.0}
    assert (d["masks"].sum((1, 2, 3)) > 0).all()  # every image has its evidence
    assert d["keypoints"].shape == (48, 5, 3)
    assert (d["keypoints"][..., 2] == 1).all()


def test_synthetic_seed_determinism() -> None:
    a = make_synthetic(32, seed=3)
    b = make_synthetic(32, seed=3)
    c = make_synthetic(32, seed=4)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["images"], c["images"])
    assert not torch.equal(a["masks"], c["masks"])


@pytest.mark.parametrize("mode,num_classes,channels", [("evidence", 6, 1), ("evidence", 4, 3), ("interaction", 2, 1)])
def test_mask_is_exactly_the_evidence_pixels(mode: str, num_classes: int, channels: int) -> None:
    d = make_synthetic(64, channels=channels, num_classes=num_classes, mode=mode, noise=0.0, return_layers=True)
    # Rendering without the evidence object changes exactly the mask pixels.
    without = (d["background"] + d["distractor_layer"]).clamp(0, 1)
    changed = (d["images"] != without).any(1, keepdim=True).float()
    assert torch.equal(changed, d["masks"])
    # Distractors are present but never touch the evidence.
    assert d["distractor_masks"].sum() > 0
    assert (d["distractor_masks"] * d["masks"]).sum() == 0


def test_layers_compose_the_noisy_image() -> None:
    d = make_synthetic(32, noise=0.1, return_layers=True)
    total = d["background"] + d["distractor_layer"] + d["evidence_layer"] + d["noise_layer"]
    assert torch.equal(d["images"], total.clamp(0, 1))
    assert torch.equal((d["evidence_layer"] != 0).any(1, keepdim=True).float(), d["masks"])
    # Evidence is brighter than the background it sits on (positive contrast).
    assert (d["evidence_layer"][d["masks"].bool().expand_as(d["evidence_layer"])] >= 0.35 - 1e-6).all()


def _in_mask(mask: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mask (N, H, W); whether pixel (round(y), round(x)) is set, per sample."""
    xi, yi = x.round().long(), y.round().long()
    return mask[torch.arange(len(mask)), yi, xi].bool()


def test_keypoints_lie_on_the_evidence() -> None:
    d = make_synthetic(120, image_size=32, num_classes=6, seed=5)
    mask = d["masks"][:, 0]  # (N, H, W)
    kp = d["keypoints"]  # (N, 5, 3): centre, top, bottom, left, right
    for p in range(5):
        x, y = kp[:, p, 0], kp[:, p, 1]
        # Half-pixel extremes lie between two mask pixels: check both neighbours.
        assert _in_mask(mask, x.floor(), y.floor()).all(), p
        assert _in_mask(mask, x.ceil(), y.ceil()).all(), p
    rows = mask.any(2).float()  # (N, H)
    cols = mask.any(1).float()
    idx = torch.arange(32, dtype=torch.float32)
    assert torch.equal(kp[:, 1, 1], rows.argmax(1).float())  # top = first mask row
    assert torch.equal(kp[:, 2, 1], (rows * idx).amax(1))  # bottom = last mask row
    assert torch.equal(kp[:, 3, 0], cols.argmax(1).float())  # left = first mask column
    assert torch.equal(kp[:, 4, 0], (cols * idx).amax(1))  # right = last mask column


def test_interaction_labels_are_xor_of_parts() -> None:
    d = make_synthetic(200, num_classes=2, mode="interaction", seed=2)
    vis = d["keypoints"][..., 2]  # (N, 2): part A, part B present
    assert d["keypoints"].shape == (200, 2, 3)
    assert torch.equal(d["labels"], (vis[:, 0] != vis[:, 1]).long())
    empty = d["masks"].sum((1, 2, 3)) == 0
    assert torch.equal(empty, vis.sum(1) == 0)
    # Present parts' centres are on the mask.
    present = vis.bool()
    mask = d["masks"][:, 0]
    for p in range(2):
        rows = present[:, p]
        assert _in_mask(mask[rows], d["keypoints"][rows, p, 0], d["keypoints"][rows, p, 1]).all()
    # All four presence patterns occur equally often.
    pattern = (vis[:, 0] + 2 * vis[:, 1]).long()
    assert torch.bincount(pattern, minlength=4).tolist() == [50, 50, 50, 50]


def test_class_balance() -> None:
    labels = make_synthetic(600, num_classes=6, seed=7)["labels"]
    assert torch.bincount(labels, minlength=6).tolist() == [100] * 6
    labels = make_synthetic(301, num_classes=4, seed=7)["labels"]
    counts = torch.bincount(labels, minlength=4)
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("size", [16, 64])
def test_other_image_sizes(size: int) -> None:
    d = make_synthetic(16, image_size=size, num_classes=6, mode="evidence", noise=0.0, return_layers=True)
    assert d["images"].shape == (16, 1, size, size)
    assert (d["masks"].sum((1, 2, 3)) > 0).all()
    assert (d["distractor_masks"] * d["masks"]).sum() == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"image_size": 8}, "image_size"),
        ({"image_size": 300}, "image_size"),
        ({"channels": 2}, "channels"),
        ({"num_classes": 7}, "num_classes"),
        ({"num_classes": 1}, "num_classes"),
        ({"mode": "interaction", "num_classes": 3}, "num_classes"),
        ({"mode": "nope"}, "evidence"),
        ({"noise": -0.1}, "noise"),
        ({"distractors": -1}, "distractors"),
    ],
)
def test_synthetic_argument_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_synthetic(4, **kwargs)
    with pytest.raises(ValueError, match=match):
        SyntheticDataModule(**kwargs)


# ---------------------------------------------------------------------------
# SyntheticDataModule
# ---------------------------------------------------------------------------
def _small_dm(**kwargs) -> SyntheticDataModule:
    base = dict(n_train=96, n_val=40, n_test=40, batch_size=16)
    base.update(kwargs)
    return SyntheticDataModule(**base)


def test_synthetic_datamodule_attributes_before_setup() -> None:
    dm = _small_dm(channels=3, num_classes=5)
    assert (dm.num_classes, dm.in_channels, dm.image_size, dm.task) == (5, 3, 32, "multiclass")
    assert dm.class_names == ["square", "disc", "triangle", "cross", "diamond"]
    assert dm.name == "synthetic"
    dm = _small_dm(mode="interaction", num_classes=None)
    assert (dm.num_classes, dm.name, len(dm.class_names)) == (2, "synthetic-interaction", 2)


def test_synthetic_datamodule_batches() -> None:
    dm = _small_dm()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index", "mask", "keypoints"}
    assert batch["image"].shape == (16, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["label"].shape == (16,) and batch["label"].dtype == torch.long
    assert batch["index"].dtype == torch.long
    assert batch["mask"].shape == (16, 1, 32, 32)
    assert batch["keypoints"].shape == (16, 5, 3)
    # The batch is the stored sample at `index`, and denormalize undoes the scaling.
    raw = dm.raw("train")
    assert torch.allclose(dm.denormalize(batch["image"]), raw["images"][batch["index"]], atol=1e-6)
    assert torch.equal(batch["label"], raw["labels"][batch["index"]])
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(val["index"], torch.arange(16))  # no shuffling outside training


def test_synthetic_datamodule_setup_idempotent_and_seeded() -> None:
    dm = _small_dm(seed=1)
    dm.setup()
    train = dm.dataset("train")
    dm.setup("fit")
    assert dm.dataset("train") is train
    assert len(dm.dataset("val")) == 40 and len(dm.dataset("test")) == 40
    # Splits come from different seeds.
    assert not torch.equal(dm.raw("train")["images"][:40], dm.raw("test")["images"])
    # Same seed -> same data and same shuffle order; different seed -> different.
    again = _small_dm(seed=1)
    b1, b2 = next(iter(dm.train_dataloader())), next(iter(again.train_dataloader()))
    assert torch.equal(b1["index"], b2["index"]) and torch.equal(b1["image"], b2["image"])
    other = _small_dm(seed=2)
    assert not torch.equal(dm.raw("train")["images"], other.raw("train")["images"])


def test_train_subset() -> None:
    dm = _small_dm(train_subset=20, test_subset=10)
    assert len(dm.dataset("train")) == 20
    assert len(dm.dataset("val")) == 40
    assert len(dm.dataset("test")) == 10
    idx = torch.stack([dm.dataset("train")[i]["index"] for i in range(20)])
    assert idx.unique().numel() == 20 and idx.max() < 96


def test_dataset_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        _small_dm().dataset("holdout")


def test_create_datamodule_and_hydra_instantiate() -> None:
    dm = create_datamodule("synthetic", n_train=8, n_val=8, n_test=8)
    assert isinstance(dm, SyntheticDataModule) and dm.mode == "evidence"
    dm = create_datamodule("synthetic-interaction", n_train=8, n_val=8, n_test=8)
    assert dm.mode == "interaction" and dm.num_classes == 2
    with pytest.raises(ValueError, match=r"unknown dataset 'x'; available: .*synthetic.*breastmnist"):
        create_datamodule("x")
    hydra_utils = pytest.importorskip("hydra.utils")
    cfg = {"_target_": "zoo.data.SyntheticDataModule", "n_train": 8, "n_val": 8, "n_test": 8, "train_subset": None}
    assert isinstance(hydra_utils.instantiate(cfg), SyntheticDataModule)


# ---------------------------------------------------------------------------
# MedMNISTDataModule
# ---------------------------------------------------------------------------
def test_breastmnist_from_shared_folder() -> None:
    root = _needs_file("breastmnist.npz")
    from medmnist import INFO

    dm = MedMNISTDataModule("breastmnist", root=str(root), batch_size=32)
    assert (dm.num_classes, dm.in_channels, dm.image_size, dm.task) == (2, 1, 28, "multiclass")
    assert dm.class_names == ["malignant", "normal, benign"] and dm.name == "breastmnist"
    dm.setup()
    for split, n in (("train", 546), ("val", 78), ("test", 156)):
        assert len(dm.dataset(split)) == n == INFO["breastmnist"]["n_samples"][split]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].shape == (32, 1, 28, 28) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["label"].shape == (32,) and batch["label"].dtype == torch.long
    labels = dm.raw("train")["label"]
    assert labels.min() == 0 and labels.max() == 1
    assert torch.bincount(labels).tolist() == [147, 399]  # official class counts (PROVENANCE.md)


def test_medmnist_rgb_and_subset() -> None:
    root = _needs_file("retinamnist.npz")
    dm = MedMNISTDataModule("retinamnist", root=str(root), train_subset=50)
    assert dm.in_channels == 3 and dm.num_classes == 5 and dm.task == "multiclass"
    assert len(dm.dataset("train")) == 50 and len(dm.dataset("test")) == 400
    assert dm.dataset("train")[0]["image"].shape == (3, 28, 28)
    root = _needs_file("breastmnist.npz")
    dm = MedMNISTDataModule("breastmnist", root=str(root), as_rgb=True)
    x = dm.dataset("val")[0]["image"]
    assert dm.in_channels == 3 and x.shape == (3, 28, 28) and torch.equal(x[0], x[2])


def test_medmnist_missing_file_error(tmp_path: Path) -> None:
    missing = tmp_path / "nothing_here"
    with pytest.raises(DatasetNotFoundError) as err:
        MedMNISTDataModule("pneumoniamnist", root=str(missing))
    msg = str(err.value)
    assert str(missing / "pneumoniamnist.npz") in msg and "ZOO_DATA_DIR" in msg and "download" in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError, match="pneumoniamnist_64.npz"):
        MedMNISTDataModule("pneumoniamnist", image_size=64, root=str(tmp_path))


def test_medmnist_root_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
        MedMNISTDataModule("breastmnist")


def test_medmnist_bad_flags() -> None:
    with pytest.raises(ValueError, match="available 2D flags: .*pneumoniamnist"):
        MedMNISTDataModule("notmnist")
    with pytest.raises(ValueError, match="3D"):
        MedMNISTDataModule("organmnist3d")
    with pytest.raises(ValueError, match=r"image_size must be one of \[28, 64, 128, 224\] for MedMNIST, got 32"):
        MedMNISTDataModule("breastmnist", image_size=32)


def _write_fake_npz(path: Path, n: int, shape: tuple[int, ...], n_labels: int, n_classes: int) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, n_classes, (n, n_labels), dtype=np.uint8)
    np.savez(path, **arrays)


def test_medmnist_multilabel_and_size_naming(tmp_path: Path) -> None:
    # A tiny stand-in with the official keys: exercises ChestMNIST's multi-label
    # path and the <flag>_<size>.npz naming without the real (large) files.
    _write_fake_npz(tmp_path / "chestmnist_64.npz", n=10, shape=(64, 64), n_labels=14, n_classes=2)
    dm = MedMNISTDataModule("chestmnist", image_size=64, root=str(tmp_path), batch_size=4)
    assert dm.task == "multilabel" and dm.num_classes == 14 and dm.image_size == 64
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 64, 64)
    assert batch["label"].shape == (4, 14) and batch["label"].dtype == torch.float32
    assert set(batch["label"].unique().tolist()) <= {0.0, 1.0}
    # And a create_datamodule round trip for an RGB flag.
    _write_fake_npz(tmp_path / "bloodmnist.npz", n=6, shape=(28, 28, 3), n_labels=1, n_classes=8)
    dm = create_datamodule("bloodmnist", root=str(tmp_path), batch_size=6)
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (6, 3, 28, 28) and batch["label"].shape == (6,)
