"""Localisation metrics: does an attribution map point at the right place?

All functions accept attribution maps and masks shaped ``(B, 1, H, W)`` or ``(B, H, W)``
and return per-image tensors ``(B,)`` (or ``(B, 2)`` locations) on the input's device, so
callers can aggregate however they like (``hit_rate`` is the one provided aggregate).

Definitions
-----------
* Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop",
  ECCV 2016): a hit when the map's maximum lies inside the ground-truth mask; images with an
  empty mask are excluded.
* Energy in mask ("energy-based pointing game", Wang et al., "Score-CAM", CVPRW 2020):
  fraction of the map's positive mass that falls inside the mask.
* Mask IoU: |A ∩ B| / |A ∪ B| of two binary maps.

Why the careful ``argmax_location``: prototype and patch maps are usually computed on a coarse
grid and upsampled with nearest interpolation, so the maximum is attained on a whole block of
pixels. ``torch.argmax`` returns the first such pixel in raster order, i.e. the block's
top-left corner, which biases every location-based metric (pointing game, argmax shift,
EvalProtoPNet boxes) towards up-left. We take the centroid of the maximal plateau instead.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

__all__ = [
    "argmax_location",
    "pointing_game",
    "hit_rate",
    "mask_iou",
    "energy_in_mask",
]


def _as_bhw(x: Tensor, name: str = "map") -> Tensor:
    """Return ``x`` as ``(B, H, W)``; accepts ``(B, H, W)`` or ``(B, 1, H, W)``."""
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"{name} must be (B,1,H,W) or (B,H,W), got {tuple(x.shape)}")
        return x[:, 0]
    if x.dim() == 3:
        return x
    raise ValueError(f"{name} must be (B,1,H,W) or (B,H,W), got {tuple(x.shape)}")


def _as_bool(x: Tensor, name: str) -> Tensor:
    """``(B, H, W)`` bool view of a mask; float masks count as set where > 0.5."""
    x = _as_bhw(x, name)
    return x if x.dtype == torch.bool else x > 0.5


def _check_same_hw(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"attribution {tuple(a.shape)} and mask {tuple(b.shape)} must have the same (B,H,W)"
        )


def argmax_location(attribution: Tensor, connectivity: int = 8) -> Tensor:
    """Location ``(row, col)`` of each map's maximum, robust to plateaus.

    Definition: the plateau is the set of pixels with value ``>= max - tol`` where
    ``tol = 1e-6 * (|max| + 1)``. Among its connected components (``connectivity`` 4 or 8,
    via :func:`scipy.ndimage.label`) the largest is kept (ties: the first in raster order);
    its centroid is snapped to the nearest pixel *of that component* (ties: first in raster
    order), so the returned point always lies on the plateau, even for non-convex shapes
    (rings, L-shapes) whose centroid falls outside them. For a unique maximum this is plain
    ``argmax``.

    NaNs are treated as ``-inf`` (never selected unless the whole map is NaN).

    Args:
        attribution: ``(B, 1, H, W)`` or ``(B, H, W)``.
        connectivity: 4 or 8 neighbourhood for the plateau's connected components.

    Returns:
        LongTensor ``(B, 2)`` of ``(row, col)`` on the input's device.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    a = _as_bhw(attribution, "attribution")
    device = a.device
    B, H, W = a.shape
    if B == 0:
        return torch.zeros(0, 2, dtype=torch.long, device=device)

    # Connected components need scipy, hence one host round-trip for the whole batch.
    x = a.detach().to(torch.float64).cpu().numpy()  # (B,H,W)
    x = np.where(np.isnan(x), -np.inf, x)
    mx = x.reshape(B, -1).max(axis=1)  # (B,)
    with np.errstate(invalid="ignore"):
        tol = 1e-6 * (np.abs(mx) + 1.0)
        thr = np.where(np.isfinite(mx), mx - tol, mx)  # inf/-inf maps: exact ties only
    plateau = x >= thr[:, None, None]  # (B,H,W), never empty per image

    # Label all images in one call: the 3-D structure only links pixels within the same
    # (H, W) plane, so components never cross images.
    struct = np.zeros((3, 3, 3), dtype=bool)
    struct[1] = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, n = ndimage.label(plateau, structure=struct)  # (B,H,W), labels 1..n

    flat = labels.reshape(-1)
    sizes = np.bincount(flat, minlength=n + 1)  # (n+1,)
    img_of = np.zeros(n + 1, dtype=np.int64)
    img_of[flat] = np.repeat(np.arange(B), H * W)  # image index of every label
    ids = np.arange(1, n + 1)
    # Sort by (image, -size, label id): the first label of each image is its largest
    # component, ties resolved by raster order of the component's first pixel (label id).
    order = np.lexsort((ids, -sizes[1:], img_of[1:]))
    _, first = np.unique(img_of[1:][order], return_index=True)
    best = ids[order][first]  # (B,), best[b] is a label of image b

    centroids = np.asarray(
        ndimage.center_of_mass(plateau, labels, best), dtype=np.float64
    ).reshape(B, 3)  # (B, 3): (image, row, col)
    rr, cc = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")  # (H,W)
    d2 = (rr[None] - centroids[:, 1, None, None]) ** 2 + (cc[None] - centroids[:, 2, None, None]) ** 2
    d2 = np.where(labels == best[:, None, None], d2, np.inf)  # only the chosen component
    idx = d2.reshape(B, -1).argmin(axis=1)  # first minimum = raster-order tie break
    loc = np.stack([idx // W, idx % W], axis=1)  # (B,2)
    return torch.as_tensor(loc, dtype=torch.long, device=device)


def pointing_game(
    attribution: Tensor, mask: Tensor, tolerance: float = 0.0, connectivity: int = 8
) -> Tensor:
    """Per-image pointing-game hit (Zhang et al., ECCV 2016).

    Definition: 1.0 if :func:`argmax_location` of the map lies inside the ground-truth mask
    (or within ``tolerance`` pixels, Euclidean, of a mask pixel; the original paper uses
    15 px at 224 px resolution, we default to 0 = exact), 0.0 otherwise, and NaN for images
    whose mask is empty so that they are excluded from any ``nanmean``.

    Args:
        attribution: ``(B, 1, H, W)`` or ``(B, H, W)``.
        mask: same shape family, 0/1 float or bool.
        tolerance: hit radius in pixels.
        connectivity: passed to :func:`argmax_location`.

    Returns:
        FloatTensor ``(B,)``.
    """
    a = _as_bhw(attribution, "attribution")
    m = _as_bool(mask, "mask").to(a.device)  # (B,H,W) bool
    _check_same_hw(a, m)
    B, H, W = a.shape
    loc = argmax_location(a, connectivity=connectivity)  # (B,2)
    if tolerance > 0:
        rr = torch.arange(H, device=a.device).view(1, H, 1)
        cc = torch.arange(W, device=a.device).view(1, 1, W)
        d2 = (rr - loc[:, 0, None, None]) ** 2 + (cc - loc[:, 1, None, None]) ** 2  # (B,H,W)
        hit = (m & (d2 <= tolerance**2)).flatten(1).any(dim=1).float()
    else:
        hit = m[torch.arange(B, device=a.device), loc[:, 0], loc[:, 1]].float()
    empty = ~m.flatten(1).any(dim=1)
    return hit.masked_fill(empty, float("nan"))


def hit_rate(attribution: Tensor, mask: Tensor, tolerance: float = 0.0) -> float:
    """Pointing-game hit rate: ``nanmean`` of :func:`pointing_game` (empty masks excluded).

    Returns NaN when every mask is empty.
    """
    return float(torch.nanmean(pointing_game(attribution, mask, tolerance=tolerance)))


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union ``|a ∩ b| / |a ∪ b|`` of two binary maps.

    Args:
        a, b: ``(B, H, W)`` or ``(B, 1, H, W)``, bool or 0/1 float (> 0.5 counts as set).

    Returns:
        FloatTensor ``(B,)``; NaN where both maps are empty (IoU undefined).
    """
    a = _as_bool(a, "a")
    b = _as_bool(b, "b").to(a.device)
    _check_same_hw(a, b)
    inter = (a & b).flatten(1).sum(1).float()  # (B,)
    union = (a | b).flatten(1).sum(1).float()  # (B,)
    # 0/0 -> NaN by IEEE division, which is exactly the "undefined" we want.
    return inter / union


def energy_in_mask(attribution: Tensor, mask: Tensor) -> Tensor:
    """Fraction of positive attribution mass inside the mask (Score-CAM's energy pointing game).

    Definition: ``sum(relu(A) * M) / sum(relu(A))``. Negative attribution is evidence
    *against* the class and is ignored. NaN where the mask is empty (excluded, as in the
    pointing game) or the map has no positive mass (nothing to localise).

    Args:
        attribution: ``(B, 1, H, W)`` or ``(B, H, W)``.
        mask: same shape family, 0/1 float or bool.

    Returns:
        FloatTensor ``(B,)`` in ``[0, 1]`` (or NaN).
    """
    a = _as_bhw(attribution, "attribution").float()
    m = _as_bool(mask, "mask").to(a.device)
    _check_same_hw(a, m)
    pos = a.clamp(min=0).nan_to_num(0.0)  # (B,H,W)
    inside = (pos * m).flatten(1).sum(1)
    total = pos.flatten(1).sum(1)
    out = inside / total  # 0/0 -> NaN when no positive mass
    empty = ~m.flatten(1).any(dim=1)
    return out.masked_fill(empty, float("nan"))
