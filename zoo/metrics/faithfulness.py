"""Faithfulness: deletion and insertion AUC (RISE; Petsiuk, Das & Saenko, BMVC 2018), on several
substrates and with fair tie handling.

Definition (RISE, Sec. 4.1): order the pixels by attribution, most important first.
* Deletion: starting from the image, replace the first ``k_t`` pixels by a "removed"
  substrate; a faithful map makes the target probability drop fast, so **lower AUC is better**.
* Insertion: starting from a substrate, put the first ``k_t`` true pixels back; a faithful map
  makes the probability rise fast, so **higher AUC is better**.

Here ``k_t = round(t * H * W / steps)`` for ``t = 0..steps`` (so both curves have
``steps + 1`` points from 0 % to 100 % of the pixels), all channels of a pixel change
together, and the AUC is the trapezoid rule over the exact fraction ``x_t = k_t / (H W)``
in ``[0, 1]``.

Substrates (:func:`make_substrate`): ``"grey"`` (a constant, 0.0 = mid-grey for images
normalised to [-1, 1]; ``"constant"`` is the same), ``"blur"`` (Gaussian blur of the image) and
``"noise"`` (Gaussian noise with each image's per-channel mean and std, clipped to its range,
seeded). A model can be
trained on one of them (MedicalPatchNet's blank-patch penalty teaches grey patches to vote for no
class), so :func:`faithfulness` measures all of them and its headline is the **worst** one (the
highest deletion AUC, the lowest insertion AUC): no family wins by the substrate it was trained on.

Ties (``ties=``): a map with plateaus (ProtoPNet's upsampled map is mostly exactly 0) has no
pixel order inside a plateau, and raster order (a stable sort) then decides the curve.
* ``"plateau"`` (default): pixels of equal score switch together. At a step that cuts a plateau
  of ``n`` pixels whose first rank is ``s``, every pixel of it moves the fraction
  ``clamp((k_t - s) / n, 0, 1)`` from start to end value (``x = start + f (end - start)``).
  That is the *expected image* under a uniformly random order inside the plateau — exact,
  deterministic and no extra forward passes — but not the expected *model output* (the model
  is not linear), so it is a deviation from RISE, chosen for cost; for a map without ties it is
  identical to RISE.
* ``"random"``: a random order inside each plateau, the curve averaged over ``tie_draws``
  draws of a seeded generator — the unbiased estimator of the expected score, ``tie_draws``
  times the forward passes.
* ``"raster"``: the old behaviour (stable sort, ties in raster order), kept for comparison.

Why hand-written: ``captum.metrics`` provides ``infidelity`` and ``sensitivity_max`` but not
RISE deletion/insertion, and Quantus (which has them) is not a dependency of the zoo.
Differences from RISE's reference code: RISE blurs with an 11x11 kernel, sigma 5 at 224 px
and steps by a fixed number of pixels; we default to sigma = max(H, W) / 8 (so that the
substrate carries little class evidence at any resolution, e.g. 28 px MedMNIST) and to a
fixed number of steps; both are arguments. RISE deletes to a constant and inserts from blur;
:func:`deletion_insertion` keeps that pairing as its default.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from .targets import targets_or_predictions

__all__ = ["deletion_insertion", "faithfulness", "auc", "target_probability", "make_substrate", "SUBSTRATES"]

Mode = Literal["deletion", "insertion", "both"]
Substrate = Literal["grey", "constant", "blur", "noise"] | Tensor
Ties = Literal["plateau", "random", "raster"]
Activation = Literal["softmax", "sigmoid"] | None
SUBSTRATES = ("grey", "blur", "noise")  # what `faithfulness` measures by default


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
    noise_seed: int = 0,
) -> Tensor:
    """The image a pixel takes when it is "removed" (deletion) or before it is "inserted".

    Args:
        images: ``(B, C, H, W)``.
        kind: ``"grey"`` / ``"constant"`` (every pixel = ``value``), ``"blur"`` (Gaussian blur
            of the image, sigma ``blur_sigma``, default ``max(H, W) / 8``), ``"noise"``
            (i.i.d. Gaussian pixels with each image's per-channel mean and std, clipped to the
            image's value range: its colour statistics without its structure; drawn on the CPU
            from ``noise_seed``, so the same on every device), or a tensor broadcastable to ``images``.

    Returns:
        ``(B, C, H, W)`` on ``images``' device.
    """
    if isinstance(kind, Tensor):
        return kind.to(images.device, images.dtype).expand_as(images)
    if kind in ("grey", "constant"):
        return torch.full_like(images, value)
    if kind == "blur":
        H, W = images.shape[-2:]
        sigma = float(blur_sigma) if blur_sigma is not None else max(H, W) / 8.0
        # Odd kernel covering +-3 sigma, capped so that torchvision's reflect padding
        # (kernel // 2) stays smaller than the image.
        k = min(2 * math.ceil(3.0 * sigma) + 1, 2 * min(H, W) - 1)
        return gaussian_blur(images, kernel_size=[k, k], sigma=[sigma, sigma])
    if kind == "noise":
        g = torch.Generator().manual_seed(noise_seed)
        eps = torch.randn(images.shape, generator=g, dtype=torch.float32).to(images.device, images.dtype)
        mean = images.mean(dim=(2, 3), keepdim=True)
        std = images.std(dim=(2, 3), keepdim=True) if images.shape[2] * images.shape[3] > 1 else 0.0
        lo, hi = images.amin(dim=(1, 2, 3), keepdim=True), images.amax(dim=(1, 2, 3), keepdim=True)
        return torch.maximum(torch.minimum(mean + std * eps, hi), lo)  # stay in the image's range
    raise ValueError(f"substrate must be 'grey', 'constant', 'blur', 'noise' or a Tensor, got {kind!r}")


def auc(curve: Tensor, x: Tensor | None = None) -> Tensor:
    """Trapezoid area under ``curve`` ``(B, S+1)`` over ``x`` ``(S+1,)`` (default: uniform
    on [0, 1]). Returns ``(B,)``."""
    if x is None:
        x = torch.linspace(0.0, 1.0, curve.shape[1], device=curve.device, dtype=curve.dtype)
    return torch.trapezoid(curve, x=x.to(curve.dtype), dim=1)


def _switch_positions(scores: Tensor, ties: Ties, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Per pixel ``(first, size)`` ``(B, HW)``: a pixel switches by ``clamp((k - first)/size, 0, 1)``.

    ``"plateau"``: ``first`` = the first rank of the pixel's tie group, ``size`` = its size;
    otherwise ``first`` = the pixel's rank (ties in raster or random order) and ``size`` = 1.
    """
    B, HW = scores.shape
    device = scores.device
    if ties == "random":  # shuffle, then a stable sort: ties keep the (random) shuffled order
        perm = torch.argsort(torch.rand(B, HW, generator=generator, device=generator.device if generator else "cpu")
                             .to(device), dim=1)
        order = perm.gather(1, torch.sort(scores.gather(1, perm), dim=1, descending=True, stable=True).indices)
    else:
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B,HW)
    positions = torch.arange(HW, device=device).expand(B, HW)
    first = torch.empty_like(order)
    size = torch.ones_like(order)
    if ties != "plateau":
        first.scatter_(1, order, positions)
        return first, size
    sorted_scores = scores.gather(1, order)
    new_group = torch.ones(B, HW, dtype=torch.bool, device=device)
    new_group[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    group_first = torch.where(new_group, positions, torch.zeros_like(positions)).cummax(dim=1).values
    group_id = new_group.long().cumsum(dim=1) - 1  # (B,HW), 0..G-1 in rank order
    counts = torch.zeros(B, HW, dtype=torch.long, device=device).scatter_add_(1, group_id, torch.ones_like(group_id))
    first.scatter_(1, order, group_first)
    size.scatter_(1, order, counts.gather(1, group_id))
    return first, size


@torch.no_grad()
def faithfulness(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    attribution: Tensor,
    target: Tensor | int | None = None,
    steps: int = 32,
    deletion: Sequence[Substrate] = SUBSTRATES,
    insertion: Sequence[Substrate] = SUBSTRATES,
    ties: Ties = "plateau",
    tie_draws: int = 4,
    baseline_value: float = 0.0,
    blur_sigma: float | None = None,
    activation: Activation = "softmax",
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Deletion curves to each substrate in ``deletion`` and insertion curves from each in
    ``insertion``, all evaluated in one chunked pass (RISE, Petsiuk et al. 2018; see the module
    docstring for the substrates and ``ties``).

    Args:
        model: callable ``(N, C, H, W) -> logits (N, K)``, already in eval mode.
        images: ``(B, C, H, W)`` (normalised; default grey 0.0 is mid-grey in [-1, 1]).
        attribution: ``(B, 1, H, W)`` or ``(B, H, W)``; higher = more evidence for target.
        target: class per image ``(B,)`` or one int; ``None`` = the model's prediction.
        steps: number of steps S (curves have S + 1 points).
        deletion / insertion: substrates (names or tensors, :func:`make_substrate`); either may
            be empty.
        ties: ``"plateau"``, ``"random"`` or ``"raster"`` (module docstring).
        tie_draws: draws averaged when ``ties="random"``.
        baseline_value: value of the ``"grey"`` substrate.
        blur_sigma: sigma of the ``"blur"`` substrate (default ``max(H, W) / 8``).
        activation: ``"softmax"`` (single-label), ``"sigmoid"`` (multi-label) or None (logit).
        batch_size: number of perturbed images per forward pass (bounds memory).
        generator: the tie order's generator for ``ties="random"`` (default: seed 0, CPU).

    Returns:
        dict with ``f"deletion[{name}]"`` / ``f"insertion[{name}]"`` -> AUC ``(B,)`` and
        ``f"..._curve[{name}]"`` -> ``(B, steps+1)`` per substrate (a tensor substrate is named
        by its position, ``"0"``, ``"1"``, ...), plus ``"fraction"`` -> ``(steps+1,)``.
    """
    if ties not in ("plateau", "random", "raster"):
        raise ValueError(f"ties must be 'plateau', 'random' or 'raster', got {ties!r}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if ties == "random" and tie_draws < 1:
        raise ValueError("tie_draws must be >= 1")
    B, C, H, W = images.shape
    device = images.device
    attr = _as_bhw(attribution).to(device)
    if attr.shape != (B, H, W):
        raise ValueError(f"attribution {tuple(attr.shape)} does not match images {(B, H, W)}")
    HW = H * W
    tgt = targets_or_predictions(model, images, target, batch_size)  # (B,)
    scores = attr.reshape(B, HW).float()
    scores = scores.masked_fill(scores.isnan(), float("-inf"))  # NaN ranks last; keep +-inf
    draws = tie_draws if ties == "random" else 1
    if ties == "random" and generator is None:
        generator = torch.Generator().manual_seed(0)
    switch = [_switch_positions(scores, ties, generator) for _ in range(draws)]
    first = torch.stack([f for f, _ in switch]).float()  # (D,B,HW)
    size = torch.stack([s for _, s in switch]).float()
    # k_t = round(t*HW/steps), round-half-up in exact integer arithmetic.
    t = torch.arange(steps + 1, device=device)
    k = (2 * t * HW + steps) // (2 * steps)  # (S+1,), k_0 = 0, k_S = HW
    frac = k.double() / HW  # exact x axis for the trapezoid

    def name(s: Substrate, i: int) -> str:
        return str(i) if isinstance(s, Tensor) else ("grey" if s == "constant" else s)

    jobs: list[tuple[str, Tensor, Tensor]] = []  # (key, start, end)
    for i, s in enumerate(deletion):
        jobs.append((f"deletion[{name(s, i)}]", images, make_substrate(images, s, baseline_value, blur_sigma)))
    for i, s in enumerate(insertion):
        jobs.append((f"insertion[{name(s, i)}]", make_substrate(images, s, baseline_value, blur_sigma), images))
    out: dict[str, Tensor] = {"fraction": frac.float()}
    if not jobs:
        return out
    starts = torch.stack([j[1] for j in jobs])  # (J,B,C,H,W)
    deltas = torch.stack([j[2] for j in jobs]) - starts
    J, S1 = len(jobs), steps + 1
    n_rows = J * draws * B * S1
    curve = torch.empty(n_rows, device=device)
    kf = k.float()
    # Enumerate all (job, draw, image, step) rows and evaluate them in chunks of batch_size, so
    # memory is bounded by batch_size images whatever B, steps and the number of substrates are.
    for lo in range(0, n_rows, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, n_rows), device=device)
        ti, bi = idx % S1, (idx // S1) % B
        di, ji = (idx // (S1 * B)) % draws, idx // (S1 * B * draws)
        f = ((kf[ti, None] - first[di, bi]) / size[di, bi]).clamp_(0.0, 1.0)  # (n,HW) switched fraction
        x = torch.addcmul(starts[ji, bi], f.view(-1, 1, H, W).to(images.dtype), deltas[ji, bi])
        curve[lo : lo + len(idx)] = target_probability(model(x), tgt[bi], activation)
    curve = curve.view(J, draws, B, S1).mean(dim=1)  # random ties: the mean over draws
    for j, (key, _, _) in enumerate(jobs):
        mode, sub = key.split("[")
        out[key] = auc(curve[j].double(), frac).float()
        out[f"{mode}_curve[{sub}"] = curve[j]
    return out


@torch.no_grad()
def deletion_insertion(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    attribution: Tensor,
    target: Tensor | int | None = None,
    steps: int = 32,
    mode: Mode = "both",
    substrate_deletion: Substrate = "grey",
    substrate_insertion: Substrate = "blur",
    baseline_value: float = 0.0,
    blur_sigma: float | None = None,
    activation: Activation = "softmax",
    batch_size: int = 256,
    ties: Ties = "plateau",
    tie_draws: int = 4,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Deletion / insertion curves and AUCs on one substrate each (RISE's pairing by default:
    delete to grey, insert from blur); :func:`faithfulness` with one substrate per mode.

    At step ``t`` the top ``k_t = round(t*H*W/steps)`` pixels are switched from the start image
    to the end image (deletion: image -> ``substrate_deletion``; insertion:
    ``substrate_insertion`` -> image); equal-score pixels are handled by ``ties`` (module
    docstring; default ``"plateau"``: they switch together).

    Returns:
        dict with, for each requested mode ``m``: ``m`` -> AUC ``(B,)`` and
        ``f"{m}_curve"`` -> ``(B, steps+1)``, plus ``"fraction"`` -> ``(steps+1,)`` (x axis).
    """
    if mode not in ("deletion", "insertion", "both"):
        raise ValueError(f"mode must be 'deletion', 'insertion' or 'both', got {mode!r}")
    res = faithfulness(
        model, images, attribution, target, steps,
        deletion=[substrate_deletion] if mode in ("deletion", "both") else [],
        insertion=[substrate_insertion] if mode in ("insertion", "both") else [],
        ties=ties, tie_draws=tie_draws, baseline_value=baseline_value, blur_sigma=blur_sigma,
        activation=activation, batch_size=batch_size, generator=generator)
    out: dict[str, Tensor] = {"fraction": res["fraction"]}
    for key, value in res.items():
        if key != "fraction":
            plain = key.split("[")[0]
            out[plain] = value
    return out
