"""Feature extractors every family can sit on: the zoo's small CNN, the per-patch CNN and any timm
model, built by :func:`build_backbone` and loaded from a saved zoo model by :func:`load_pretrained`.

A backbone maps images (B,C,H,W) to a feature map (B,D,h,w) and exposes ``out_channels`` (D) and
``reduction`` (H/h). Families never care which one they got.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from zoo import hub
from zoo.nets.patches import PatchCNN

log = logging.getLogger("zoo")


class SmallCNN(nn.Module):
    """VGG-style stages of two 3×3 convs (BN, ReLU), a 2×2 max-pool between stages.

    Sized for 28–64 px inputs: with the default three stages a 32 px image gives an 8×8 map, fine
    enough for prototype and Grad-CAM maps yet cheap to train on 2 CPU cores.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, width in enumerate(widths):
            if stage > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.out_channels = channels
        self.reduction = 2 ** (len(widths) - 1)

    def forward(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,D,H/r,W/r)
        return self.features(x)


class TimmBackbone(nn.Module):
    """Any timm model as a feature extractor (its last feature stage).

    ``pretrained=False`` by default: weights cannot be downloaded offline; users with internet (or a
    local weight file via timm's ``pretrained_cfg_overlay``) can turn it on.
    """

    def __init__(self, name: str, in_channels: int = 1, pretrained: bool = False, **kwargs) -> None:
        super().__init__()
        import timm  # lazy: importing timm costs ~1 s and only timm backbones need it

        self.body = timm.create_model(
            name, pretrained=pretrained, features_only=True, out_indices=(-1,), in_chans=in_channels, **kwargs
        )
        info = self.body.feature_info
        self.out_channels = info.channels()[-1]
        self.reduction = info.reduction()[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)[-1]


def build_backbone(name: str = "zoo_cnn", in_channels: int = 1, widths: Sequence[int] | None = None,
                   pretrained: bool = False, patch_size: int | None = None,
                   timm_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The one place a family's ``backbone`` hyperparameter becomes a module:

    * ``"zoo_cnn"`` → :class:`SmallCNN` with stage ``widths`` (default (32, 64, 128));
    * ``"patch_cnn"`` → :class:`zoo.nets.patches.PatchCNN`, receptive field exactly ``patch_size``;
    * anything else → the timm model of that name (``pretrained``; ``timm_kwargs`` go to
      ``timm.create_model``, e.g. a ViT's own ``patch_size``; ``widths`` unused).
    """
    if name in ("zoo_cnn", "patch_cnn"):
        if timm_kwargs:
            raise ValueError(f"backbone {name!r} takes no timm arguments, got {sorted(timm_kwargs)}")
        kwargs = {} if widths is None else {"widths": tuple(widths)}
        if name == "zoo_cnn":
            return SmallCNN(in_channels, **kwargs)
        if patch_size is None:
            raise ValueError("backbone 'patch_cnn' needs patch_size")
        return PatchCNN(in_channels, patch_size, **kwargs)
    return TimmBackbone(name, in_channels=in_channels, pretrained=pretrained, **(timm_kwargs or {}))


def load_pretrained(source: str, parts: Mapping[str, nn.Module], owner: str, mismatch: str,
                    missing: str = "raise") -> bool:
    """The one pretrained loader: copy into each module of ``parts`` (name → module, e.g.
    ``{"backbone": self.backbone, "head": self.head}``) the weights of the same-named part of a saved zoo
    model — a folder, a pretrained name under checkpoints/ or a Lightning ``.ckpt`` (``zoo.load``).

    A part the donor lacks, or weights that do not fit, is a ValueError ``"<owner>: <source> (<donor>)
    <mismatch>: ..."``. A source that is not there raises FileNotFoundError, or with ``missing="warn"``
    logs a warning and loads nothing (the parts stay as initialised). Returns whether it loaded."""
    try:
        donor = hub.load(source)
    except FileNotFoundError:
        if missing != "warn":
            raise
        log.warning("%s: pretrained weights %r not found; the %s stays random", owner, source, " and ".join(parts))
        return False
    try:
        for name, module in parts.items():
            module.load_state_dict(getattr(donor, name).state_dict())
    except (AttributeError, RuntimeError) as err:
        raise ValueError(f"{owner}: {source!r} ({donor.model_name}) {mismatch}: {err}") from None
    return True


def conv_layer_names(module: nn.Module) -> list[str]:
    """Names of every Conv2d in `module`, input to output (candidate Grad-CAM layers)."""
    return [name for name, m in module.named_modules() if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def feature_shape(backbone: nn.Module, in_channels: int, image_size: int) -> tuple[int, int, int]:
    """(D,h,w) of the backbone's output for one image, found by a dry run (timm reductions vary)."""
    was_training = backbone.training
    backbone.eval()
    out = backbone(torch.zeros(1, in_channels, image_size, image_size))
    backbone.train(was_training)
    return tuple(out.shape[1:])
