"""Push (prototype projection) as a pure, vectorised function over a training set.

ProtoPNet's push replaces every prototype p_j of class c(j) by the training patch of class c(j)
nearest to it (Chen et al., NeurIPS 2019). Here it is a function, not a method that mutates a model:

    result = push_prototypes(features, prototypes, prototype_class, dataset, distance, ...)
    model.prototypes.data.copy_(result.prototypes)

so it can be tested and benchmarked on its own, and it returns the *provenance* of each new
prototype (dataset index, patch location, distance, the paper's 95th-percentile box of the upsampled
similarity, the stride cell and the receptive-field box) and the duplicates (several prototypes
projected onto the same source patch / same-class prototypes on one source image).

Without duplicates (``unique=True``, default; prototype collapse otherwise repeats one image, issue
17): each source image supplies at most one prototype of a class, the next-best image's patch where
its best is taken, as a greedy matching over each prototype's K nearest distinct images.

Vectorised: one feature pass per batch, the (B,P,h·w) distances come from one matmul, the best patch
of every (image, prototype) is a ``min`` over locations and the running K nearest images a stable
sort of (P, K + B) candidates. Only the final greedy matching loops in Python, over P·K pairs.

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

from .rf import ReceptiveField, rf_boxes

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
    duplicate_images: list[list[int]] = field(default_factory=list)  # groups of one class sharing a source image
    rf_box: Tensor | None = None  # (P,4) long (y0, x0, y1, x1) inclusive: receptive field of the location (rf.py)
    source_images: Tensor | None = None  # (P,C,H,W) the source images (only with keep_images=True)

    def provenance(self, prototype_class: Tensor | None = None) -> list[dict]:
        """One plain dict per prototype (what Explanation.prototype_provenance holds)."""
        return provenance_dicts(self.index, self.location, self.distance, self.box, self.cell, prototype_class,
                                rf_box=self.rf_box)


def provenance_dicts(index: Tensor, location: Tensor, distance: Tensor, box: Tensor, cell: Tensor,
                     prototype_class: Tensor | None = None, rf_box: Tensor | None = None) -> list[dict]:
    """box: the paper's 95th-percentile box of the upsampled similarity; cell: the stride cell;
    rf_box: the receptive field of the feature location (conv arithmetic)."""
    out = []
    for j in range(len(index)):
        row = {"prototype": j, "pushed": bool(index[j] >= 0), "index": int(index[j]),
               "location": tuple(int(v) for v in location[j]), "distance": float(distance[j]),
               "box": tuple(int(v) for v in box[j]), "cell": tuple(int(v) for v in cell[j])}
        if rf_box is not None:
            row["rf_box"] = tuple(int(v) for v in rf_box[j])
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
    unique: bool = True,
    box_percentile: float = 0.95,
    box_resolution: int | None = 64,
    keep_images: bool = False,
    rf: ReceptiveField | None = None,
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
        unique: each source image supplies at most one prototype of a class (default; the naive push
            of the paper, ``False``, let one image supply several — prototype collapse). Each
            prototype keeps its nearest patches in its K nearest distinct images (K = the largest
            class's prototype count); then pairs are taken greedily, nearest first, skipping an image
            its class already used. K candidates always leave one free image, so the greedy never
            fails unless a class has fewer images than prototypes (then duplicates remain, reported).
        rf: the network's receptive field (rf.py); gives ``PushResult.rf_box`` (else the cell).
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
    K = int(torch.bincount(pclass).max()) if unique else 1  # candidates (distinct images) per prototype
    ar = torch.arange(P, device=device)

    # running K best (distance, position) per prototype over distinct images, sorted by (d, position)
    cand_d = torch.full((P, K), float("inf"), device=device)
    cand_pos = torch.full((P, K), n_total, dtype=torch.long, device=device)  # n_total = "none yet"
    cand_idx = torch.full((P, K), -1, dtype=torch.long, device=device)
    cand_loc = torch.zeros(P, K, dtype=torch.long, device=device)
    cand_feat = protos[:, None].expand(P, K, D).clone()
    cand_map: Tensor | None = None  # (P,K,h·w) each candidate's distance map (for the display box)
    grid: tuple[int, int] | None = None
    seen = 0
    for batch in DataLoader(shard, batch_size=batch_size, shuffle=False):
        x = batch["image"].to(device)
        B = x.shape[0]
        pos = positions[seen:seen + B].to(device)  # (B,) dataset positions, increasing
        seen += B
        z = features(x)  # (B,D,h,w)
        grid = tuple(z.shape[-2:])
        d = distance(z, protos).flatten(2)  # (B,P,hw)
        ok = _allowed(batch["label"].to(device), pclass, class_specific)  # (B,P)
        # Nearest location per (image, prototype) (`min` returns the first: ties → smallest location),
        # then the K nearest images: the running ones (smaller positions) first, then this batch in
        # position order, and a stable sort by distance keeps that order among ties.
        d_img, loc_img = d.min(dim=2)  # (B,P)
        d_img = d_img.masked_fill(~ok, float("inf"))
        k = min(K, B)
        b = d_img.T.argsort(dim=1, stable=True)[:, :k]  # (P,k) this batch's k nearest, ties → smaller position
        top_d = d_img.T.gather(1, b)
        top_pos = torch.where(top_d.isfinite(), pos[b], n_total)  # an image of another class is no candidate
        order = _stable_order(torch.cat([cand_d, top_d], 1), torch.cat([cand_pos, top_pos], 1))[:, :K]
        idx = batch["index"].to(device)[b] if "index" in batch else pos[b]
        feat = z.flatten(2).permute(0, 2, 1)[b, loc_img.T.gather(1, b)]  # (P,k,D)
        take = lambda old, new: torch.cat([old, new], 1).gather(  # noqa: E731
            1, order if old.ndim == 2 else order[..., None].expand(-1, -1, old.shape[-1]))
        cand_d, cand_pos, cand_idx = take(cand_d, top_d), take(cand_pos, top_pos), take(cand_idx, idx)
        cand_loc, cand_feat = take(cand_loc, loc_img.T.gather(1, b)), take(cand_feat, feat)
        hw = d.shape[-1]
        if cand_map is None:
            cand_map = torch.zeros(P, K, hw, device=device)
        cand_map = take(cand_map, d.permute(1, 0, 2).gather(1, b[..., None].expand(-1, -1, hw)))
    if grid is None:
        raise ValueError("push_prototypes: the dataset (or this rank's shard) is empty")

    if world_size > 1:  # gather every rank's candidates; all ranks then choose the same ones
        def gather(t: Tensor) -> Tensor:
            out = [torch.empty_like(t) for _ in range(world_size)]
            dist.all_gather(out, t.contiguous())
            return torch.cat(out, 1)  # (P,W·K,...)

        g_d, g_pos = gather(cand_d), gather(cand_pos)
        order = _stable_order(g_d, g_pos)[:, :K]  # positions are unique across ranks (disjoint shards)
        pick = lambda t: t.gather(1, order if t.ndim == 2 else order[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        cand_d, cand_pos, cand_idx = pick(g_d), pick(g_pos), pick(gather(cand_idx))
        cand_loc, cand_feat = pick(gather(cand_loc)), pick(gather(cand_feat))
        cand_map = pick(gather(cand_map))

    choice = _assign_unique(cand_d, cand_pos, pclass) if unique else torch.zeros(P, dtype=torch.long, device=device)
    sel = lambda t: t[ar, choice]  # noqa: E731
    best_d, best_pos, best_idx, best_loc, best_feat = (sel(cand_d), sel(cand_pos), sel(cand_idx), sel(cand_loc),
                                                       sel(cand_feat))
    best_map = sel(cand_map)  # (P,h·w)
    found = best_pos < n_total
    h, w = grid
    best_img = None
    if keep_images:  # read back from the dataset (every rank holds it whole), zeros where none was found
        best_img = torch.stack([dataset[int(p)]["image"] if p < n_total else torch.zeros_like(dataset[0]["image"])
                                for p in best_pos.tolist()]).to(device)
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
        duplicates=find_duplicates(best_pos, best_loc, found),
        duplicate_images=duplicate_images(best_pos, pclass, found),
        rf_box=rf_boxes(location.cpu(), rf, image_size).to(device) if rf is not None else cell,
        source_images=best_img)
    if result.duplicates:
        log.warning("push: %d group(s) of prototypes share a source patch: %s%s", len(result.duplicates),
                    result.duplicates[:10], " …" if len(result.duplicates) > 10 else "")
    if result.duplicate_images and unique:
        log.warning("push: a class has fewer source images than prototypes; images shared: %s",
                    result.duplicate_images[:10])
    missing = (~found).nonzero().squeeze(1).tolist()
    if missing:
        log.warning("push: no training sample of their class for %d prototype(s) %s%s; left unchanged",
                    len(missing), missing[:20], " …" if len(missing) > 20 else "")
    return result


def _stable_order(d: Tensor, pos: Tensor) -> Tensor:
    """(P,N) → (P,N) argsort by (distance, position): sort by position, then stably by distance."""
    by_pos = pos.argsort(dim=1, stable=True)
    by_d = d.gather(1, by_pos).argsort(dim=1, stable=True)
    return by_pos.gather(1, by_d)


def _assign_unique(cand_d: Tensor, cand_pos: Tensor, pclass: Tensor) -> Tensor:
    """(P,) index into each prototype's K candidates: greedy, nearest (prototype, image) pair first,
    an image used at most once per class; a prototype left without a free finite candidate takes
    its nearest (a duplicate, reported). A loop over P·K pairs after the search, not over patches."""
    P, K = cand_d.shape
    d, pos, cls = cand_d.cpu().flatten().tolist(), cand_pos.cpu().flatten().tolist(), pclass.cpu().tolist()
    order = sorted(range(P * K), key=lambda i: (d[i], i // K, i % K))  # ties: prototype, then candidate rank
    choice, used = [0] * P, set()
    done = [False] * P
    for i in order:
        j, k = divmod(i, K)
        if done[j] or d[i] == float("inf") or (cls[j], pos[i]) in used:
            continue
        choice[j], done[j] = k, True
        used.add((cls[j], pos[i]))
    return torch.tensor(choice, dtype=torch.long, device=cand_d.device)


def duplicate_images(position: Tensor, prototype_class: Tensor, found: Tensor | None = None) -> list[list[int]]:
    """Groups (each sorted, ≥ 2 members) of prototypes of one class pushed onto the same source image."""
    found = torch.ones_like(position, dtype=torch.bool) if found is None else found
    groups: dict[tuple[int, int], list[int]] = {}
    for j in found.nonzero().squeeze(1).tolist():
        groups.setdefault((int(prototype_class[j]), int(position[j])), []).append(j)
    return sorted(g for g in groups.values() if len(g) > 1)


def find_duplicates(position: Tensor, location: Tensor, found: Tensor | None = None) -> list[list[int]]:
    """Groups (each sorted, ≥ 2 members) of prototypes projected onto the same (sample, location)."""
    found = torch.ones_like(position, dtype=torch.bool) if found is None else found
    key = position * (int(location.max()) + 1 if location.numel() else 1) + location
    groups: dict[int, list[int]] = {}
    for j in found.nonzero().squeeze(1).tolist():
        groups.setdefault(int(key[j]), []).append(j)
    return sorted(g for g in groups.values() if len(g) > 1)
