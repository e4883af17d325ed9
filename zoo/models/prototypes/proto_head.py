"""A ProtoFM head over a frozen backbone ("Tell me why", a prototype head on a frozen visual
foundation model; REFERENCES.md §1).

Only a light head is trained (≤ 1M parameters, checked in the tests): a 1×1-conv projection of the
frozen backbone's patch tokens / feature map, cosine prototypes and the prototype→class layer. The
backbone never trains in any phase. Objective (protofm_losses.py): CE + student–teacher prototype
assignment + alignment of patches to their assigned prototypes + contrast between prototypes of
different classes + L1 sparsity of the prototype→class layer.

The backbone is named in the config, with no default checkpoint: any timm model (documented choice
``backbone=vit_small_patch14_dinov2`` with ``pretrained=true`` online, or ``pretrained_file=`` offline)
or the zoo CNN with ``backbone_checkpoint=<zoo folder / shipped name>`` (conf/experiment/proto_head_synthetic.yaml
names ``cnn-synthetic``). A named checkpoint that is absent is an error, never a silent random backbone.

Cosine similarities lie in [−1, 1], so the last layer starts at ``last_layer_scale``·(+1/−0.5)
(a temperature folded into W: the contributions W·g still sum to the logits). Push (prototypes shown
as their nearest training patches) and explanation are the family's (network.py).
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from zoo.nets.backbones import build_backbone, load_pretrained
from zoo.registry import register_model

from .network import PrototypeNetwork
from .protofm_losses import protofm_terms


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
        pretrained_file: str | None = None,  # local weights file, see build_backbone (backbone_checkpoint wins)
        backbone_checkpoint: str | None = None,  # zoo folder/name whose `backbone.*` weights to load; no silent default
        prototype_dim: int = 64,  # projection width of the head
        prototypes_per_class: int = 10,
        similarity: str = "cosine",  # ProtoFM: cosine over patch tokens / feature cells
        incorrect_weight: float = -0.5,
        last_layer_scale: float = 10.0,  # temperature for cosine similarities in [-1, 1]
        assign_weight: float = 1.0,  # ProtoFM terms, see protofm_losses.py (paper weights unpublished: unit)
        align_weight: float = 1.0,
        contrast_weight: float = 1.0,
        sparsity_weight: float = 1e-4,  # L1 of W summed over all P·K entries, as ProtoPNet's l1 scale
        student_temp: float = 0.1,  # assignment temperatures; the teacher's is sharper
        teacher_temp: float = 0.04,
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
        self.backbone = build_backbone(backbone, self.in_channels, widths=widths, pretrained=pretrained,
                                       pretrained_file=pretrained_file)
        if backbone_checkpoint:
            self._load_backbone(backbone_checkpoint)  # absent → FileNotFoundError
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
        load_pretrained(source, {"backbone": self.backbone}, self.model_name,
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

    def loss(self, batch):
        """CE + the ProtoFM terms (protofm_losses.py) on the projected patch tokens."""
        hp = self.hparams
        x, y = batch["image"], batch["label"]
        self.validate_input(x)
        z = self.features(x)
        parts = self._parts(z)
        ce = self.task_loss(parts["logits"], y)
        terms = protofm_terms(z, self.prototypes, self.prototype_class, self.last_layer.weight,
                              hp.student_temp, hp.teacher_temp)
        w = self.loss_weight
        loss = ce + sum(w(f"{k}_weight") * v for k, v in terms.items())
        return loss, parts["logits"], {"ce": ce.detach(), **{k: v.detach() for k, v in terms.items()}}

    def head_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("backbone."))
