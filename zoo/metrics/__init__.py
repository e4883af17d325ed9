"""Explanation metrics shared by every model family.

* Localisation (:mod:`zoo.metrics.localization`): pointing game / hit rate, energy in mask,
  mask IoU, plateau-robust argmax location.
* Faithfulness (:mod:`zoo.metrics.faithfulness`): RISE deletion / insertion AUC on grey, blur and
  noise substrates (headline: the worst), equal-score pixels switched together.
* Stability (:mod:`zoo.metrics.stability`): EvalProtoPNet noise, argmax shift, map IoU.

Only torch / torchvision / numpy / scipy are imported here, never other zoo modules, so the
metrics can be used (and tested) on their own. :func:`explanation_metrics` bundles the means.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .faithfulness import SUBSTRATES, auc, deletion_insertion, faithfulness, make_substrate, target_probability
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
    "faithfulness",
    "SUBSTRATES",
    "worst_substrate",
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


def worst_substrate(row: dict[str, float]) -> dict[str, float]:
    """The headline ``deletion_auc`` / ``insertion_auc`` of a row of per-substrate means
    (``"deletion_auc[grey]"``, ...): the worst substrate, i.e. the highest deletion and the lowest
    insertion AUC, so a family trained on one substrate (a blank-patch penalty on grey) cannot win
    by it. Means first, then the worst: the worst of the batch means, not a per-image worst."""
    out = dict(row)
    for mode, pick in (("deletion_auc", max), ("insertion_auc", min)):
        values = [v for k, v in row.items() if k.startswith(f"{mode}[")]
        if values:
            out[mode] = pick(values)
    return out


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
    substrates: tuple[str, ...] = SUBSTRATES,
    ties: str = "plateau",
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
        substrates: deletion ends / insertion starts (:func:`faithfulness`), each reported.
        ties: tie handling of the deletion/insertion order (default: equal scores switch together).

    Returns:
        ``{"deletion_auc", "insertion_auc"}`` (the worst substrate, :func:`worst_substrate`),
        ``"deletion_auc[s]"`` / ``"insertion_auc[s]"`` per substrate ``s``, plus ``{"hit_rate", "energy_in_mask"}`` when
        masks are given and ``{"stability", "map_iou", "argmax_shift"}`` when ``stability``;
        localisation means ignore images with empty masks (NaN if all are empty).
    """
    target = targets_or_predictions(model, images, target, batch_size)

    attribution = explain_fn(images, target).detach()
    out: dict[str, float] = {}
    if masks is not None:
        out["hit_rate"] = _nanmean(pointing_game(attribution, masks))
        out["energy_in_mask"] = _nanmean(energy_in_mask(attribution, masks))
    fa = faithfulness(model, images, attribution, target, steps=steps, deletion=substrates, insertion=substrates,
                      ties=ties, activation=activation, batch_size=batch_size)
    for mode in ("deletion", "insertion"):
        for s in substrates:
            out[f"{mode}_auc[{s}]"] = float(fa[f"{mode}[{s}]"].mean())
    out = worst_substrate(out)
    if stability:
        st = explanation_stability(explain_fn, images, target, generator=generator)
        out["stability"] = st["stability"]
        out["map_iou"] = _nanmean(st["map_iou"])
        out["argmax_shift"] = _nanmean(st["argmax_shift"])
    return out
