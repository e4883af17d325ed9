"""Black-box baselines: the reference every family is measured against.

``cnn``  — the zoo's small CNN (28–64 px) + global average pooling + linear head.
``timm`` — any timm backbone + the same head (``pretrained=False``: nothing is downloaded).

Their explanations are post-hoc (Grad-CAM at a configurable layer, or Integrated Gradients) via
Captum, returned as ``Explanation(kind="post-hoc")``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from zoo.base import SelfExplainingModule
from zoo.explanation import Explanation
from zoo.nets.backbones import build_backbone
from zoo.nets.posthoc import gradcam, integrated_gradients
from zoo.registry import register_model


class _BlackBox(SelfExplainingModule):
    explanation_kind = "post-hoc"

    def __init__(self, posthoc: str, cam_layer: str | None, **base) -> None:
        super().__init__(**base)
        if posthoc not in ("gradcam", "ig"):
            raise ValueError(f"unknown post-hoc method {posthoc!r}; expected gradcam or ig")

    def _attach(self, backbone: nn.Module) -> None:
        # Built after super().__init__ so no module object lands in the saved hyperparameters.
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_channels, self.num_classes)

    def compute_logits(self, x: Tensor) -> Tensor:
        features = self.backbone(x)  # (B,D,h,w)
        return self.head(features.mean(dim=(2, 3)))  # (B,K)

    def explain(self, x: Tensor, target: Tensor | int | None = None, method: str | None = None,
                layer: str | None = None) -> Explanation:
        """Post-hoc map for `target`: Grad-CAM at `layer` (default: hparam cam_layer, else last conv) or IG."""
        self.validate_input(x)
        with torch.no_grad():
            logits = self.compute_logits(x)
        target = self.resolve_target(logits, target)
        method = method or self.hparams.posthoc
        if method == "gradcam":
            attribution = gradcam(self, x, target, layer or self.hparams.cam_layer)
        elif method == "ig":
            attribution = integrated_gradients(self, x, target)
        else:
            raise ValueError(f"unknown post-hoc method {method!r}; expected gradcam or ig")
        return Explanation(logits=logits, target=target, kind="post-hoc", attribution=attribution, inputs=x,
                           extras={"method": method, "layer": layer or self.hparams.cam_layer})


@register_model("cnn")
class CNNBaseline(_BlackBox):
    """The zoo CNN as a black box. Defaults reach ≥ 95 % on `synthetic` in a few CPU epochs."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128), posthoc: str = "gradcam",
                 cam_layer: str | None = None,  # None = last conv; evaluation also reports the best layer
                 pretrained_file: str | None = None,  # a state dict of the zoo CNN, see build_backbone
                 lr: float = 3e-3,  # from scratch: the budget of checkpoints/cnn-synthetic (timm keeps 1e-3)
                 **base) -> None:
        super().__init__(posthoc, cam_layer, lr=lr, **base)
        self._attach(build_backbone("zoo_cnn", self.in_channels, widths=widths, pretrained_file=pretrained_file))


@register_model("timm")
class TimmBaseline(_BlackBox):
    """Any timm backbone (e.g. resnet18, efficientnet_b0, vit_tiny_patch16_224) as a black box."""

    def __init__(self, backbone: str = "resnet18",
                 pretrained: bool = False,  # timm weights need internet: off by default
                 pretrained_file: str | None = None,  # local weights file (safetensors / state dict), see build_backbone
                 posthoc: str = "gradcam", cam_layer: str | None = None, **base) -> None:
        super().__init__(posthoc, cam_layer, **base)
        self._attach(build_backbone(backbone, self.in_channels, pretrained=pretrained, pretrained_file=pretrained_file))
