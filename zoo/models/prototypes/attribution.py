"""Where a prototype network's evidence lies in the input: the ``attribution`` map of its explanation.

The prediction is logits = g Wᵀ with g_j = max_hw s_j (the max-pooled similarity of prototype j), so
the contribution of prototype j to the target t is W[t,j]·g_j, attained at one feature cell. The
views of :func:`prototype_attribution` (B,1,H,W):

* ``view="exact"`` — "sum-exact": W[t,j]·g_j is shared over input pixels, summed over j, so the map
  sums to the target logit exactly. Where a contribution goes (``spread``):
  - ``"receptive_field"`` (default): over the receptive-field box (rf.py) of the feature location
    where g_j is attained, in proportion to softmax(ŝ_j / T) over the box, ŝ_j = s_j bilinearly
    upsampled to the input, T = ``temperature`` (0.25, in similarity units) — the pixels that
    feature saw, weighted towards where the prototype's upsampled map peaks. Deviation: ProtoPNet
    only draws ŝ_j; sharing W·g_j by it is the zoo's, and T was chosen on val (below);
  - ``"receptive_field_linear"``: the same box, in proportion to ŝ_j clipped at 0 (the previous default);
  - ``"similarity"``: the linear weighting but only inside the input cell (stride cell) of that location;
  - ``"even"``: evenly over that cell.
  Negative contributions (W[t,j] < 0: other classes' prototypes) are spread the same way, so the
  map is negative where they sit. Why the default (benchmarks/bench_protopnet_maps.py, synthetic
  val, 256 images): a cell is 2×2 px of a 14 px field, so the cell maps leave ~98 % of the image
  exactly 0 (deletion AUC 0.60); the box brings deletion to ~0.27, and the softmax weighting raises
  the hit rate (0.89 → 0.95 on the retrained model) at equal or lower deletion. A Gaussian
  effective-RF weighting (Luo et al. 2016), gradient (|∂g_j/∂x|) weighting, powers of ŝ_j and top-k
  peak cells were measured too and lost on hit rate or deletion.
* ``view="similarity"`` — Σ_j W[t,j]·s_j bilinearly upsampled: smoother, not a decomposition.

Input pixel y belongs to feature cell ⌊y·h/H⌋ (:func:`cell_partition`), for any h, H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .rf import ReceptiveField, rf_axis

VIEWS = ("exact", "similarity")
SPREADS = ("receptive_field", "receptive_field_linear", "similarity", "even")


def check_view(view: str, spread: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected 'exact' or 'similarity'")
    if spread not in SPREADS:
        raise ValueError(f"unknown spread {spread!r}; expected one of {SPREADS}")


def prototype_attribution(s: Tensor, g: Tensor, where: Tensor, w_t: Tensor, view: str, size: tuple[int, int],
                          spread: str = "receptive_field", rf: ReceptiveField | None = None,
                          temperature: float = 0.25) -> Tensor:
    """(B,1,H,W) map of the target logit from the similarity maps s (B,P,h,w), their maxima g (B,P)
    at flat locations `where` (B,P), and the target's last-layer weights w_t (B,P); see the module
    docstring for `view` and `spread`; `rf` is needed for the receptive-field spreads, `temperature`
    (softmax over the box; 0.25 chosen on synthetic val, module docstring) for the default one."""
    B, P, h, w = s.shape
    if view == "exact":
        if spread in ("receptive_field", "receptive_field_linear"):
            if rf is None:
                raise ValueError(f"spread={spread!r} needs the network's receptive field (rf=)")
            if not temperature > 0:
                raise ValueError(f"temperature must be > 0, got {temperature}")
            return spread_within_cells(w_t * g, where, s, *size, rf=rf,
                                       temperature=temperature if spread == "receptive_field" else None)
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
    """One axis of the cell partition: the pixels of each of the n cells (:func:`_window_axis`)."""
    rows = torch.arange(N, device=device) * n // N  # pixel → cell, as in cell_partition
    count = torch.bincount(rows, minlength=n)  # (n,)
    start = torch.div(torch.arange(n, device=device) * N + n - 1, n, rounding_mode="floor")  # first pixel of each cell
    return _window_axis(start, start + count - 1, n, N)


def _window_axis(first: Tensor, last: Tensor, n: int, N: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """For feature index r of n owning input pixels first[r]..last[r] (inclusive) and its k-th pixel:
    the pixel index (n,c), whether it exists (n,c), and the two source cells and the weight of the
    second that ``F.interpolate(mode="bilinear", align_corners=False)`` uses for that pixel (n,c) each."""
    count = last - first + 1  # (n,)
    offset = torch.arange(int(count.max()), device=first.device)
    pix = first[:, None] + offset[None]  # (n,c)
    valid = offset[None] < count[:, None]
    pix = pix.clamp(max=N - 1)
    src = ((pix.to(torch.float64) + 0.5) * n / N - 0.5).clamp_min(0)  # PyTorch's source coordinate
    lo = src.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    return pix, valid, lo, hi, (src - lo).float()


def spread_within_cells(values: Tensor, where: Tensor, sim: Tensor | None, H: int, W: int,
                        rf: ReceptiveField | None = None, temperature: float | None = None) -> Tensor:
    """Place values[b,j] on the input cell of feature location where[b,j] and sum over j → (B,1,H,W).

    Inside its cell a value is shared in proportion to the prototype's own similarity map s_j
    bilinearly upsampled to the input (the ProtoPNet visualisation), clipped at 0; evenly when
    ``sim`` is None or s_j ≤ 0 on the whole cell. Either way each value stays inside its cell and
    the map sums to Σ_j values[b,j]. Only the cell's pixels are interpolated (no (B,P,H,W) map).

    With ``rf`` the window of feature location (r,c) is its receptive-field box (rf.py) instead of
    its cell: the value is shared over the pixels that feature actually saw, still summing exactly.
    With ``temperature`` T the share is softmax(ŝ_j / T) over the window instead of ŝ_j clipped at 0.

    values, where (B,P) (flat locations on the (h,w) grid); sim (B,P,h,w)."""
    B, P = values.shape
    h, w = sim.shape[-2:]
    dev = values.device
    if rf is None:
        py, vy, y0, y1, ly = _cell_axis(h, H, dev)  # (h,cy)
        px, vx, x0, x1, lx = _cell_axis(w, W, dev)  # (w,cx)
    else:
        py, vy, y0, y1, ly = _window_axis(*(t.to(dev) for t in rf_axis(h, H, rf)), h, H)
        px, vx, x0, x1, lx = _window_axis(*(t.to(dev) for t in rf_axis(w, W, rf)), w, W)
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
    if temperature is None:
        weight = up.clamp_min(0) * valid
    else:  # softmax over the window's existing pixels (max subtracted: exp cannot overflow)
        peak = up.masked_fill(valid == 0, float("-inf")).amax((-2, -1), keepdim=True)
        weight = torch.exp((up - peak) / temperature) * valid
    total = weight.sum((-2, -1), keepdim=True)
    even = valid / valid.sum((-2, -1), keepdim=True)
    weight = torch.where(total > 0, weight / total.clamp_min(torch.finfo(weight.dtype).tiny), even)
    out = torch.zeros(B, H * W, device=dev, dtype=values.dtype)
    out.scatter_add_(1, flat_pix.flatten(1), (values[..., None, None] * weight).flatten(1))
    return out.view(B, 1, H, W)
