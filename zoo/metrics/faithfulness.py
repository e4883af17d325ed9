"""Faithfulness: deletion and insertion AUC (RISE; Petsiuk, Das & Saenko, BMVC 2018).

Definition (RISE, Sec. 4.1): order the pixels by attribution, most important first.
* Deletion: starting from the image, replace the first ``k_t`` pixels by a "removed"
  substrate (a constant, 0.0 = mid-grey for images normalised to [-1, 1]); a faithful map
  makes the target probability drop fast, so **lower AUC is better**.
* Insertion: starting from a blurred copy of the image, put the first ``k_t`` true pixels
  back; a faithful map makes the probability rise fast, so **higher AUC is better**.

Here ``k_t = round(t * H * W / steps)`` for ``t = 0..steps`` (so both curves have
``steps + 1`` points from 0 % to 100 % of the pixels), all channels of a pixel change
together, and the AUC is the trapezoid rule over the exact fraction ``x_t = k_t / (H W)``
in ``[0, 1]``.

Why hand-written: ``captum.metrics`` provides ``infidelity`` and ``sensitivity_max`` but not
RISE deletion/insertion, and Quantus (which has them) is not a dependency of the zoo.
Differences from RISE's reference code: RISE blurs with an 11x11 kernel, sigma 5 at 224 px
and steps by a fixed number of pixels; we default to sigma = max(H, W) / 8 (so that the
substrate carries little class evidence at any resolution, e.g. 28 px MedMNIST) and to a
fixed number of steps; both are arguments.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from .targets import targets_or_predictions

__all__ = ["deletion_insertion", "auc", "target_probability", "make_substrate"]

Mode = Literal["deletion", "insertion", "both"]
Substrate = Literal["constant", "blur"] | Tensor
Activation = Literal["softmax", "sigmoid"] | None


def _as_bhw(x: Tensor) -> Tensor:
    """``(B, H, W)`` view of an attribution given as ``(B, H, W)`` or ``(B, 1, H, W)``."""
    if x.dim() == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() == 3:
        return x
    raise ValueError(f"attribution must be (B,1,H,W) or (B,H,W), got {tuple(x.shape)}")


def target_probability(logits: Tensor, target: Tensor, activation: Activation = "softmax") -> Tensor:
    """Score of ``target`` per row: softmax probability (single-label), sigmoid (multi-label)
    or the raw logit (``activation=None``).

    Args:
        logits: ``(N, K)``.
        target: LongTensor ``(N,)``.

    Returns:
        ``(N,)``.
    """
    if activation == "softmax":
        scores = logits.float().softmax(dim=1)
    elif activation == "sigmoid":
        scores = logits.float().sigmoid()
    elif activation is None:
        scores = logits.float()
    else:
        raise ValueError(f"activation must be 'softmax', 'sigmoid' or None, got {activation!r}")
    return scores.gather(1, target.view(-1, 1)).squeeze(1)


def make_substrate(
    images: Tensor,
    kind: Substrate,
    value: float = 0.0,
    blur_sigma: float | None = None,
) -> Tensor:
    """The image a pixel takes when it is "removed" (deletion) or before it is "inserted".

    Args:
        images: ``(B, C, H, W)``.
        kind: ``"constant"`` (every pixel = ``value``), ``"blur"`` (Gaussian blur of the
            image, sigma ``blur_sigma``, default ``max(H, W) / 8``), or a tensor broadcastable
            to ``images``.

    Returns:
        ``(B, C, H, W)`` on ``images``' device.
    """
    if isinstance(kind, Tensor):
        return kind.to(images.device, images.dtype).expand_as(images)
    if kind == "constant":
        return torch.full_like(images, value)
    if kind == "blur":
        H, W = images.shape[-2:]
        sigma = float(blur_sigma) if blur_sigma is not None else max(H, W) / 8.0
        # Odd kernel covering +-3 sigma, capped so that torchvision's reflect padding
        # (kernel // 2) stays smaller than the image.
        k = min(2 * math.ceil(3.0 * sigma) + 1, 2 * min(H, W) - 1)
        return gaussian_blur(images, kernel_size=[k, k], sigma=[sigma, sigma])
    raise ValueError(f"substrate must be 'constant', 'blur' or a Tensor, got {kind!r}")


def auc(curve: Tensor, x: Tensor | None = None) -> Tensor:
    """Trapezoid area under ``curve`` ``(B, S+1)`` over ``x`` ``(S+1,)`` (default: uniform
    on [0, 1]). Returns ``(B,)``."""
    if x is None:
        x = torch.linspace(0.0, 1.0, curve.shape[1], device=curve.device, dtype=curve.dtype)
    return torch.trapezoid(curve, x=x.to(curve.dtype), dim=1)


@torch.no_grad()
def deletion_insertion(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    attribution: Tensor,
    target: Tensor | int | None = None,
    steps: int = 32,
    mode: Mode = "both",
    substrate_deletion: Substrate = "constant",
    substrate_insertion: Substrate = "blur",
    baseline_value: float = 0.0,
    blur_sigma: float | None = None,
    activation: Activation = "softmax",
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """Deletion / insertion curves and AUCs (RISE, Petsiuk et al. 2018).

    Pixels are ranked by attribution, descending, with a *stable* sort so ties keep raster
    order (deterministic). At step ``t`` the top ``k_t = round(t*H*W/steps)`` pixels are
    switched from the start image to the end image:
    deletion: image -> ``substrate_deletion``; insertion: ``substrate_insertion`` -> image.

    Args:
        model: callable ``(N, C, H, W) -> logits (N, K)``, already in eval mode.
        images: ``(B, C, H, W)`` (normalised; default baseline 0.0 is mid-grey in [-1, 1]).
        attribution: ``(B, 1, H, W)`` or ``(B, H, W)``; higher = more evidence for target.
        target: class per image ``(B,)`` or one int; ``None`` = the model's prediction.
        steps: number of steps S (curves have S + 1 points).
        mode: ``"deletion"``, ``"insertion"`` or ``"both"``.
        substrate_deletion / substrate_insertion: ``"constant"``, ``"blur"`` or a tensor,
            see :func:`make_substrate`.
        baseline_value: value of the ``"constant"`` substrate.
        blur_sigma: sigma of the ``"blur"`` substrate (default ``max(H, W) / 8``).
        activation: ``"softmax"`` (single-label), ``"sigmoid"`` (multi-label) or None (logit).
        batch_size: number of perturbed images per forward pass (bounds memory).

    Returns:
        dict with, for each requested mode ``m``: ``m`` -> AUC ``(B,)`` and
        ``f"{m}_curve"`` -> ``(B, steps+1)``, plus ``"fraction"`` -> ``(steps+1,)`` (x axis).
    """
    if mode not in ("deletion", "insertion", "both"):
        raise ValueError(f"mode must be 'deletion', 'insertion' or 'both', got {mode!r}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    B, C, H, W = images.shape
    device = images.device
    attr = _as_bhw(attribution).to(device)
    if attr.shape != (B, H, W):
        raise ValueError(f"attribution {tuple(attr.shape)} does not match images {(B, H, W)}")
    HW = H * W
    tgt = targets_or_predictions(model, images, target, batch_size)  # (B,)

    # rank[b, p] = position of pixel p in image b's importance order (0 = most important).
    scores = attr.reshape(B, HW).float()
    scores = scores.masked_fill(scores.isnan(), float("-inf"))  # NaN ranks last; keep +-inf
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B,HW)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(HW, device=device).expand(B, HW))
    # k_t = round(t*HW/steps), round-half-up in exact integer arithmetic.
    t = torch.arange(steps + 1, device=device)
    k = (2 * t * HW + steps) // (2 * steps)  # (S+1,), k_0 = 0, k_S = HW
    frac = k.double() / HW  # exact x axis for the trapezoid

    modes = ["deletion", "insertion"] if mode == "both" else [mode]
    out: dict[str, Tensor] = {"fraction": frac.float()}
    S1 = steps + 1
    for m in modes:
        if m == "deletion":
            start, end = images, make_substrate(images, substrate_deletion, baseline_value, blur_sigma)
        else:
            start, end = make_substrate(images, substrate_insertion, baseline_value, blur_sigma), images
        curve = torch.empty(B * S1, device=device)
        # Enumerate all (image, step) pairs and evaluate them in chunks of batch_size, so
        # memory is bounded by batch_size images whatever B and steps are.
        for lo in range(0, B * S1, batch_size):
            idx = torch.arange(lo, min(lo + batch_size, B * S1), device=device)
            bi, ti = idx // S1, idx % S1  # (n,), (n,)
            switched = rank[bi] < k[ti, None]  # (n,HW): pixels already switched at step t
            x = torch.where(switched.view(-1, 1, H, W), end[bi], start[bi])  # (n,C,H,W)
            curve[lo : lo + len(idx)] = target_probability(model(x), tgt[bi], activation)
        curve = curve.view(B, S1)
        out[m] = auc(curve.double(), frac).float()
        out[f"{m}_curve"] = curve
    return out
