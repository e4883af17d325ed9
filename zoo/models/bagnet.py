"""BagNet: a receptive-field-limited CNN whose prediction is the average of local logits.

Every output location sees only an R×R input window (R = ``receptive_field``; the anchor offers
9/17/33 px at 224 px). A 1×1 classifier turns each location's features into class logits, and the
prediction is their global average: ``logit_k(x) = (1/n) Σ_locations l_k(location)``. The logit map
is therefore the model's own, exact, additive explanation ("bag of local features").

Small images: the anchor is a ResNet-50 whose 3×3 convs mostly became 1×1 and whose stride is 8. At
28–64 px we keep stride 1 (a 24×24 logit map for R=9 at 32 px, instead of a 3×3 one) and grow the
receptive field with residual blocks of one unpadded 3×3 conv each (+2 px per block), so R can be
any odd size from 3 up to the image size; pick R relative to the evidence (9 px for the 6–10 px
synthetic objects; the anchor's 9/17/33 px at 224 px are ~4/8/15 % of the side).

Explanation (``kind="patch"``):
  * ``patch_logits`` (B,K,h,w), h = H-R+1: the logit of every location;
  * ``contributions`` (B,K,h·w) = logit map / n — they sum to the logits (tested);
  * ``attribution`` (B,1,H,W): the target's logit map placed at each location's receptive-field
    centre and spread over the pixels nearest to that centre (border cells are larger, so their
    value is divided by their area): the pixel mean equals the target logit exactly;
  * ``extras``: ``raw_map`` (= attribution), ``scaled_map`` (× global probability),
    ``receptive_field``, ``probability``.

Reference: Brendel & Bethge, "Approximating CNNs with Bag-of-local-Features models works surprisingly
well on ImageNet" (ICLR 2019); code wielandbrendel/bag-of-local-features-models.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zoo.base import SelfExplainingModule
from zoo.explanation import Explanation
from zoo.nets.patches import place_map
from zoo.registry import register_model


class LocalBlock(nn.Module):
    """Residual block with one unpadded 3×3 conv: the receptive field grows by exactly 2 px.

    The identity branch is centre-cropped by 1 px per side so both branches see the same locations.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(width, width, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:  # (B,D,h,w) -> (B,D,h-2,w-2)
        return self.act(self.branch(x) + x[:, :, 1:-1, 1:-1])


@register_model("bagnet")
class BagNet(SelfExplainingModule):
    explanation_kind = "patch"

    def __init__(
        self,
        # px each location sees (odd); 9 px ≈ one 6–10 px synthetic object. The anchor's 9/17/33 px at
        # 224 px ≈ 4/8/15 % of the side
        receptive_field: int = 9,
        # channels of every block; stride 1 everywhere, so cost ∝ width² × locations (48: 99.6 % on
        # synthetic in 10 CPU epochs)
        width: int = 48,
        lr: float = 3e-3,  # the cnn baseline's lr: side-by-side rows share the budget
        **base,
    ) -> None:
        super().__init__(lr=lr, **base)
        R = receptive_field
        if R < 3 or R % 2 == 0:
            raise ValueError(f"receptive_field must be an odd number ≥ 3, got {R}")
        if R > self.image_size:
            raise ValueError(f"receptive_field {R} is larger than the {self.image_size} px images")
        # stem (3×3 → R=3) + (R-3)/2 blocks of one 3×3 conv each (+2 px each) → exactly R.
        self.stem = nn.Sequential(nn.Conv2d(self.in_channels, width, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[LocalBlock(width) for _ in range((R - 3) // 2)])
        self.classifier = nn.Conv2d(width, self.num_classes, 1)  # the same linear head at every location
        self.receptive_field = R

    def logit_map(self, x: Tensor) -> Tensor:
        """(B,C,H,W) → (B,K,H-R+1,W-R+1); location (i,j) sees exactly x[..., i:i+R, j:j+R]."""
        return self.classifier(self.blocks(self.stem(x)))

    def compute_logits(self, x: Tensor) -> Tensor:
        return self.logit_map(x).mean(dim=(2, 3))  # (B,K): the bag of local evidence, averaged

    def explain(self, x: Tensor, target: Tensor | int | None = None) -> Explanation:
        self.validate_input(x)
        with torch.no_grad():
            grid = self.logit_map(x)  # (B,K,h,w)
            logits = grid.mean(dim=(2, 3))
            target = self.resolve_target(logits, target)
            B, K, h, w = grid.shape
            c = (self.receptive_field - 1) / 2  # location i's window is [i, i+R): centre i + (R-1)/2
            rows = torch.arange(B, device=x.device)
            raw = place_map(grid[rows, target][:, None], [i + c for i in range(h)], [j + c for j in range(w)],
                            tuple(x.shape[-2:]))  # (B,1,H,W), pixel mean = target logit
            prob = self.probabilities(logits)[rows, target]
        return Explanation(
            logits=logits, target=target, kind="patch", attribution=raw, inputs=x,
            contributions=grid.flatten(2) / (h * w), patch_logits=grid,
            extras={"raw_map": raw, "scaled_map": raw * prob[:, None, None, None], "probability": prob,
                    "receptive_field": self.receptive_field})
