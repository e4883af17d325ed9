"""Users' own data from the CLI: data=folder / csv / npz (zoo/data/files.py), MedMNIST+ sizes, and the
class names / input convention a saved model carries. Every dataset here is written by the test."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

import zoo
from conftest import CONF, compose
from zoo.cli import user_errors
from zoo.data import CSVDataModule, FolderDataModule, NPZDataModule
from zoo.data.files import read_image, seeded_split
from zoo.training import train

FAST = ["trainer=fast", "callbacks=none", "logger=none", "evaluate.n_images=8", "evaluate.steps=4",
        "evaluate.posthoc=false", "evaluate.compare_baseline=false", "data.batch_size=8"]
CLASSES = ["benign", "malignant", "normal"]


def _pattern(k: int, side: int, rng) -> np.ndarray:
    """Class k: a bright square in corner k on noise — learnable, so a tiny run is not all chance."""
    img = rng.integers(0, 60, (side, side), dtype=np.uint8)
    h = side // 2
    y, x = divmod(k % 4, 2)
    img[y * h:(y + 1) * h, x * h:(x + 1) * h] = 220
    return img


def write_folder(root, classes=CLASSES, n=8, side=32, rgb=False, masks=None, seed=0):
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = _pattern(k, side, rng)
            Image.fromarray(np.stack([img] * 3, -1) if rgb else img).save(root / c / f"{i}.png")
            if masks is not None:
                (masks / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray((img > 100).astype(np.uint8) * 255).save(masks / c / f"{i}.png")
    return root


def write_csv(folder, n=24, side=32, seed=0):
    """Multi-label: columns a/b/c, image i shows the squares of its labels."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = ["path,a,b,c"]
    for i in range(n):
        labels = [(i >> j) & 1 for j in range(3)] if i % 8 else [1, 0, 0]
        img = rng.integers(0, 60, (side, side), dtype=np.uint8)
        for j, on in enumerate(labels):
            if on:
                img[j * 10:(j + 1) * 10, :] = 220
        Image.fromarray(img).save(folder / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{','.join(map(str, labels))}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def write_npz(path, side=64, n=(24, 8, 8), rgb=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, m in zip(("train", "val", "test"), n):
        labels = np.arange(m) % 2
        imgs = np.stack([_pattern(int(k), side, rng) for k in labels])
        arrays[f"{split}_images"] = np.stack([imgs] * 3, -1) if rgb else imgs
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------------- end to end (CLI)
def test_folder_trains_protopnet_and_carries_class_names(tmp_path):
    root = write_folder(tmp_path / "data")
    metrics = train(compose(["data=folder", f"data.root={root}", "model=protopnet", *FAST], tmp_path / "run"))
    assert 0.0 <= metrics["protopnet/acc"] <= 1.0
    model = zoo.load(tmp_path / "run" / "model")
    assert model.class_names == CLASSES
    config = yaml.safe_load((tmp_path / "run" / "model" / "config.yaml").read_text())
    assert config["hparams"]["class_names"] == CLASSES
    assert (config["hparams"]["image_size"], config["hparams"]["in_channels"]) == (32, 1)
    assert config["input"] == {"range": [-1.0, 1.0], "mean": 0.5, "std": 0.5}
    assert list((tmp_path / "run" / "figures").glob("*.png"))


def test_csv_multilabel_trains_patchnet(tmp_path):
    csv = write_csv(tmp_path / "data")
    metrics = train(compose(["data=csv", f"data.root={csv}", "data.label_columns=[a,b,c]", "model=patchnet",
                             *FAST], tmp_path / "run"))
    assert 0.0 <= metrics["patchnet/auroc"] <= 1.0
    model = zoo.load(tmp_path / "run" / "model")
    assert (model.task, model.class_names) == ("multilabel", ["a", "b", "c"])


def test_medmnist_64px_npz_trains(tmp_path):
    write_npz(tmp_path / "pneumoniamnist_64.npz", side=64)
    train(compose(["data=pneumoniamnist", "data.image_size=64", f"data.root={tmp_path}", "evaluate.explanations=false",
                   *FAST], tmp_path / "run"))
    model = zoo.load(tmp_path / "run" / "model")
    assert (model.image_size, model.class_names) == (64, ["normal", "pneumonia"])


# ------------------------------------------------------------------------------------ datamodules
def test_folder_split_subfolders_masks_and_rgb(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        write_folder(tmp_path / "d" / split, n=n, rgb=True, masks=tmp_path / "m" / split, seed=len(split))
    dm = FolderDataModule(root=str(tmp_path / "d"), mask_root=str(tmp_path / "m"), image_size=16)
    assert (dm.class_names, dm.in_channels, dm.image_size, dm.task) == (CLASSES, 3, 16, "multiclass")
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [18, 6, 9]
    item = dm.dataset("train")[0]
    assert item["image"].shape == (3, 16, 16) and -1.0 <= item["image"].min() <= item["image"].max() <= 1.0
    # benign's square is the top-left quarter; the mask (nearest resize) marks exactly that quarter
    assert item["label"] == 0 and item["mask"].dtype == torch.float32
    assert torch.equal(item["mask"][0, :8, :8], torch.ones(8, 8)) and item["mask"].sum() == 64
    gray = FolderDataModule(root=str(tmp_path / "d"), channels=1)
    assert gray.in_channels == 1 and gray.dataset("val")[0]["image"].shape == (1, 32, 32)


def test_seeded_split_is_stratified_and_reproducible():
    strata = [0] * 10 + [1] * 20 + [2]
    a = seeded_split(strata, 0.1, 0.2, seed=3)
    assert a == seeded_split(strata, 0.1, 0.2, seed=3) and a != seeded_split(strata, 0.1, 0.2, seed=4)
    count = lambda k, s: sum(1 for x, y in zip(strata, a) if x == k and y == s)  # noqa: E731
    assert [count(0, s) for s in ("train", "val", "test")] == [7, 1, 2]
    assert [count(1, s) for s in ("train", "val", "test")] == [14, 2, 4]
    assert count(2, "train") == 1  # a one-image class stays in train


def test_resize_shorter_side_then_center_crop_and_16bit(tmp_path):
    img = np.zeros((20, 40), np.uint16)
    img[:, 10:30] = 65535  # the central 20 columns: after the crop to 20x20 the whole image is bright
    Image.fromarray(img).save(tmp_path / "wide16.png")
    out = read_image(tmp_path / "wide16.png", channels=1, size=10)
    assert out.shape == (1, 10, 10) and out.dtype == torch.uint8
    assert out[:, :, 1:-1].min() >= 250  # scaled 65535 → 255, not clipped to 255 from a 0..255 view
    rgb = read_image(tmp_path / "wide16.png", channels=3, size=10)
    assert rgb.shape == (3, 10, 10)


def test_csv_single_label_names_and_split_column(tmp_path):
    write_folder(tmp_path, n=3)
    rows = ["path,label,split"] + [f"{c}/{i}.png,{c},{('train', 'val', 'test')[i]}" for c in CLASSES for i in range(3)]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    dm = CSVDataModule(root=str(tmp_path / "t.csv"))
    assert dm.class_names == CLASSES and [len(dm.dataset(s)) for s in ("train", "val", "test")] == [3, 3, 3]
    assert dm.dataset("test")[2]["label"] == 2


def test_npz_keys_shapes_and_val_carving(tmp_path):
    path = write_npz(tmp_path / "mine.npz", side=28, rgb=True)
    dm = NPZDataModule(root=str(path), class_names=["no", "yes"], channels=1, image_size=14)
    assert (dm.in_channels, dm.image_size, dm.num_classes, dm.name) == (1, 14, 2, "mine")
    assert dm.dataset("test")[0]["image"].shape == (1, 14, 14)
    arrays = dict(np.load(path))
    del arrays["val_images"], arrays["val_labels"]
    np.savez(tmp_path / "noval.npz", **arrays)
    carved = NPZDataModule(root=str(tmp_path / "noval.npz"))
    assert [len(carved.dataset(s)) for s in ("train", "val", "test")] == [22, 2, 8]  # 10% of 12 per class


@pytest.mark.parametrize("name,cls", [("folder", FolderDataModule), ("csv", CSVDataModule), ("npz", NPZDataModule)])
def test_data_yaml_mirrors_the_signature(name, cls):
    """conf/data/<name>.yaml lists every argument (so `data.x=` needs no `+`) with the signature's value."""
    node = OmegaConf.load(CONF / "data" / f"{name}.yaml")
    params = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    assert set(node) - {"_target_"} == set(params)
    for key, default in params.items():
        if key not in ("root", "seed"):  # root: ??? (required); seed: the run's ${seed}
            assert node[key] == default, key


# ----------------------------------------------------------------------------- one clear error line
def _user_error(cfg, capsys) -> str:
    with pytest.raises(SystemExit) as stop, user_errors():
        train(cfg)
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def _broken(case: str, tmp_path):
    root = write_folder(tmp_path / "data", n=8)
    if case == "unreadable image":
        bad = root / "normal" / "2.png"
        bad.write_bytes(b"not a png")
        return ["data=folder", f"data.root={root}"], str(bad)
    if case == "empty class folder":
        (root / "zzz").mkdir()
        return ["data=folder", f"data.root={root}"], str(root / "zzz")
    if case == "missing root":
        return ["data=folder", f"data.root={tmp_path / 'nowhere'}"], str(tmp_path / "nowhere")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,diagnosis\nbenign/0.png,benign\n")
    return ["data=csv", f"data.root={csv}"], str(csv)


@pytest.mark.parametrize("case", ["unreadable image", "missing label column", "empty class folder", "missing root"])
def test_bad_user_data_is_one_line_naming_the_file(case, tmp_path, capsys):
    overrides, named = _broken(case, tmp_path)
    line = _user_error(compose([*overrides, *FAST, "evaluate.explanations=false"], tmp_path / "run"), capsys)
    assert named in line, line
    expected = {"unreadable image": "unreadable image", "missing label column": "missing column(s) ['label']",
                "empty class folder": "empty class folder", "missing root": "not found"}[case]
    assert expected in line, line


def test_medmnist_64_offline_names_the_file(tmp_path, capsys):
    line = _user_error(compose(["data=pneumoniamnist", "data.image_size=64", f"data.root={tmp_path}", *FAST],
                               tmp_path / "run"), capsys)
    assert str(tmp_path / "pneumoniamnist_64.npz") in line and "download=true" in line
