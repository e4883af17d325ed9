"""Helpers shared by the patch-based families (MedicalPatchNet, BagNet): patch grids, valid-conv
patch networks whose receptive field is exactly known, dense window evaluation and splatting.

Nothing here knows about a family; ``zoo.models.patchnet`` and ``zoo.models.bagnet`` both import
it and never each other.

Geometry conventions (used throughout):
  * a *window* of size P at top-left (i, j) covers input pixels [i, i+P) × [j, j+P);
  * a valid (unpadded) conv net with receptive field R maps an H×W input to (H-R+1)×(W-R+1)
    outputs, output (i, j) seeing exactly the window of size R at top-left (i, j).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ---------------------------------------------------------------------- patch grids
def pad_to_multiple(x: Tensor, patch: int, value: float = 0.0) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Pad (B,C,H,W) symmetrically (extra pixel bottom/right) so H and W are multiples of `patch`.

    Returns the padded tensor and the (left, right, top, bottom) padding used.
    """
    H, W = x.shape[-2:]
    ph, pw = (-H) % patch, (-W) % patch
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return (F.pad(x, pads, value=value) if any(pads) else x), pads


def to_patches(x: Tensor, patch: int, stride: int | None = None) -> Tensor:
    """(B,C,H,W) → (B, n, C, P, P): every P×P window at `stride` (default P: non-overlapping), raster order."""
    B, C = x.shape[:2]
    cols = F.unfold(x, kernel_size=patch, stride=stride or patch)  # (B, C·P·P, n)
    return cols.transpose(1, 2).reshape(B, -1, C, patch, patch)


def splat_windows(values: Tensor, patch: int, stride: int, out_hw: tuple[int, int]) -> Tensor:
    """Average window values back onto pixels: (B,K,h,w) window values at `stride` → (B,K,H,W).

    Pixel p receives the mean of the values of every window that covers it (windows laid out as
    ``F.unfold`` lays them out on an H×W canvas). Pixels no window covers get 0.
    """
    B, K, h, w = values.shape
    if stride == 1 and out_hw == (h + patch - 1, w + patch - 1):
        # Stride 1: a P×P box sum over the zero-padded window grid (avg_pool2d), instead of folding
        # P² copies of every value; the count of covering windows is the same box sum of ones.
        pad = (patch - 1,) * 4
        total = F.avg_pool2d(F.pad(values, pad), patch, stride=1)
        count = F.avg_pool2d(F.pad(torch.ones_like(values[:1, :1]), pad), patch, stride=1)
        return total / count  # the P² factors cancel; every pixel of the canvas has ≥ 1 window
    cols = values.reshape(B, K, 1, h * w).expand(B, K, patch * patch, h * w).reshape(B, K * patch * patch, h * w)
    total = F.fold(cols, out_hw, kernel_size=patch, stride=stride)  # (B,K,H,W) sum of covering windows
    ones = torch.ones(1, patch * patch, h * w, dtype=values.dtype, device=values.device)
    count = F.fold(ones, out_hw, kernel_size=patch, stride=stride)  # (1,1,H,W) number of covering windows
    return total / count.clamp(min=1)


def nearest_owner(centres: Sequence[float], size: int) -> Tensor:
    """For points (receptive-field / patch centres) along one axis of length `size`: the index of the
    nearest centre for every pixel, shape (size,) (ties → the lower centre).

    Used to place a coarse map on the pixels so that it still adds up: the map value of centre i is
    spread over its nearest-neighbour cell, divided by the cell's area (see :func:`place_map`).
    """
    c = torch.as_tensor(list(centres), dtype=torch.float64)  # (n,)
    pix = torch.arange(size, dtype=torch.float64)  # (size,)
    owner = (pix[:, None] - c[None, :]).abs().argmin(dim=1)  # (size,) first minimum = lower centre on ties
    return owner


def place_map(values: Tensor, centres_y: Sequence[float], centres_x: Sequence[float], out_hw: tuple[int, int]) -> Tensor:
    """Place a (B,K,h,w) map whose entries sit at pixel coordinates (centres_y[i], centres_x[j]) onto an
    H×W canvas: every pixel takes the value of its nearest centre (nearest upsampling) times
    ``H·W / (h·w·|cell|)``, so the pixel mean of the result equals the mean of `values` exactly.

    For a non-overlapping patch grid (cells = patches of P² pixels, H·W = h·w·P²) the factor is 1:
    the result is the plain nearest-upsampled map.
    """
    B, K, h, w = values.shape
    H, W = out_hw
    oy = nearest_owner(centres_y, H).to(values.device)  # (H,) owner row index
    ox = nearest_owner(centres_x, W).to(values.device)  # (W,)
    area = torch.bincount(oy, minlength=h)[:, None] * torch.bincount(ox, minlength=w)[None, :]  # (h,w) cell sizes
    if (area == 0).any():
        raise ValueError("every map location needs at least one pixel in its cell (centres outside the image?)")
    scale = (H * W) / (h * w * area.to(values.dtype))  # (h,w)
    scaled = values * scale  # (B,K,h,w)
    return scaled[:, :, oy][:, :, :, ox]  # (B,K,H,W)


def cell_mean(values: Tensor, centres_y: Sequence[float], centres_x: Sequence[float]) -> Tensor:
    """(B,K,H,W) → (B,K,H,W): every pixel replaced by the mean of `values` over its cell, the cells
    being those of :func:`place_map` (pixels sharing the nearest centre)."""
    B, K, H, W = values.shape
    h, w = len(centres_y), len(centres_x)
    oy = nearest_owner(centres_y, H).to(values.device)  # (H,)
    ox = nearest_owner(centres_x, W).to(values.device)  # (W,)
    cell = (oy[:, None] * w + ox[None, :]).flatten()  # (H·W,) cell index of every pixel
    sums = values.new_zeros(B, K, h * w).index_add_(2, cell, values.flatten(2))  # (B,K,h·w)
    counts = torch.bincount(cell, minlength=h * w).to(values.dtype).clamp(min=1)
    return (sums / counts)[:, :, cell].view(B, K, H, W)


# ---------------------------------------------------------------------- valid-conv networks
class ValidConvNet(nn.Module):
    """A stack of unpadded convs (BN, ReLU) and 2×2 max-pools with an exactly known receptive field.

    ``layers`` is a list of specs: ``("conv", out_channels, kernel)`` or ``("pool",)``. Because nothing
    is padded, output (i, j) depends on exactly the input window of size :attr:`receptive_field` at
    top-left (i·stride, j·stride), and nothing else.

    :meth:`dense` runs the *same weights* with every pool at stride 1 and later layers dilated (the
    "filter rarefaction" / à-trous trick of fully convolutional nets), which gives the outputs of
    every window at stride 1 in one pass — identical to evaluating each window separately.
    """

    def __init__(self, in_channels: int, layers: Sequence[Sequence], final_relu: bool = True) -> None:
        super().__init__()
        self.specs = [tuple(s) for s in layers]
        self.body = nn.ModuleList()
        channels, rf, jump = in_channels, 1, 1
        convs = [i for i, s in enumerate(self.specs) if s[0] == "conv"]
        for i, spec in enumerate(self.specs):
            if spec[0] == "conv":
                _, width, kernel = spec
                last = i == convs[-1]
                block = [nn.Conv2d(channels, width, kernel, bias=False), nn.BatchNorm2d(width)]
                if final_relu or not last:
                    block.append(nn.ReLU(inplace=True))
                self.body.append(nn.Sequential(*block))
                channels, rf = width, rf + (kernel - 1) * jump
            elif spec[0] == "pool":
                self.body.append(nn.MaxPool2d(2))
                rf, jump = rf + jump, jump * 2
            else:
                raise ValueError(f"unknown layer spec {spec!r}; expected ('conv', width, kernel) or ('pool',)")
        self.out_channels, self.receptive_field, self.stride = channels, rf, jump

    def forward(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,D,(H-R)/stride+1, ...)
        for layer in self.body:
            x = layer(x)
        return x

    def dense(self, x: Tensor) -> Tensor:
        """(B,C,H,W) → (B,D,H-R+1,W-R+1): outputs of every window at stride 1, one pass."""
        dilation = 1
        for layer in self.body:
            if isinstance(layer, nn.MaxPool2d):
                x = F.max_pool2d(x, 2, stride=1, dilation=dilation)
                dilation *= 2
            else:
                conv, rest = layer[0], layer[1:]
                x = rest(F.conv2d(x, conv.weight, None, stride=1, dilation=dilation))
        return x


def patch_cnn_layers(patch: int, widths: Sequence[int]) -> list[tuple]:
    """Layer specs of a valid-conv CNN whose receptive field is exactly `patch` and that maps one
    P×P patch to a 1×1 feature vector.

    Large patches (> 8 px) first go through stages of two 3×3 convs + a 2×2 pool (pool only when the
    size left is even); then 3×3 convs shrink the patch while ≥ 4 px are left, a conv whose kernel
    is the size left closes it to 1×1, and a 1×1 conv adds a nonlinearity on the patch vector. Each
    new stage / conv takes the next entry of `widths` (the last repeats). Examples:
    P=8 → 3,1,3,1,3,1,2,1 (8→6→4→2→1); P=7 → 3,1,3,1,3,1; P=14 → 3,3,pool,3,1,3,1.
    """
    if patch < 2:
        raise ValueError(f"patch_size must be ≥ 2, got {patch}")
    layers: list[tuple] = []
    size, step = patch, 0

    def width() -> int:
        return widths[min(step, len(widths) - 1)]

    while size > 8:
        layers += [("conv", width(), 3), ("conv", width(), 3)]
        size -= 4
        if size % 2 == 0:
            layers.append(("pool",))
            size //= 2
        step += 1
    while size >= 4:
        # 3×3 then 1×1 ("network in network"): depth at almost no cost, receptive field unchanged.
        layers += [("conv", width(), 3), ("conv", width(), 1)]
        size -= 2
        step += 1
    layers.append(("conv", width(), size))  # kernel = what is left → 1×1
    layers.append(("conv", widths[-1], 1))  # an MLP layer on the patch vector; receptive field unchanged
    return layers


class PatchCNN(ValidConvNet):
    """The zoo's per-patch CNN: a :class:`ValidConvNet` with receptive field exactly `patch`.

    Maps (N,C,P,P) patches to (N,D,1,1); on a whole image it yields every window's features at
    once (``forward``: windows at stride :attr:`stride`, ``dense``: at stride 1).
    """

    def __init__(self, in_channels: int, patch: int, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__(in_channels, patch_cnn_layers(patch, widths))
        assert self.receptive_field == patch, (self.receptive_field, patch)
        self.reduction = patch
