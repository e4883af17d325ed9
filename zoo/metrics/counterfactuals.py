"""Counterfactual metrics: validity, proximity, latent consistency, realism proxies, mass in mask.

Plain tensor functions (no zoo imports, like the rest of :mod:`zoo.metrics`), each returning one value
per counterfactual so callers can average, split by class, or take the worst class.

* validity — the counterfactual is classified as its target class by the model (for a latent model:
  after re-encoding the decoded image, so the image itself must carry the change).
* proximity — mean absolute pixel change per pixel and channel, ``‖x_cf − x‖₁ / (C·H·W)``.
* latent consistency — ``‖enc(x_cf) − z_cf‖₂``: does the encoder read the image back where it was made.
* realism proxies (see zoo/models/gdvae/report.py for the independent judge) — another classifier's confidence in the target class on ``x_cf``, and the RMS pixel
  distance to the nearest real image of the target class (compare with the same distance for real
  images, :func:`nearest_neighbour_distance` on held-out real images).
* mass in mask — the fraction of a change map's mass inside a ground-truth evidence mask.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["validity", "proximity_l1", "latent_consistency", "mass_in_mask", "bounding_box_mask",
           "classifier_confidence", "nearest_neighbour_distance"]


def validity(logits: Tensor, target: Tensor) -> Tensor:
    """(N,) float: 1 where argmax of `logits` (N,K) equals `target` (N,)."""
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"validity: expected logits (N,K) and target (N,), got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    return (logits.argmax(1) == target).float()


def proximity_l1(x_cf: Tensor, x: Tensor) -> Tensor:
    """(N,) mean |x_cf − x| over channels and pixels (the L1 distance per pixel)."""
    if x_cf.shape != x.shape:
        raise ValueError(f"proximity_l1: shapes differ, {tuple(x_cf.shape)} vs {tuple(x.shape)}")
    return (x_cf - x).abs().flatten(1).mean(1)


def latent_consistency(z_reencoded: Tensor, z_cf: Tensor) -> Tensor:
    """(N,) Euclidean distance between the re-encoded counterfactual and the latent it was decoded from."""
    if z_reencoded.shape != z_cf.shape:
        raise ValueError(f"latent_consistency: shapes differ, {tuple(z_reencoded.shape)} vs {tuple(z_cf.shape)}")
    return (z_reencoded - z_cf).norm(dim=-1)


def mass_in_mask(change: Tensor, mask: Tensor) -> Tensor:
    """(N,) fraction of a non-negative change map's mass (N,1,H,W) or (N,H,W) inside `mask` (same size).
    NaN where the map is all zero or the mask is empty (nothing to score)."""
    change = change.reshape(change.shape[0], -1).float()
    mask = mask.reshape(mask.shape[0], -1).float()
    if change.shape != mask.shape:
        raise ValueError(f"mass_in_mask: map and mask sizes differ, {tuple(change.shape)} vs {tuple(mask.shape)}")
    if (change < 0).any():
        raise ValueError("mass_in_mask: the change map must be non-negative (e.g. |x_cf − x|)")
    total = change.sum(1)
    inside = (change * (mask > 0.5)).sum(1)
    out = inside / total
    return torch.where((total > 0) & (mask.sum(1) > 0), out, torch.full_like(out, float("nan")))


def bounding_box_mask(mask: Tensor, pad: int = 1) -> Tensor:
    """(N,1,H,W) float: the axis-aligned bounding box of each mask (N,1,H,W) or (N,H,W), grown by `pad`
    pixels and clipped to the image; all zero for an empty mask.

    Why: a counterfactual that turns one evidence shape into another changes the pixels of *both*
    shapes, and the target's lie partly outside the source's mask (measured with pixel-exact shape
    swaps on the synthetic set: 3 % of a cross → disc change is inside the cross). The box of the
    evidence object holds the change of any such swap; `pad` allows for one pixel of blur."""
    m = mask.reshape(mask.shape[0], *mask.shape[-2:]) > 0.5  # (N,H,W)
    rows, cols = m.any(2), m.any(1)  # (N,H), (N,W)

    def span(line: Tensor) -> Tensor:  # (N,L) bool -> (N,L) bool covering first..last True, ±pad
        idx = torch.arange(line.shape[1], device=line.device)
        first = torch.where(line, idx, line.shape[1]).min(1).values
        last = torch.where(line, idx, -1).max(1).values
        return (idx >= (first - pad)[:, None]) & (idx <= (last + pad)[:, None])

    return (span(rows)[:, :, None] & span(cols)[:, None, :]).float().unsqueeze(1)


@torch.no_grad()
def classifier_confidence(classifier: Callable[[Tensor], Tensor], images: Tensor, target: Tensor,
                          batch_size: int = 256) -> Tensor:
    """(N,) softmax probability of `target` under an independent classifier (a realism proxy: does a
    model that never saw counterfactuals recognise the target class in them)."""
    probs = torch.cat([classifier(images[i:i + batch_size]).softmax(1) for i in range(0, images.shape[0], batch_size)])
    return probs.gather(1, target.view(-1, 1)).squeeze(1)


@torch.no_grad()
def nearest_neighbour_distance(images: Tensor, reference: Tensor, chunk: int = 512, rms: bool = True) -> Tensor:
    """(N,) distance from each image (or feature vector) to its nearest neighbour in `reference` (M,...):
    RMS per value (``rms=True``, pixels) or plain Euclidean (``rms=False``, e.g. a classifier's features).
    torch.cdist in chunks (exact search; FAISS is not a dependency and M is a few thousand)."""
    a, r = images.flatten(1).float(), reference.flatten(1).float()
    if a.shape[1] != r.shape[1]:
        raise ValueError(f"nearest_neighbour_distance: image sizes differ, {a.shape[1]} vs {r.shape[1]} values")
    if r.shape[0] == 0:
        raise ValueError("nearest_neighbour_distance: the reference set is empty")
    best = torch.cat([torch.cdist(a[i:i + chunk], r).amin(1) for i in range(0, a.shape[0], chunk)])
    return best / a.shape[1] ** 0.5 if rms else best
