"""Receptive field of a feature cell by conv arithmetic (ProtoPNet's ``compute_proto_layer_rf_info``).

Walking the Conv2d / MaxPool2d / AvgPool2d layers in registration order (= forward order for a chain
such as the zoo CNN, its add-on and VGG-style timm models), each layer with kernel k, stride s,
padding p and dilation d updates, from the input (jump 1, size 1, start 0: pixel 0's centre):

    jump  ← jump·s,   size ← size + (d(k−1))·jump_in,   start ← start + (d(k−1)/2 − p)·jump_in

Feature cell i then sees input pixels [start + i·jump − (size−1)/2, start + i·jump + (size−1)/2],
clipped to the image (:func:`rf_boxes`). As in the paper's arithmetic, input rows a strided layer
drops at the far edge (floor in its output size) are not tracked: there a box may overshoot the true
field by less than the jump. Where this is not exact otherwise (``ReceptiveField.exact`` False):
parallel branches — a residual ``downsample`` branch is skipped (its stride repeats the main path's;
the residual sum's receptive field is the main path's, the larger) but other branches are walked as if
chained — and attention/global pooling, whose receptive field is the whole image (then the whole
image is returned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ReceptiveField:
    jump: int  # input pixels between neighbouring feature cells (the stride of the stack)
    size: int  # receptive field side in input pixels (before clipping to the image)
    start: float  # centre (pixel index) of feature cell 0's receptive field
    exact: bool = True  # False: a branch or global operation the walk cannot follow (module docstring)


def _pair(v) -> int:
    v = v if isinstance(v, (tuple, list)) else (v, v)
    if v[0] != v[1]:
        raise ValueError(f"receptive_field: non-square kernel/stride/padding {tuple(v)} is not supported")
    return int(v[0])


def receptive_field(*modules: nn.Module) -> ReceptiveField:
    """The receptive field of the output of ``modules`` applied in order (module docstring)."""
    jump, size, start, exact = 1, 1, 0.0, True
    for root in modules:
        for name, m in root.named_modules():
            if "downsample" in name.split("."):  # residual shortcut: in parallel with the main path
                continue
            kind = type(m).__name__.lower()
            if "attention" in kind or isinstance(m, (nn.MultiheadAttention, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                exact = False
                size = 10 ** 9  # global: every pixel
                continue
            if not isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                continue
            k, s = _pair(m.kernel_size), _pair(m.stride)
            p = _pair(m.padding) if not isinstance(m.padding, str) else (k - 1) // 2  # "same"
            d = _pair(m.dilation) if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) else 1
            size = min(size + d * (k - 1) * jump, 10 ** 9)
            start += (d * (k - 1) / 2 - p) * jump
            jump *= s
    return ReceptiveField(jump, size, start, exact)


def rf_boxes(location: Tensor, rf: ReceptiveField, image_size: int | tuple[int, int]) -> Tensor:
    """(N,2) feature (row, col) → (N,4) long (y0, x0, y1, x1) inclusive input box, clipped to the image."""
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    half = (rf.size - 1) / 2
    centre = rf.start + location.double() * rf.jump  # (N,2)
    lo = torch.ceil(centre - half - 1e-9).long()
    hi = torch.floor(centre + half + 1e-9).long()
    y0, x0 = lo[:, 0].clamp(0, H - 1), lo[:, 1].clamp(0, W - 1)
    y1, x1 = hi[:, 0].clamp(0, H - 1), hi[:, 1].clamp(0, W - 1)
    return torch.stack([y0, x0, y1, x1], 1)


def rf_axis(n: int, N: int, rf: ReceptiveField) -> tuple[Tensor, Tensor]:
    """One axis: for each of n feature cells the first and last (inclusive) input pixel of its field."""
    loc = torch.arange(n)[:, None].expand(n, 2)
    box = rf_boxes(loc, rf, (N, N))
    return box[:, 0], box[:, 2]
