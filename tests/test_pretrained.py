"""Pretrained backbones: ``pretrained_file=<path>`` loads into every backbone-wrapping family (the weights
equal the file's), the input normalisation pretrained weights expect, the error paths, and the paper-setting
experiment configs (conf/experiment/paper_*.yaml) running one CPU step at reduced size (slow).

Nothing here downloads: ``pretrained=true`` is only tested through its error path or a monkeypatched timm.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import compose
from zoo import create_model
from zoo.nets.backbones import SmallCNN, TimmBackbone, build_backbone

TINY = {"num_classes": 3, "in_channels": 1, "image_size": 32}
TIMM = "test_resnet"  # timm's own tiny test network: a real timm model, built in milliseconds


def save_weights(state: dict, path: Path) -> Path:
    """A saved random weights file: safetensors, or a plain torch state dict for any other suffix."""
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def random_file(backbone: str, tmp_path: Path, suffix: str, in_channels: int = 1, **kwargs) -> tuple[Path, dict]:
    """A weights file of the kind `backbone` reads (a timm model's state dict, or the zoo CNN's own), seeded
    away from the families' own init so equality can only come from loading it."""
    torch.manual_seed(1234)
    if backbone in ("zoo_cnn", "patch_cnn"):
        state = build_backbone(backbone, in_channels, **kwargs).state_dict()
    else:
        import timm

        state = timm.create_model(backbone, in_chans=in_channels, **kwargs.get("timm_kwargs", {})).state_dict()
    for k, v in state.items():  # BN running stats are 0/1 at every init: make them file-specific too
        if k.endswith(("running_mean", "running_var")):
            v.add_(0.1 * torch.rand_like(v))
    path = save_weights(state, tmp_path / f"{backbone}{suffix}")
    return path, state


def assert_backbone_equals(backbone: torch.nn.Module, state: dict) -> None:
    own = backbone.state_dict()
    if isinstance(backbone, TimmBackbone):  # the feature wrapper keeps timm's names (a ViT's under model.)
        own = {k.removeprefix("body.").removeprefix("model."): v for k, v in own.items()}
    assert own, "backbone has no weights"
    for k, v in own.items():
        assert k in state, f"{k} not in the weights file"
        assert torch.equal(v, state[k]), f"{k} differs from the weights file"


# family → (constructor kwargs, backbone name, build_backbone kwargs of the file's module)
FAMILIES = {
    "cnn": ({}, "zoo_cnn", {}),
    "timm": ({"backbone": TIMM}, TIMM, {}),
    "protopnet": ({}, "zoo_cnn", {"widths": (32, 64)}),
    "protopnet-timm": ({"backbone": TIMM}, TIMM, {}),
    "prob_protopnet": ({}, "zoo_cnn", {"widths": (32, 64)}),
    "proto_head": ({"backbone_checkpoint": None}, "zoo_cnn", {}),
    "sop": ({}, "zoo_cnn", {}),
    "sop-timm": ({"backbone": TIMM, "patch_size": 4}, TIMM, {}),  # 32 px: 1×1 feature map, so 4 px tokens
    "patchnet": ({}, "patch_cnn", {"patch_size": 8}),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_pretrained_file_loads_into_every_backbone_family(case, suffix, tmp_path):
    kwargs, backbone, file_kwargs = FAMILIES[case]
    path, state = random_file(backbone, tmp_path, suffix, **file_kwargs)
    model = create_model(case.split("-")[0], **TINY, **kwargs, pretrained_file=str(path))
    assert_backbone_equals(model.backbone, state)
    assert model.hparams.pretrained_file == str(path)  # saved with the model: zoo.load rebuilds the same
    baseline = create_model(case.split("-")[0], **TINY, **kwargs)
    assert not torch.equal(next(iter(baseline.backbone.state_dict().values())),
                           next(iter(model.backbone.state_dict().values())))


def test_timm_file_adapts_first_conv_to_grey_images(tmp_path):
    """timm's loader sums an RGB stem over channels for one-channel input (and loads the rest as is)."""
    path, state = random_file(TIMM, tmp_path, ".safetensors", in_channels=3)
    backbone = build_backbone(TIMM, 1, pretrained_file=path)
    stem = next(k for k in state if state[k].ndim == 4)
    loaded = dict(backbone.body.named_parameters())[stem]
    torch.testing.assert_close(loaded, state[stem].sum(dim=1, keepdim=True))
    assert_backbone_equals(build_backbone(TIMM, 3, pretrained_file=path), state)


def test_pretrained_weights_see_their_own_normalisation(tmp_path):
    """Zoo images are x = 2·x01 − 1; with pretrained weights the body gets (x01 − mean)/std."""
    path, _ = random_file("resnet18", tmp_path, ".safetensors", in_channels=3)  # ImageNet mean/std
    backbone = build_backbone("resnet18", 3, pretrained_file=path).eval()
    cfg = backbone.body.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    assert not torch.allclose(mean, torch.full_like(mean, 0.5))  # else the check below proves nothing
    x01 = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(2 * x01 - 1), backbone.body((x01 - mean) / std)[-1])
    assert "in_scale" not in backbone.state_dict()  # derived from the config, never saved


def test_random_init_has_no_input_affine():
    torch.manual_seed(0)
    backbone = build_backbone(TIMM, 1).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert not backbone.normalize and not list(backbone.buffers(recurse=False))
    with torch.no_grad():
        assert torch.equal(backbone(x), backbone.body(x)[-1])


def test_pretrained_true_asks_timm_for_weights(monkeypatch):
    """pretrained=true goes to timm (monkeypatched here: nothing is downloaded) and turns on the affine."""
    import timm

    real, seen = timm.create_model, {}

    def fake(name, pretrained=False, **kwargs):
        seen["pretrained"] = pretrained
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake)
    backbone = build_backbone(TIMM, 1, pretrained=True)
    assert seen["pretrained"] is True and backbone.normalize
    assert backbone.in_scale.shape == (1, 1, 1, 1)  # one grey channel: the mean of the RGB statistics


def test_zoo_cnn_has_no_online_weights():
    with pytest.raises(ValueError, match="no online pretrained weights.*pretrained_file"):
        build_backbone("zoo_cnn", 1, pretrained=True)
    with pytest.raises(ValueError, match="no online pretrained weights"):
        create_model("protopnet", **TINY, pretrained=True)


def test_missing_file_is_named(tmp_path):
    for name in ("zoo_cnn", TIMM):
        with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
            build_backbone(name, 1, pretrained_file=tmp_path / "nowhere.safetensors")


def test_mismatched_file_names_file_and_keys(tmp_path):
    path = save_weights(SmallCNN(1, widths=(8, 16)).state_dict(), tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match=r"small\.safetensors.*zoo_cnn.*shape"):
        build_backbone("zoo_cnn", 1, pretrained_file=path)  # widths (32, 64, 128): shapes differ
    state = SmallCNN(1).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["features.0.weight"]
    path = save_weights(state, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match=r"keys\.pt.*missing \['features\.0\.weight'\].*unexpected \['extra"):
        build_backbone("zoo_cnn", 1, pretrained_file=path)
    path = save_weights(SmallCNN(1).state_dict(), tmp_path / "cnn.safetensors")
    with pytest.raises(ValueError, match=rf"cnn\.safetensors.*does not fit timm {TIMM!r}: it lacks weights for"):
        build_backbone(TIMM, 1, pretrained_file=path)


def test_pickled_objects_are_refused(tmp_path):
    """weights_only loading: a file holding pickled objects is one ValueError, never unpickled."""
    path = tmp_path / "evil.pt"
    torch.save({"features.0.weight": torch.zeros(1), "obj": Path("x")}, path)
    with pytest.raises(ValueError, match=r"evil\.pt.*not a readable"):
        build_backbone("zoo_cnn", 1, pretrained_file=path)
    path.write_bytes(pickle.dumps({"a": 1}) + b"junk")
    with pytest.raises(ValueError, match=r"evil\.pt"):
        build_backbone("zoo_cnn", 1, pretrained_file=path)


@pytest.mark.parametrize("family, backbone", [("timm", TIMM), ("cnn", "zoo_cnn")])
def test_zoo_load_reloads_a_model_trained_from_a_file(family, backbone, tmp_path):
    """A model built from pretrained_file saves and reloads with identical logits (the affine is rebuilt)
    — also once the file is gone: zoo.load takes every weight from the saved folder and never re-reads it."""
    import zoo

    path, _ = random_file(backbone, tmp_path, ".safetensors")
    chosen = {"backbone": backbone} if family == "timm" else {}  # cnn: always the zoo CNN
    model = create_model(family, **TINY, **chosen, pretrained_file=str(path)).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    zoo.save(model, tmp_path / "saved")
    path.unlink()
    with torch.no_grad():
        assert torch.equal(zoo.load(tmp_path / "saved").compute_logits(x), model.compute_logits(x))
    with pytest.raises(FileNotFoundError, match="no such file"):  # building anew still needs the file
        create_model(family, **TINY, **chosen, pretrained_file=str(path))


# --- paper-setting experiment configs: compose, instantiate, one CPU step -------------------------------

# config → (backbone at test size, its timm kwargs, extra overrides). resnet18 stands in for resnet34 and
# ViT-tiny for ViT-B (same families of weights, a fraction of the CPU time); image sizes stay 224 px
# except where the paper's own scale is larger or the net is stride 1 (patchnet 512 → 128 px keeps its
# 64 px patches; bagnet 224 → 64 px keeps its 33 px receptive field).
PAPER = {
    "paper_protopnet_cub": ("resnet18", 224, 3),  # 1 of 90 epochs: warm, then push_at_end
    "paper_sop_vit": ("vit_tiny_patch16_224", 224, 3),
    "paper_patchnet": ("tf_efficientnetv2_s", 128, 1),
    "paper_bagnet": (None, 64, 3),
}


def data_overrides(tmp_path: Path, image_size: int, channels: int) -> list[str]:
    """A tiny class-per-subfolder PNG folder (2 classes × 2 images per split), read at `image_size`."""
    from PIL import Image

    root = tmp_path / "images"
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val", "test"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                pixels = (torch.rand(16, 16, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return [f"data.root={root}", f"data.image_size={image_size}", f"data.channels={channels}", "data.batch_size=2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_runs_one_cpu_step(name, tmp_path):
    """Compose, instantiate (the file's weights in the backbone) and train + test one batch on CPU."""
    from zoo.training import build_datamodule, build_model, train

    backbone, image_size, channels = PAPER[name]
    overrides = [f"experiment={name}", "trainer=fast", "trainer.accelerator=cpu", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                 "evaluate.explanations=false", *data_overrides(tmp_path, image_size, channels)]
    if backbone is not None:  # the config's pretrained=true would download: a saved random file instead
        path, state = random_file(backbone, tmp_path, ".safetensors", in_channels=channels)
        overrides += [f"model.backbone={backbone}", "model.pretrained=false", f"model.pretrained_file={path}"]
    cfg = compose(overrides, tmp_path / "run")
    if backbone is not None:
        model = build_model(cfg, build_datamodule(cfg))
        assert_backbone_equals(model.backbone, state)
        assert model.backbone.normalize  # pretrained weights see their own mean/std
    train(cfg)
    import zoo

    trained = zoo.load(tmp_path / "run" / "model")  # saved, reloaded (re-reading the file), still finite
    x = torch.rand(2, channels, image_size, image_size) * 2 - 1
    with torch.no_grad():
        assert torch.isfinite(trained.compute_logits(x)).all()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_keeps_the_paper_setting(name, tmp_path):
    """The shipped values (not the test's overrides): GPU trainer, data root required, the paper's scale."""
    cfg = compose([f"experiment={name}"], tmp_path)
    assert OmegaConf.is_missing(cfg.data, "root") and cfg.data._target_.endswith("FolderDataModule")
    assert cfg.trainer.accelerator == "gpu"
    expected = {"paper_protopnet_cub": ("resnet34", 224), "paper_sop_vit": ("vit_base_patch16_224", 224),
                "paper_patchnet": ("tf_efficientnetv2_s", 512), "paper_bagnet": (None, 224)}[name]
    assert cfg.data.image_size == expected[1]
    if expected[0] is not None:
        assert cfg.model.backbone == expected[0] and cfg.model.pretrained is True
