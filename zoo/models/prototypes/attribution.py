"""Where a prototype network's evidence lies in the input: the ``attribution`` map of its explanation.

The prediction is logits = g Wᵀ with g_j = max_hw s_j (the max-pooled similarity of prototype j), so
the contribution of prototype j to the target t is W[t,j]·g_j, attained at one feature cell. The
views of :func:`prototype_attribution` (B,1,H,W):

* ``view="exact"`` — W[t,j]·g_j is placed on the input cell of the feature location where g_j is
  attained, summed over j: the map sums to the target logit exactly. Inside its cell a contribution
  is shared in proportion to s_j bilinearly upsampled to the input, clipped at 0
  (``spread="similarity"``, default: the ProtoPNet visualisation, still exactly the contribution on
  exactly that cell) or evenly (``spread="even"``). Why the default: spread evenly, the map's maximum
  is a whole cell and the pointing game lands on the cell's corner pixel (docs/notes/prototypes.md).
* ``view="similarity"`` — Σ_j W[t,j]·s_j bilinearly upsampled: smoother, not a decomposition.

Input pixel y belongs to feature cell ⌊y·h/H⌋ (:func:`cell_partition`), for any h, H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

VIEWS = ("exact", "similarity")
SPREADS = ("similarity", "even")


def check_view(view: str, spread: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected 'exact' or 'similarity'")
    if spread not in SPREADS:
        raise ValueError(f"unknown spread {spread!r}; expected 'similarity' or 'even'")


def prototype_attribution(s: Tensor, g: Tensor, where: Tensor, w_t: Tensor, view: str, size: tuple[int, int],
                          spread: str = "similarity") -> Tensor:
    """(B,1,H,W) map of the target logit from the similarity maps s (B,P,h,w), their maxima g (B,P)
    at flat locations `where` (B,P), and the target's last-layer weights w_t (B,P); see the module
    docstring for `view` and `spread`."""
    B, P, h, w = s.shape
    if view == "exact":
        if spread == "similarity":  # within each cell, shared like the prototype's upsampled map
            return spread_within_cells(w_t * g, where, s, *size)
        cells = torch.zeros(B, h * w, device=s.device, dtype=s.dtype)
        cells.scatter_add_(1, where, w_t * g)  # each prototype's contribution at its max location
        return spread_over_cells(cells.view(B, h, w), *size)
    coarse = torch.einsum("bp,bphw->bhw", w_t, s)[:, None]  # linear, so = Σ_j W·upsampled s_j
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def cell_partition(h: int, w: int, H: int, W: int, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Input pixel → feature cell: rows (H,), cols (W,) with pixel y in cell ⌊y·h/H⌋; and the (h,w)
    pixel count of each cell (so a value spread over a cell keeps its sum)."""
    rows = torch.arange(H, device=device) * h // H
    cols = torch.arange(W, device=device) * w // W
    counts = torch.bincount(rows, minlength=h)[:, None] * torch.bincount(cols, minlength=w)[None, :]
    return rows, cols, counts


def spread_over_cells(cell_values: Tensor, H: int, W: int) -> Tensor:
    """(B,h,w) values → (B,1,H,W): each value spread evenly over its input cell; sums are kept."""
    B, h, w = cell_values.shape
    rows, cols, counts = cell_partition(h, w, H, W, cell_values.device)
    per_pixel = cell_values / counts.to(cell_values.dtype)  # (B,h,w)
    return per_pixel[:, rows][:, :, cols].unsqueeze(1)


def _cell_axis(n: int, N: int, device=None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One axis of the cell partition with bilinear (align_corners=False) sampling coordinates.

    For cell r of n and its k-th input pixel (k < the cell's pixel count): the pixel index (n,c),
    whether it exists (n,c), and the two source cells and the weight of the second that
    ``F.interpolate(mode="bilinear", align_corners=False)`` uses for that pixel (n,c) each."""
    rows = torch.arange(N, device=device) * n // N  # pixel → cell, as in cell_partition
    count = torch.bincount(rows, minlength=n)  # (n,)
    start = torch.div(torch.arange(n, device=device) * N + n - 1, n, rounding_mode="floor")  # first pixel of each cell
    offset = torch.arange(int(count.max()), device=device)
    pix = start[:, None] + offset[None]  # (n,c)
    valid = offset[None] < count[:, None]
    pix = pix.clamp(max=N - 1)
    src = ((pix.to(torch.float64) + 0.5) * n / N - 0.5).clamp_min(0)  # PyTorch's source coordinate
    lo = src.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    return pix, valid, lo, hi, (src - lo).float()


def spread_within_cells(values: Tensor, where: Tensor, sim: Tensor | None, H: int, W: int) -> Tensor:
    """Place values[b,j] on the input cell of feature location where[b,j] and sum over j → (B,1,H,W).

    Inside its cell a value is shared in proportion to the prototype's own similarity map s_j
    bilinearly upsampled to the input (the ProtoPNet visualisation), clipped at 0; evenly when
    ``sim`` is None or s_j ≤ 0 on the whole cell. Either way each value stays inside its cell and
    the map sums to Σ_j values[b,j]. Only the cell's pixels are interpolated (no (B,P,H,W) map).

    values, where (B,P) (flat locations on the (h,w) grid); sim (B,P,h,w)."""
    B, P = values.shape
    h, w = sim.shape[-2:]
    dev = values.device
    py, vy, y0, y1, ly = _cell_axis(h, H, dev)  # (h,cy)
    px, vx, x0, x1, lx = _cell_axis(w, W, dev)  # (w,cx)
    r, c = where // w, where % w  # (B,P)
    valid = (vy[r][..., :, None] & vx[c][..., None, :]).to(values.dtype)  # (B,P,cy,cx)
    flat_pix = (py[r][..., :, None] * W + px[c][..., None, :]).flatten(2)  # (B,P,cy·cx)
    # bilinear samples of s_j at the cell's pixels: four gathers from the (h·w) grid
    s = sim.flatten(2)  # (B,P,h·w)

    def at(yi: Tensor, xi: Tensor) -> Tensor:  # yi (B,P,cy), xi (B,P,cx) → (B,P,cy,cx)
        idx = (yi[..., :, None] * w + xi[..., None, :]).flatten(2)
        return s.gather(2, idx).view(B, P, yi.shape[-1], xi.shape[-1])

    Y0, Y1, LY = y0[r], y1[r], ly[r][..., :, None]
    X0, X1, LX = x0[c], x1[c], lx[c][..., None, :]
    up = (1 - LY) * ((1 - LX) * at(Y0, X0) + LX * at(Y0, X1)) + LY * ((1 - LX) * at(Y1, X0) + LX * at(Y1, X1))
    weight = up.clamp_min(0) * valid
    total = weight.sum((-2, -1), keepdim=True)
    even = valid / valid.sum((-2, -1), keepdim=True)
    weight = torch.where(total > 0, weight / total.clamp_min(torch.finfo(weight.dtype).tiny), even)
    out = torch.zeros(B, H * W, device=dev, dtype=values.dtype)
    out.scatter_add_(1, flat_pix.flatten(1), (values[..., None, None] * weight).flatten(1))
    return out.view(B, 1, H, W)
