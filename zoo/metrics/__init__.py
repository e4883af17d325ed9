"""Explanation metrics shared by every model family.

* Localisation (:mod:`zoo.metrics.localization`): pointing game / hit rate, energy in mask,
  mask IoU, plateau-robust argmax location.
* Faithfulness (:mod:`zoo.metrics.faithfulness`): RISE deletion / insertion AUC.
* Stability (:mod:`zoo.metrics.stability`): EvalProtoPNet noise, argmax shift, map IoU.

Only torch / torchvision / numpy / scipy are imported here, never other zoo modules, so the
metrics can be used (and tested) on their own. :func:`explanation_metrics` bundles the means.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .faithfulness import auc, deletion_insertion, make_substrate, target_probability
from .localization import argmax_location, energy_in_mask, hit_rate, mask_iou, pointing_game
from .stability import evalprotopnet_noise, explanation_stability, top_fraction_mask
from .targets import class_targets, targets_or_predictions

__all__ = [
    "argmax_location",
    "pointing_game",
    "hit_rate",
    "mask_iou",
    "energy_in_mask",
    "deletion_insertion",
    "auc",
    "target_probability",
    "make_substrate",
    "evalprotopnet_noise",
    "top_fraction_mask",
    "explanation_stability",
    "explanation_metrics",
    "class_targets",
    "targets_or_predictions",
]


def _nanmean(x: Tensor) -> float:
    return float(torch.nanmean(x.float()))


def explanation_metrics(
    model: Callable[[Tensor], Tensor],
    explain_fn: Callable[[Tensor, Tensor | None], Tensor],
    images: Tensor,
    target: Tensor | int | None = None,
    masks: Tensor | None = None,
    steps: int = 32,
    stability: bool = True,
    generator: torch.Generator | None = None,
    activation: str | None = "softmax",
    batch_size: int = 256,
) -> dict[str, float]:
    """Batch means of the standard explanation metrics.

    Args:
        model: ``(N, C, H, W) -> logits (N, K)``, in eval mode.
        explain_fn: ``(images, target (B,)) -> attribution (B,1,H,W) or (B,H,W)``. It is
            called with autograd enabled so gradient-based explainers (Grad-CAM, IG) work.
        images: ``(B, C, H, W)`` normalised images.
        target: ``(B,)`` or int; None = the model's prediction on the clean images.
        masks: optional ground-truth masks ``(B,1,H,W)`` / ``(B,H,W)`` for localisation.
        steps: deletion/insertion steps.
        stability: whether to run the (extra forward/explain pass) stability metrics.
        generator: seeded generator for the stability noise.

    Returns:
        ``{"deletion_auc", "insertion_auc"}`` plus ``{"hit_rate", "energy_in_mask"}`` when
        masks are given and ``{"stability", "map_iou", "argmax_shift"}`` when ``stability``;
        localisation means ignore images with empty masks (NaN if all are empty).
    """
    target = targets_or_predictions(model, images, target, batch_size)

    attribution = explain_fn(images, target).detach()
    out: dict[str, float] = {}
    if masks is not None:
        out["hit_rate"] = _nanmean(pointing_game(attribution, masks))
        out["energy_in_mask"] = _nanmean(energy_in_mask(attribution, masks))
    di = deletion_insertion(
        model, images, attribution, target, steps=steps, mode="both",
        activation=activation, batch_size=batch_size,
    )
    out["deletion_auc"] = float(di["deletion"].mean())
    out["insertion_auc"] = float(di["insertion"].mean())
    if stability:
        st = explanation_stability(explain_fn, images, target, generator=generator)
        out["stability"] = st["stability"]
        out["map_iou"] = _nanmean(st["map_iou"])
        out["argmax_shift"] = _nanmean(st["argmax_shift"])
    return out
