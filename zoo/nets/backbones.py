"""Feature extractors every family can sit on: the zoo's small CNN and any timm model.

A backbone maps images (B,C,H,W) to a feature map (B,D,h,w) and exposes ``out_channels`` (D) and
``reduction`` (H/h). Families never care which one they got.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


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


def build_backbone(name: str = "zoo_cnn", in_channels: int = 1, pretrained: bool = False, **kwargs) -> nn.Module:
    """``"zoo_cnn"`` → :class:`SmallCNN` (kwargs: widths); anything else → a timm model of that name."""
    if name == "zoo_cnn":
        return SmallCNN(in_channels, **kwargs)
    return TimmBackbone(name, in_channels=in_channels, pretrained=pretrained, **kwargs)


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
