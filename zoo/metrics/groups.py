"""Metrics of group explanations (Sum-of-Parts) against ground-truth evidence masks.

* Purity of a group: the fraction of the group's pixels that lie inside the evidence,
  ``|g ∩ E| / |g|`` (1 = the group is all evidence).
* True IoU: ``|g ∩ E| / |g ∪ E|`` — intersection over *union*. The public SOP code reports an
  "IoU" that is really coverage, ``|g ∩ E| / |E|`` (a group covering the whole image scores 1);
  :func:`group_coverage` keeps that quantity under its own name so the two are never confused.

Per-image, per-group values are (B,M) tensors with NaN where undefined (empty group or empty
evidence), so means can skip them. Only torch is imported (usable and testable on its own).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_purity", "group_iou", "group_coverage", "top_group", "group_report"]


def _prepare(groups: Tensor, evidence: Tensor) -> tuple[Tensor, Tensor]:
    """groups (B,M,H,W) and evidence (B,1,H,W)/(B,H,W) as bool (B,M,H·W) and (B,1,H·W)."""
    if groups.ndim != 4:
        raise ValueError(f"group masks must be (B,M,H,W), got {tuple(groups.shape)}")
    if evidence.ndim == 4:
        if evidence.shape[1] != 1:
            raise ValueError(f"evidence masks must be (B,1,H,W) or (B,H,W), got {tuple(evidence.shape)}")
        evidence = evidence[:, 0]
    if evidence.ndim != 3 or evidence.shape[0] != groups.shape[0] or evidence.shape[-2:] != groups.shape[-2:]:
        raise ValueError(f"evidence {tuple(evidence.shape)} does not match group masks {tuple(groups.shape)}")
    g = (groups > 0.5).flatten(2)
    e = (evidence.to(groups.device) > 0.5).flatten(1)[:, None]
    return g, e


def _ratio(num: Tensor, den: Tensor, undefined: Tensor) -> Tensor:
    out = num.float() / den.float().clamp(min=1)
    return out.masked_fill(undefined, float("nan"))


def group_purity(groups: Tensor, evidence: Tensor) -> Tensor:
    """(B,M) fraction of each group's pixels inside the evidence; NaN for empty groups or evidence."""
    g, e = _prepare(groups, evidence)
    inter = (g & e).sum(-1)
    size = g.sum(-1)
    return _ratio(inter, size, (size == 0) | (e.sum(-1) == 0))


def group_iou(groups: Tensor, evidence: Tensor) -> Tensor:
    """(B,M) true intersection over union of each group with the evidence; NaN where evidence is empty."""
    g, e = _prepare(groups, evidence)
    inter = (g & e).sum(-1)
    union = (g | e).sum(-1)
    return _ratio(inter, union, e.sum(-1).expand_as(union) == 0)


def group_coverage(groups: Tensor, evidence: Tensor) -> Tensor:
    """(B,M) fraction of the evidence inside each group (recall; what the anchor code calls "IoU")."""
    g, e = _prepare(groups, evidence)
    inter = (g & e).sum(-1)
    size = e.sum(-1).expand_as(inter)
    return _ratio(inter, size, size == 0)


def top_group(contributions: Tensor) -> Tensor:
    """(B,) index of the group with the largest contribution; contributions (B,M) to one class."""
    return contributions.argmax(dim=1)


def group_report(groups: Tensor, contributions: Tensor, evidence: Tensor) -> dict[str, float]:
    """Batch means for the explained class: purity / IoU / coverage of the top-contributing group, and
    purity weighted by each group's share of the positive contribution (the groups the model used).

    groups (B,M,H,W) binary; contributions (B,M) to the explained class; evidence (B,1,H,W).
    """
    purity, iou, cover = group_purity(groups, evidence), group_iou(groups, evidence), group_coverage(groups, evidence)
    top = top_group(contributions)[:, None]
    weights = contributions.clamp(min=0)
    weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-12)
    used = torch.where(torch.isnan(purity), torch.zeros_like(purity), purity)
    weighted = (weights * used).sum(1).masked_fill(weights.sum(1) == 0, float("nan"))
    return {
        "purity_top": float(torch.nanmean(purity.gather(1, top))),
        "purity_weighted": float(torch.nanmean(weighted)),
        "iou_top": float(torch.nanmean(iou.gather(1, top))),
        "iou_best": float(torch.nanmean(iou.nan_to_num(-1).amax(1).masked_fill(iou.isnan().all(1), float("nan")))),
        "coverage_top": float(torch.nanmean(cover.gather(1, top))),
    }
