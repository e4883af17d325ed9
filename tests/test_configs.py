"""Every config in conf/ composes and instantiates (Hydra `_target_`), offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import CONF, compose, shared_medmnist_dir
from omegaconf import OmegaConf

from zoo.hub import plain
from zoo.registry import create_model, model_class
from zoo.training import DEFAULT_EPOCHS, build_datamodule, build_model, build_trainer

# The keys a conf/model/*.yaml may set besides _target_ and name: what the config deliberately changes
# against its registered model's signature defaults (variants of one registered class). Everything else
# lives in the signature only, so `python train.py model=x` and `zoo.create_model(x)` build one model.
DELIBERATE: dict[str, tuple[str, ...]] = {}  # none: one config per registered name (conf/model/<name>.yaml)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def fake_medmnist(root: Path, flag: str) -> None:
    """A tiny file in the official MedMNIST layout, for subsets that are not in the shared folder."""
    import medmnist

    info = medmnist.INFO[flag]
    k, c = len(info["label"]), info["n_channels"]
    shape = (4, 28, 28) if c == 1 else (4, 28, 28, 3)
    labels = np.zeros((4, k), np.uint8) if "multi-label" in info["task"] else np.zeros((4, 1), np.uint8)
    np.savez(root / f"{flag}.npz", **{f"{s}_{kind}": arr for s in ("train", "val", "test")
                                       for kind, arr in (("images", np.zeros(shape, np.uint8)), ("labels", labels))})


@pytest.mark.parametrize("name", options("data"))
def test_data_config_instantiates(name, tmp_path):
    cfg = compose([f"data={name}"], tmp_path)
    if OmegaConf.is_missing(cfg.data, "root"):  # users' own data (folder / csv / npz): a tiny written one
        from test_user_data import write_csv, write_folder, write_npz

        write = {"folder": lambda: write_folder(tmp_path / "images"), "csv": lambda: write_csv(tmp_path / "csv"),
                 "npz": lambda: write_npz(tmp_path / "data.npz")}[name]
        cfg.data.root = str(write())
        if name == "csv":
            cfg.data.label_columns = ["a", "b", "c"]  # write_csv's multi-label columns
    if OmegaConf.is_missing(cfg.data, "flag"):  # a base config (medmnist, graph) takes any flag
        cfg.data.flag = "breastmnist"
    if cfg.data.get("flag"):  # MedMNIST: shared files when present, else a fake file in the same format
        shared = shared_medmnist_dir()
        if shared is not None and (shared / f"{cfg.data.flag}.npz").is_file():
            cfg.data.root = str(shared)
        else:
            fake_medmnist(tmp_path, cfg.data.flag)
            cfg.data.root = str(tmp_path)
    dm = build_datamodule(cfg)
    assert dm.num_classes >= 2 and dm.in_channels in (1, 3) and dm.task in ("multiclass", "multilabel")


@pytest.mark.parametrize("name", options("model"))
def test_model_config_instantiates(name, tmp_path):
    cfg = compose([f"model={name}"], tmp_path)
    if model_class(cfg.model.name).input_kind == "graph":
        pytest.skip("graph models are checked by their family's tests")
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm).eval()
    x = torch.zeros(2, dm.in_channels, dm.image_size, dm.image_size)
    assert model(x).shape == (2, dm.num_classes)


@pytest.mark.parametrize("name", options("model"))
def test_model_config_is_create_model_defaults(name, tmp_path):
    cfg = compose([f"model={name}"], tmp_path)
    changed = DELIBERATE.get(name, ())
    own = OmegaConf.load(CONF / "model" / f"{name}.yaml")  # the file itself, before its defaults list
    assert set(own) - {"defaults"} == set(changed), \
        f"conf/model/{name}.yaml repeats or changes signature defaults; defaults belong in the model's __init__"
    assert set(cfg.model) - {"_target_", "name"} == set(model_class(cfg.model.name).default_hparams())
    dm = build_datamodule(cfg)  # graph models: the (unbuilt) kNN graph over the default data gives their sizes
    geometry = dict(num_classes=dm.num_classes, in_channels=dm.in_channels, image_size=dm.image_size,
                    task=dm.task, class_names=list(dm.class_names), **getattr(dm, "model_kwargs", {}))
    from_code = create_model(cfg.model.name, **geometry, **{k: cfg.model[k] for k in changed})
    # plain(): as config.yaml stores them (a signature's tuple default and YAML's list are one value)
    assert plain(dict(build_model(cfg, dm).hparams)) == plain(dict(from_code.hparams))


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_config_instantiates(name, tmp_path):
    cfg = compose([f"trainer={name}", "callbacks=none", "logger=none"], tmp_path)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        assert cfg.trainer.precision == "16-mixed"  # composes; instantiating needs a GPU
        return
    trainer = build_trainer(cfg, tmp_path)
    assert trainer.max_epochs == (cfg.trainer.max_epochs or DEFAULT_EPOCHS)  # null: 6 (train() fits the schedule)


@pytest.mark.parametrize("group", ["logger", "callbacks"])
def test_logger_and_callback_configs_instantiate(group, tmp_path):
    for name in options(group):
        cfg = compose([f"{group}={name}"], tmp_path)
        for node in (cfg.get(group) or {}).values():
            assert instantiate(node) is not None


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_config_composes(name, tmp_path):
    cfg = compose([f"experiment={name}"], tmp_path)
    assert cfg.model.name and cfg.data._target_


def test_evaluate_config_composes(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="evaluate", overrides=["model_path=cnn-synthetic"])
    assert cfg.model_path == "cnn-synthetic" and cfg.data._target_.endswith("SyntheticDataModule")
