"""Interpretability of part-prototypes: EvalProtoPNet consistency and stability.

Huang et al., "Evaluation and Improvement of Interpretability for Self-Explainable Part-Prototype
Networks" (ICCV 2023):

* For prototype j of class c and a test image i of class c, take the argmax of j's upsampled
  similarity map and a box of half-size 36 px at 224 px (scaled to the image size) around it;
  o[j,i,k] = 1 when visible part k's keypoint lies in the box.
* Consistency: j is consistent when max_k Σ_i o[j,i,k] / Σ_i v[i,k] ≥ 0.8; the score is the fraction
  of consistent prototypes.
* Stability: add ε ~ N(0, 0.2²) clipped to ±0.25 to the normalised image; (j, i) is stable when
  the part-hit vector o[j,i,:] is unchanged; the score is the mean over prototypes and images.
* Without keypoints (MedMNIST): the annotation-free stability of the same maps under the same
  noise — the argmax location is unchanged (``argmax_stability``) and the IoU of the top-10 % pixels
  (``map_iou``).

Maps are functions of the model, so the metrics take ``maps_fn(images) -> (N,P,H,W)``; everything
else is plain tensors. Only zoo.metrics internals are imported.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .localization import argmax_location, mask_iou
from .stability import evalprotopnet_noise, top_fraction_mask

__all__ = ["box_half_size", "part_hits", "consistency", "stability", "prototype_interpretability"]

MapsFn = Callable[[Tensor], Tensor]  # images (N,C,H,W) -> upsampled similarity maps (N,P,H,W)


def box_half_size(image_size: int, half_size_224: float = 36.0) -> float:
    """EvalProtoPNet's 36 px half-size at 224 px, scaled to `image_size` (5.14 px at 32 px)."""
    return half_size_224 * image_size / 224.0


def _check(maps: Tensor, keypoints: Tensor) -> None:
    if maps.ndim != 4:
        raise ValueError(f"maps must be (N,P,H,W), got shape {tuple(maps.shape)}")
    if keypoints.ndim != 3 or keypoints.shape[-1] != 3 or keypoints.shape[0] != maps.shape[0]:
        raise ValueError(f"keypoints must be (N,K,3) rows (x, y, visible) for the N={maps.shape[0]} maps, "
                         f"got shape {tuple(keypoints.shape)}")


def _argmax_points(maps: Tensor) -> Tensor:
    """(N,P,H,W) → (N,P,2) (row, col) of each map's maximum (plateau-robust, see argmax_location)."""
    N, P, H, W = maps.shape
    return argmax_location(maps.reshape(N * P, H, W)).view(N, P, 2).to(maps.device)


def part_hits(maps: Tensor, keypoints: Tensor, half_size: float | None = None) -> Tensor:
    """o[i,j,k]: visible keypoint k of image i lies in the box around the argmax of map j.

    maps (N,P,H,W), keypoints (N,K,3) rows (x=col, y=row, visible) → (N,P,K) bool. The box is
    |x − col*| ≤ half_size and |y − row*| ≤ half_size (default: :func:`box_half_size`)."""
    _check(maps, keypoints)
    half = box_half_size(maps.shape[-1]) if half_size is None else half_size
    peak = _argmax_points(maps).float()  # (N,P,2) as (row, col)
    kp = keypoints.to(maps.device).float()
    dy = (kp[:, None, :, 1] - peak[:, :, None, 0]).abs()  # (N,P,K)
    dx = (kp[:, None, :, 0] - peak[:, :, None, 1]).abs()
    visible = kp[:, None, :, 2] > 0.5
    return (dx <= half) & (dy <= half) & visible


def _own_class(labels: Tensor, prototype_class: Tensor) -> Tensor:
    """(N,P) bool: image i is of prototype j's class (only those pairs are scored)."""
    return labels.view(-1, 1).to(prototype_class.device) == prototype_class.view(1, -1)


def consistency(hits: Tensor, keypoints: Tensor, labels: Tensor, prototype_class: Tensor,
                threshold: float = 0.8) -> dict[str, Tensor | float]:
    """Fraction of consistent prototypes, from :func:`part_hits` ``hits`` (N,P,K).

    Returns ``{"consistency": float, "per_prototype": (P,) max_k hit ratio, "consistent": (P,) bool}``;
    prototypes with no image of their class (or no visible part) have ratio 0."""
    own = _own_class(labels, prototype_class).to(hits.device)  # (N,P)
    visible = (keypoints[..., 2] > 0.5).to(hits.device).float()  # (N,K)
    num = (hits.float() * own[..., None]).sum(0)  # (P,K) Σ_i o over images of the class
    den = own.float().T @ visible  # (P,K) Σ_i v over the same images
    ratio = torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num)).max(1).values  # (P,)
    consistent = ratio >= threshold
    return {"consistency": float(consistent.float().mean()), "per_prototype": ratio, "consistent": consistent}


def stability(hits_clean: Tensor, hits_noisy: Tensor, labels: Tensor, prototype_class: Tensor
              ) -> dict[str, Tensor | float]:
    """Mean over (prototype, own-class image) pairs of [part-hit vector unchanged under noise]."""
    own = _own_class(labels, prototype_class).to(hits_clean.device)  # (N,P)
    same = (hits_clean == hits_noisy).all(-1)  # (N,P)
    per_prototype = (same & own).sum(0) / own.sum(0).clamp_min(1)  # (P,)
    score = float((same & own).sum() / own.sum().clamp_min(1))
    return {"stability": score, "per_prototype": per_prototype}


def prototype_interpretability(maps_fn: MapsFn, images: Tensor, labels: Tensor, prototype_class: Tensor,
                               keypoints: Tensor | None = None, generator: torch.Generator | None = None,
                               chunk: int = 64, top_fraction: float = 0.1) -> dict[str, float]:
    """All prototype metrics on one batch: consistency/stability when keypoints are given, and the
    annotation-free stability (argmax unchanged, map IoU) always. Over own-class (image, prototype) pairs."""
    clean_parts, noisy_parts = [], []
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk]
        clean_parts.append(maps_fn(x))
        noisy_parts.append(maps_fn(evalprotopnet_noise(x, generator=generator)))
    clean, noisy = torch.cat(clean_parts), torch.cat(noisy_parts)  # (N,P,H,W)
    N, P, H, W = clean.shape
    own = _own_class(labels, prototype_class)  # (N,P)
    out: dict[str, float] = {}
    if keypoints is not None:
        h_clean, h_noisy = part_hits(clean, keypoints), part_hits(noisy, keypoints)
        out["consistency"] = consistency(h_clean, keypoints, labels, prototype_class)["consistency"]
        out["stability"] = stability(h_clean, h_noisy, labels, prototype_class)["stability"]
    moved = (_argmax_points(clean) != _argmax_points(noisy)).any(-1)  # (N,P)
    out["argmax_stability"] = float((~moved & own).sum() / own.sum().clamp_min(1))
    iou = mask_iou(top_fraction_mask(clean.reshape(N * P, H, W), top_fraction),
                   top_fraction_mask(noisy.reshape(N * P, H, W), top_fraction)).view(N, P)
    out["map_iou"] = float((iou * own).sum() / own.sum().clamp_min(1))
    return out
