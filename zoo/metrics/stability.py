"""Explanation stability under small input noise (EvalProtoPNet protocol).

EvalProtoPNet (Huang et al., "Evaluation and Improvement of Interpretability for
Self-Explainable Part-Prototype Networks", ICCV 2023) perturbs the *normalised* image with
``eps ~ N(0, 0.2^2)`` clipped to ``[-0.25, 0.25]`` and calls a prototype stable when the
object parts its box hits are unchanged. Part keypoints are not available for most data
(e.g. MedMNIST), so we use the annotation-free variants under the same noise:

* argmax shift: distance between the map maxima (:func:`argmax_location`) on the clean and
  noisy input; ``argmax_unchanged`` = 1 when they coincide exactly;
* map IoU: IoU of the top ``top_fraction`` pixels of the clean and noisy maps.

The noisy input is explained for the *clean* target, so the same class map is compared.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .localization import _as_bhw, argmax_location, mask_iou
from .targets import class_targets

__all__ = ["evalprotopnet_noise", "top_fraction_mask", "explanation_stability"]


def evalprotopnet_noise(
    images: Tensor,
    generator: torch.Generator | None = None,
    std: float = 0.2,
    clip: float = 0.25,
) -> Tensor:
    """``images + clip(eps, -clip, clip)`` with ``eps ~ N(0, std^2)`` (EvalProtoPNet).

    No clamping of the result: the protocol perturbs normalised images as they are.

    Args:
        images: ``(B, C, H, W)`` normalised images.
        generator: optional seeded generator for reproducibility. Its device is used to draw
            the noise (then moved to ``images``' device), so a CPU generator gives the same
            noise whatever device the images are on.

    Returns:
        ``(B, C, H, W)`` noisy images, same device and dtype.
    """
    gen_device = generator.device if generator is not None else images.device
    eps = torch.randn(images.shape, generator=generator, device=gen_device, dtype=torch.float32)
    eps = (eps * std).clamp_(-clip, clip).to(images.device, images.dtype)
    return images + eps


def top_fraction_mask(attribution: Tensor, fraction: float) -> Tensor:
    """Boolean mask ``(B, H, W)`` of the ``max(1, round(fraction*H*W))`` highest pixels.

    A *stable* descending sort breaks ties by raster order, so equal maps always give equal
    masks (an input-independent map has IoU exactly 1 with itself).
    """
    a = _as_bhw(attribution, "attribution")
    B, H, W = a.shape
    k = max(1, min(H * W, round(fraction * H * W)))
    scores = a.reshape(B, -1).float()
    scores = scores.masked_fill(scores.isnan(), float("-inf"))  # NaN ranks last; keep +-inf
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B,HW)
    mask = torch.zeros(B, H * W, dtype=torch.bool, device=a.device)
    mask.scatter_(1, order[:, :k], True)
    return mask.view(B, H, W)


def explanation_stability(
    explain_fn: Callable[[Tensor, Tensor | None], Tensor],
    images: Tensor,
    target: Tensor | int | None = None,
    n_repeats: int = 1,
    generator: torch.Generator | None = None,
    top_fraction: float = 0.1,
    std: float = 0.2,
    clip: float = 0.25,
) -> dict[str, Tensor | float]:
    """Stability of explanations under EvalProtoPNet noise (annotation-free variant).

    For each of ``n_repeats`` noise draws, the noisy images are explained for the same
    ``target`` as the clean ones and compared with the clean map.

    Args:
        explain_fn: ``(images (B,C,H,W), target (B,) or None) -> attribution``
            ``(B,1,H,W)`` or ``(B,H,W)``. If ``target`` is None it is passed through as None
            and ``explain_fn`` chooses the class itself (then clean and noisy maps may be for
            different classes: pass the target explicitly when you can).
        images: ``(B, C, H, W)`` normalised images.
        target: ``(B,)``, an int, or None.
        n_repeats: number of noise draws; per-image results are averaged over them.
        generator: optional seeded generator (see :func:`evalprotopnet_noise`).
        top_fraction: fraction of pixels in the top-region masks compared by ``map_iou``.
        std, clip: noise parameters (EvalProtoPNet: 0.2, 0.25).

    Returns:
        dict with per-image ``(B,)`` tensors (means over repeats)
        ``argmax_shift_px`` (Euclidean pixel distance between clean and noisy argmax),
        ``argmax_shift`` (the same divided by the map diagonal ``sqrt(H^2 + W^2)``),
        ``argmax_unchanged`` (fraction of repeats with the identical argmax location),
        ``map_iou`` (IoU of the top-``top_fraction`` masks), and the scalar (Python float)
        ``stability`` = mean of ``argmax_unchanged`` over the batch.
    """
    if n_repeats < 1:
        raise ValueError("n_repeats must be >= 1")
    B = images.shape[0]
    if target is not None:
        target = class_targets(target, B, images.device)

    clean = _as_bhw(explain_fn(images, target), "attribution").detach()  # (B,H,W)
    H, W = clean.shape[-2:]
    loc0 = argmax_location(clean).float()  # (B,2)
    top0 = top_fraction_mask(clean, top_fraction)  # (B,H,W)

    shift = torch.zeros(B, device=clean.device)
    unchanged = torch.zeros(B, device=clean.device)
    iou = torch.zeros(B, device=clean.device)
    for _ in range(n_repeats):
        noisy_images = evalprotopnet_noise(images, generator=generator, std=std, clip=clip)
        noisy = _as_bhw(explain_fn(noisy_images, target), "attribution").detach().to(clean.device)
        if noisy.shape != clean.shape:
            raise ValueError(f"noisy map {tuple(noisy.shape)} != clean map {tuple(clean.shape)}")
        d = (argmax_location(noisy).float() - loc0).norm(dim=1)  # (B,)
        shift += d
        unchanged += (d == 0).float()
        iou += mask_iou(top0, top_fraction_mask(noisy, top_fraction))

    shift /= n_repeats
    unchanged /= n_repeats
    iou /= n_repeats
    return {
        "argmax_shift_px": shift,
        "argmax_shift": shift / math.hypot(H, W),
        "argmax_unchanged": unchanged,
        "map_iou": iou,
        "stability": float(unchanged.mean()),
    }
