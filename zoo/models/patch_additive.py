"""A per-feature additive self-attributing model: independent per-patch logits, summed.

    logit_k(x) = Σ_p l_k(patch_p) + b_k

Each non-overlapping P×P patch is classified on its own by one shared small CNN (it sees nothing
outside its patch), so every patch's contribution is exact and independent of the others — the
"per-feature additive" model class of the Sum-of-Parts paper's claim (features = patches). It is the
comparison model of the interaction experiment (conf/experiment/sop_interaction.yaml): when the label
is an interaction of two parts (XOR on ``synthetic-interaction``), no such model can beat ~75 % unless
both parts fall into one patch, while a group model can.

Explanation (``kind="patch"``): ``patch_logits`` (B,K,h,w); ``contributions`` (B,K,h·w) + ``bias``
(K,) add up to the logits (tested); ``attribution`` = the target's patch-logit map, each patch's
logit spread evenly over its P² pixels (the map sums to logit − bias).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.base import SelfExplainingModule
from zoo.explanation import Explanation
from zoo.nets.backbones import build_backbone
from zoo.nets.patches import to_patches
from zoo.registry import register_model


@register_model("patch_additive")
class PatchAdditive(SelfExplainingModule):
    explanation_kind = "patch"

    def __init__(
        self,
        patch_size: int | None = None,  # None: image_size / 4, a 4×4 grid (32 px → 8 px patches, where a
        # synthetic part of 6–10 px mostly fits in one or two; 28 px MedMNIST → 7 px)
        widths: Sequence[int] = (32, 64, 128),  # the zoo CNN on each 8 px patch on its own (2×2 map after two pools)
        lr: float = 3e-3,  # the cnn baseline's lr and budget
        **base: Any,
    ) -> None:
        super().__init__(lr=lr, **base)
        if patch_size is None:
            patch_size = self.image_size // 4 if self.image_size % 4 == 0 else self.image_size
        if patch_size < 4 or self.image_size % patch_size:
            raise ValueError(f"patch_size must be ≥ 4 and divide image_size ({self.image_size}), got {patch_size}")
        self.patch_size = patch_size
        self.grid = self.image_size // patch_size
        self.patch_net = build_backbone("zoo_cnn", self.in_channels, widths=widths)
        self.patch_head = nn.Linear(self.patch_net.out_channels, self.num_classes, bias=False)
        self.bias = nn.Parameter(torch.zeros(self.num_classes))

    def patch_logits(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,K,h,w)
        B = x.shape[0]
        patches = to_patches(x, self.patch_size)  # (B,n,C,P,P) raster order
        flat = patches.reshape(-1, *patches.shape[2:])  # every patch is an independent image
        logits = self.patch_head(self.patch_net(flat).mean(dim=(2, 3)))  # (B·n,K)
        return logits.reshape(B, self.grid, self.grid, -1).permute(0, 3, 1, 2)

    def compute_logits(self, x: Tensor) -> Tensor:
        return self.patch_logits(x).sum(dim=(2, 3)) + self.bias

    @torch.no_grad()
    def explain(self, x: Tensor, target: Tensor | int | None = None) -> Explanation:
        self.validate_input(x)
        patch = self.patch_logits(x)  # (B,K,h,w)
        logits = patch.sum(dim=(2, 3)) + self.bias
        target = self.resolve_target(logits, target)
        chosen = patch[torch.arange(x.shape[0], device=x.device), target][:, None]  # (B,1,h,w)
        attribution = F.interpolate(chosen, scale_factor=self.patch_size, mode="nearest") / self.patch_size ** 2
        return Explanation(logits=logits, target=target, kind="patch", attribution=attribution, inputs=x,
                           contributions=patch.flatten(2), bias=self.bias.detach().clone(), patch_logits=patch,
                           extras={"raw_map": attribution, "patch_size": self.patch_size})
