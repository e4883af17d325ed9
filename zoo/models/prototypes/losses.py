"""The prototype family's training losses (ProtoPNet, Chen et al., NeurIPS 2019):

    loss = CE + λ_clst · Clst − λ_sep · Sep + λ_l1 · ‖W ⊙ (1 − I)‖₁      (paper: 0.8, 0.08, 1e-4)

with d_min (B,P) the smallest distance of each prototype to any cell of the image:
Clst = mean_b min_{j own class} d_min[b,j] (every image close to one of its own prototypes),
Sep = mean_b min_{j other class} d_min[b,j] (and far from the others'), and I (P,K) the
prototype-to-class identity, so the L1 term acts only on the weights to classes a prototype does
not belong to. A schedule phase may override the three weights (:data:`LOSS_WEIGHTS`).

Multi-label (a deviation the paper does not cover): an image's own prototypes are those of all its
positive labels. An image with no positive label has no own prototype and leaves the Clst mean; one
positive for every class leaves the Sep mean (a masked min over nothing is no distance).
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_WEIGHTS = ("clst_weight", "sep_weight", "l1_weight")  # a schedule entry may override these


def masked_min_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over rows of the min of ``values`` where ``mask`` (B,P); rows with no True entry are left out
    (0 when none has one, still differentiable)."""
    has = mask.any(1)
    if not bool(has.any()):
        return values.sum() * 0.0
    return values[has].masked_fill(~mask[has], torch.finfo(values.dtype).max).min(1).values.mean()


def cluster_separation(labels: Tensor, d_min: Tensor, identity: Tensor) -> tuple[Tensor, Tensor]:
    """(Clst, Sep) for labels (B,) class indices or (B,K) multi-hot, d_min (B,P), identity (P,K)."""
    own = identity[:, labels].T.bool() if labels.ndim == 1 else (labels.float() @ identity.T > 0)  # (B,P)
    return masked_min_mean(d_min, own), masked_min_mean(d_min, ~own)


def l1_wrong_class(weight: Tensor, identity: Tensor) -> Tensor:
    """‖W ⊙ (1 − I)‖₁ of the last layer W (K,P): only the weights from prototypes to other classes."""
    return (weight * (1 - identity.T)).abs().sum()
