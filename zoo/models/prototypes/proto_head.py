"""A prototype head over a frozen backbone (ProtoFM-style: "Tell me why", a prototype head on a
frozen foundation model).

Only a light head is trained (≤ 1M parameters, checked in the tests): a 1×1-conv projection of the
frozen backbone's patch tokens / feature map, cosine prototypes and the ProtoPNet last layer. The
backbone is any timm model (``pretrained=True`` where a user has the weights) or the zoo CNN; since
nothing can be downloaded here, ``backbone_checkpoint`` loads backbone weights from a zoo
checkpoint folder (e.g. ``checkpoints/cnn-synthetic``, the black-box baseline's backbone) and falls
back to a random backbone with a warning when the folder is absent (zoo.nets.backbones.load_pretrained).

Cosine similarities lie in [−1, 1], so the last layer starts at ``last_layer_scale``·(+1/−0.5)
(a temperature folded into W: the contributions W·g still sum to the logits). Everything else —
loss, push, explanation — is the family's (network.py).
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from zoo.nets.backbones import build_backbone, load_pretrained
from zoo.registry import register_model

from .network import PrototypeNetwork


@register_model("proto_head")
class ProtoHead(PrototypeNetwork):
    # The backbone never trains; the last layer trains with the head (ProtoFM trains the head jointly).
    phase_parts = {
        "warm": ("add_on", "prototypes"),
        "joint": ("add_on", "prototypes", "last_layer"),
        "last_layer": ("last_layer",),
    }

    def __init__(
        self,
        backbone: str = "zoo_cnn",  # "zoo_cnn" or any timm name (e.g. vit_tiny_patch16_224, resnet18)
        widths: Sequence[int] = (32, 64, 128),  # zoo_cnn stages (must match backbone_checkpoint's)
        pretrained: bool = False,  # timm weights: only where a user has them locally
        backbone_checkpoint: str | None = "cnn-synthetic",  # zoo folder/name whose `backbone.*` weights to load
        prototype_dim: int = 64,  # projection width of the head
        prototypes_per_class: int = 10,
        similarity: str = "cosine",  # ProtoFM: cosine over patch tokens / feature cells
        incorrect_weight: float = -0.5,
        last_layer_scale: float = 10.0,  # temperature for cosine similarities in [-1, 1]
        clst_weight: float = 0.8,
        sep_weight: float = 0.08,
        l1_weight: float = 1e-4,
        backbone_lr: float = 0.0,  # unused: the backbone is frozen
        last_layer_lr: float = 3e-3,
        push_batch_size: int = 256,
        push_at_end: bool = True,
        keep_push_images: bool = True,
        # joint = the head (projection + prototypes + last layer; backbone frozen) → push → last layer
        schedule: Sequence[dict] | None = ({"phase": "joint", "epochs": 4}, {"phase": "push"},
                                           {"phase": "last_layer", "epochs": 1}),
        lr: float = 3e-3,  # head: projection + prototypes
        scheduler: str = "none",  # as ProtoPNet: the phases set the trained parts
        **base,
    ) -> None:
        super().__init__(schedule=schedule, lr=lr, scheduler=scheduler, **base)
        self.backbone = build_backbone(backbone, self.in_channels, widths=widths, pretrained=pretrained)
        if backbone_checkpoint:
            self._load_backbone(backbone_checkpoint)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self._frozen_backbone()
        # Light head: 1×1 projection (ReLU between), no sigmoid: cosine needs signed features.
        D = self.backbone.out_channels
        self.add_on = nn.Sequential(nn.Conv2d(D, prototype_dim, 1), nn.ReLU(inplace=True),
                                    nn.Conv2d(prototype_dim, prototype_dim, 1))
        self._build_head(prototype_dim, prototypes_per_class, similarity, incorrect_weight,
                         last_layer_scale=last_layer_scale, keep_push_images=keep_push_images,
                         prototype_init="normal")
        self._frozen = {"backbone"}
        self.train(self.training)

    def _frozen_backbone(self) -> None:
        self.backbone.eval()

    def _load_backbone(self, source: str) -> None:
        load_pretrained(source, {"backbone": self.backbone}, self.model_name, missing="warn",
                        mismatch=f"has backbone weights that do not fit backbone={self.hparams.backbone!r} "
                                 f"with in_channels={self.in_channels}")

    def set_trainable(self, parts: Sequence[str]) -> None:
        super().set_trainable([p for p in parts if p != "backbone"])
        self._frozen.add("backbone")
        self.train(self.training)

    def part_modules(self):
        parts = super().part_modules()
        parts.pop("backbone")  # never optimised
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        return parts

    def head_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("backbone."))
