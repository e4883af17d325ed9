"""Push (prototype projection) as a pure, vectorised function over a training set.

ProtoPNet's push replaces every prototype p_j of class c(j) by the training patch of class c(j)
nearest to it (Chen et al., NeurIPS 2019). Here it is a function, not a method that mutates a model:

    result = push_prototypes(features, prototypes, prototype_class, dataset, distance, ...)
    model.prototypes.data.copy_(result.prototypes)

so it can be tested and benchmarked on its own, and it returns the *provenance* of each new
prototype (dataset index, patch location, distance, input-space box) and the duplicates (several
prototypes projected onto the same source patch).

Vectorised: one feature pass per batch, the (B,P,h·w) distances come from one matmul, and the best
patch of every prototype in the batch is two ``min`` reductions (over locations, then over the
batch's images of the prototype's class); a running best is kept across batches. Nothing loops over
prototypes or patches in Python.

DDP: with ``torch.distributed`` initialised (or explicit ``rank``/``world_size``), rank r searches the
positions r, r+W, r+2W, … of the dataset; the per-rank winners are all-gathered and every rank picks
the same one with a deterministic tie-break: smallest distance, then smallest dataset position, then
smallest patch location (row-major). The single-process search uses the same order (``min`` returns
the first minimum, positions increase along the batch axis), so 1 and N processes give the same
prototypes bit for bit (tests/test_push_ddp.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

log = logging.getLogger("zoo.prototypes")

DistanceFn = Callable[[Tensor, Tensor], Tensor]  # (z (B,D,h,w), prototypes (P,D)) -> (B,P,h,w)


@dataclass
class PushResult:
    """New prototypes and where each came from. P prototypes, D feature dims, (h,w) feature grid."""

    prototypes: Tensor  # (P,D) the projected prototype vectors (unchanged where no sample qualified)
    index: Tensor  # (P,) long: the source sample's ``index`` field (its row in the full split); -1 if none
    position: Tensor  # (P,) long: the source sample's position in the searched dataset; -1 if none
    location: Tensor  # (P,2) long: (row, col) of the source patch on the feature grid
    distance: Tensor  # (P,) distance of the old prototype to the chosen patch (inf if none)
    box: Tensor  # (P,4) long (y0, x0, y1, x1) inclusive: pixels ≥ `box_percentile` of the upsampled similarity map
    cell: Tensor  # (P,4) long (y0, x0, y1, x1) inclusive: the input cell under the feature location
    grid: tuple[int, int]  # (h, w) of the feature map
    duplicates: list[list[int]] = field(default_factory=list)  # groups of prototypes sharing one source patch
    source_images: Tensor | None = None  # (P,C,H,W) the source images (only with keep_images=True)

    def provenance(self, prototype_class: Tensor | None = None) -> list[dict]:
        """One plain dict per prototype (what Explanation.prototype_provenance holds)."""
        return provenance_dicts(self.index, self.location, self.distance, self.box, self.cell, prototype_class)


def provenance_dicts(index: Tensor, location: Tensor, distance: Tensor, box: Tensor, cell: Tensor,
                     prototype_class: Tensor | None = None) -> list[dict]:
    out = []
    for j in range(len(index)):
        row = {"prototype": j, "pushed": bool(index[j] >= 0), "index": int(index[j]),
               "location": tuple(int(v) for v in location[j]), "distance": float(distance[j]),
               "box": tuple(int(v) for v in box[j]), "cell": tuple(int(v) for v in cell[j])}
        if prototype_class is not None:
            row["class"] = int(prototype_class[j])
        out.append(row)
    return out


def percentile_box(maps: Tensor, q: float = 0.95, connected: bool = True) -> Tensor:
    """(N,H,W) maps → (N,4) long boxes (y0, x0, y1, x1), inclusive, around the pixels ≥ the q-quantile.

    ProtoPNet's display box thresholds the upsampled similarity map at its 95th percentile. With
    ``connected`` (default) only the above-threshold region that holds the maximum is boxed
    (scipy.ndimage.label, 8-connectivity): flat maps have scattered top pixels whose joint bounding
    box covers most of the image and says nothing about where the prototype is."""
    n, H, W = maps.shape
    thresh = torch.quantile(maps.reshape(n, -1).float(), q, dim=1).view(n, 1, 1)
    keep = maps >= thresh  # never empty: the max is ≥ any quantile
    if connected:
        from scipy import ndimage

        peak = maps.reshape(n, -1).argmax(1)
        keep_np = keep.cpu().numpy()
        for i in range(n):
            labels, _ = ndimage.label(keep_np[i], structure=[[1, 1, 1]] * 3)
            keep_np[i] = labels == labels.reshape(-1)[int(peak[i])]
        keep = torch.from_numpy(keep_np).to(maps.device)
    rows, cols = keep.any(2), keep.any(1)  # (N,H), (N,W)
    ar_h, ar_w = torch.arange(H, device=maps.device), torch.arange(W, device=maps.device)
    y0 = torch.where(rows, ar_h, H).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values
    x0 = torch.where(cols, ar_w, W).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values
    return torch.stack([y0, x0, y1, x1], dim=1).long()


def cell_box(location: Tensor, grid: tuple[int, int], image_size: int) -> Tensor:
    """(N,2) feature (row, col) → (N,4) input pixels (y0, x0, y1, x1) that map to that cell.

    Pixel y belongs to cell ⌊y·h/H⌋ (the same partition the exact attribution map uses)."""
    h, w = grid
    H = W = image_size
    r, c = location[:, 0], location[:, 1]
    y0 = torch.div(r * H + h - 1, h, rounding_mode="floor")  # first y with ⌊y·h/H⌋ = r
    y1 = torch.div((r + 1) * H + h - 1, h, rounding_mode="floor") - 1
    x0 = torch.div(c * W + w - 1, w, rounding_mode="floor")
    x1 = torch.div((c + 1) * W + w - 1, w, rounding_mode="floor") - 1
    return torch.stack([y0, x0, y1, x1], dim=1).long()


def _shard(dataset: Dataset, rank: int, world_size: int) -> tuple[Dataset, Tensor]:
    positions = torch.arange(rank, len(dataset), world_size)
    return (dataset if world_size == 1 else Subset(dataset, positions.tolist())), positions


def _allowed(labels: Tensor, prototype_class: Tensor, class_specific: bool) -> Tensor:
    """(B,P) bool: may sample b supply prototype j? (its class must be the prototype's class)"""
    B, P = labels.shape[0], prototype_class.shape[0]
    if not class_specific:
        return torch.ones(B, P, dtype=torch.bool, device=labels.device)
    if labels.ndim == 2:  # multi-label: any sample carrying the prototype's label
        return labels[:, prototype_class] > 0.5
    return labels[:, None] == prototype_class[None, :]


@torch.no_grad()
def push_prototypes(
    features: Callable[[Tensor], Tensor],
    prototypes: Tensor,
    prototype_class: Tensor,
    dataset: Dataset,
    distance: DistanceFn,
    similarity: Callable[[Tensor], Tensor] | None = None,
    *,
    image_size: int,
    batch_size: int = 256,
    class_specific: bool = True,
    box_percentile: float = 0.95,
    box_resolution: int | None = 64,
    keep_images: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    device: torch.device | str | None = None,
) -> PushResult:
    """Project every prototype onto its nearest training patch (of its own class when class_specific).

    Args:
        features: images (B,C,H,W) → feature map (B,D,h,w) (backbone + add-on, in eval mode).
        prototypes: (P,D) current prototype vectors; prototype_class: (P,) long class of each.
        dataset: items are dicts with ``image`` (C,H,W), ``label`` and (optionally) ``index``.
        distance: (z, prototypes) → (B,P,h,w) the model's own distance (so push minimises what the
            model measures); similarity: distances → similarities, for the display box (default −d).
        rank, world_size: the shard to search; default: from torch.distributed when initialised.
        box_resolution: the display box is found on the similarity map upsampled to at most this
            many pixels a side and scaled to the image (exact when image_size ≤ it; at 224 px a
            full-size quantile over P·224² pixels would cost more than the whole search).

    Returns a :class:`PushResult`; identical on every rank.
    """
    if rank is None or world_size is None:
        ddp = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(device) if device is not None else prototypes.device
    P, D = prototypes.shape
    protos = prototypes.detach().to(device)
    pclass = prototype_class.to(device)
    similarity = similarity or (lambda d: -d)
    shard, positions = _shard(dataset, rank, world_size)
    n_total = len(dataset)

    best_d = torch.full((P,), float("inf"), device=device)
    best_pos = torch.full((P,), n_total, dtype=torch.long, device=device)  # n_total = "none yet"
    best_idx = torch.full((P,), -1, dtype=torch.long, device=device)
    best_loc = torch.zeros(P, dtype=torch.long, device=device)
    best_feat = protos.clone()
    best_map: Tensor | None = None  # (P,h·w) distance map of each winner's source image
    best_img: Tensor | None = None
    grid: tuple[int, int] | None = None
    seen = 0
    for batch in DataLoader(shard, batch_size=batch_size, shuffle=False):
        x = batch["image"].to(device)
        B = x.shape[0]
        pos = positions[seen:seen + B].to(device)  # (B,) dataset positions, increasing
        seen += B
        z = features(x)  # (B,D,h,w)
        grid = tuple(z.shape[-2:])
        hw = grid[0] * grid[1]
        d = distance(z, protos).flatten(2)  # (B,P,hw)
        ok = _allowed(batch["label"].to(device), pclass, class_specific)  # (B,P)
        # Nearest location per (image, prototype), then nearest image per prototype. `min` returns
        # the first minimum, so ties go to the smallest location, then the smallest position.
        d_img, loc_img = d.min(dim=2)  # (B,P)
        vals, b = d_img.masked_fill(~ok, float("inf")).min(dim=0)  # (P,), (P,)
        loc = loc_img[b, torch.arange(P, device=device)]  # (P,)
        better = vals < best_d  # strict: an earlier batch (smaller positions) keeps ties
        if best_map is None:
            best_map = torch.zeros(P, hw, device=device)
            if keep_images:
                best_img = torch.zeros(P, *x.shape[1:], device=device)
        best_d = torch.where(better, vals, best_d)
        best_pos = torch.where(better, pos[b], best_pos)
        idx = batch["index"].to(device)[b] if "index" in batch else pos[b]
        best_idx = torch.where(better, idx, best_idx)
        best_loc = torch.where(better, loc, best_loc)
        zf = z.flatten(2)  # (B,D,hw)
        best_feat = torch.where(better[:, None], zf[b, :, loc], best_feat)  # (P,D)
        best_map = torch.where(better[:, None], d[b, torch.arange(P, device=device)], best_map)
        if keep_images:
            best_img = torch.where(better[:, None, None, None], x[b], best_img)
    if grid is None:
        raise ValueError("push_prototypes: the dataset (or this rank's shard) is empty")

    if world_size > 1:  # gather every rank's winners; all ranks then choose the same one
        def gather(t: Tensor) -> Tensor:
            out = [torch.empty_like(t) for _ in range(world_size)]
            dist.all_gather(out, t.contiguous())
            return torch.stack(out)  # (W,P,...)

        all_d, all_pos = gather(best_d), gather(best_pos)
        # lexicographic (distance, position): position is unique across ranks (disjoint shards)
        dmin = all_d.min(0).values
        pos_key = torch.where(all_d == dmin, all_pos, torch.full_like(all_pos, n_total + 1))
        r = pos_key.argmin(0)  # (P,) winning rank
        pick = lambda t: t[r, torch.arange(P, device=device)]  # noqa: E731
        best_d, best_pos = pick(all_d), pick(all_pos)
        best_idx, best_loc = pick(gather(best_idx)), pick(gather(best_loc))
        best_feat, best_map = pick(gather(best_feat)), pick(gather(best_map))
        if keep_images:
            best_img = pick(gather(best_img))

    found = best_pos < n_total
    h, w = grid
    location = torch.stack([best_loc // w, best_loc % w], dim=1)
    sim_maps = similarity(best_map.view(P, 1, h, w))  # (P,1,h,w)
    res = image_size if box_resolution is None else min(image_size, box_resolution)
    upsampled = F.interpolate(sim_maps, size=(res, res), mode="bicubic", align_corners=False)[:, 0]
    box = percentile_box(upsampled, box_percentile)
    if res != image_size:  # pixel i of the small map covers [i·s, (i+1)·s) of the image
        scale = image_size / res
        box = torch.stack([(box[:, :2] * scale).floor(), ((box[:, 2:] + 1) * scale).ceil() - 1], 1).view(P, 4)
        box = box.long().clamp(0, image_size - 1)
    cell = cell_box(location, grid, image_size)
    new = torch.where(found[:, None], best_feat, protos)
    result = PushResult(
        prototypes=new, index=torch.where(found, best_idx, -1), position=torch.where(found, best_pos, -1),
        location=location, distance=best_d, box=box, cell=cell, grid=grid,
        duplicates=find_duplicates(best_pos, best_loc, found), source_images=best_img)
    if result.duplicates:
        log.warning("push: %d group(s) of prototypes share a source patch: %s%s", len(result.duplicates),
                    result.duplicates[:10], " …" if len(result.duplicates) > 10 else "")
    missing = (~found).nonzero().squeeze(1).tolist()
    if missing:
        log.warning("push: no training sample of their class for %d prototype(s) %s%s; left unchanged",
                    len(missing), missing[:20], " …" if len(missing) > 20 else "")
    return result


def find_duplicates(position: Tensor, location: Tensor, found: Tensor | None = None) -> list[list[int]]:
    """Groups (each sorted, ≥ 2 members) of prototypes projected onto the same (sample, location)."""
    found = torch.ones_like(position, dtype=torch.bool) if found is None else found
    key = position * (int(location.max()) + 1 if location.numel() else 1) + location
    groups: dict[int, list[int]] = {}
    for j in found.nonzero().squeeze(1).tolist():
        groups.setdefault(int(key[j]), []).append(j)
    return sorted(g for g in groups.values() if len(g) > 1)
