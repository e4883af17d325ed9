"""The prototype family's rows in a run's table (``image_report_rows``), beside the shared metrics.

* Every prototype network: EvalProtoPNet consistency / stability of the prototype parts
  (:func:`zoo.metrics.prototypes.prototype_interpretability`; keypoints where the data has them), and
  Grad-CAM on the network itself (``zoo.evaluation.same_network_gradcam_rows``: last layer and the best
  layer, chosen on val, on the test images of its own map's row): the same logits
  explained post hoc, so the comparison with its own map is not confounded by how two different models
  respond to the deletion substrates (the black-box CNN's rows answer the other question).
* ``prob_protopnet`` — does it know when it does not know?
  - calibration: expected calibration error of the predictive distribution on the test split
    (torchmetrics ``CalibrationError``, 15 equal-width bins, L1);
  - OOD detection: each uncertainty score of ``Explanation.uncertainty`` used as a detector of
    out-of-distribution inputs; AUROC of in-distribution test images (negatives) against uniform
    noise in [-1, 1], smooth noise (a bilinearly upsampled 4×4 random grid: blob-like, closer to
    real images) and the datamodule's ``contrast_images`` (another dataset at the same geometry).
    Scores are reported as they are, never flipped (similarity variance runs the other way;
    docs/notes/prototypes.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from zoo.evaluation import take_images
from zoo.metrics.prototypes import prototype_interpretability


def interpretability_rows(model, datamodule, n_images: int = 256) -> dict[str, dict[str, float]]:
    """EvalProtoPNet consistency / stability (keypoints) or the annotation-free stability."""
    model.eval()
    batch = take_images(datamodule, "test", n_images)
    with torch.no_grad():
        row = prototype_interpretability(
            lambda x: model.prototype_maps(x.to(model.device)).cpu(), batch["image"], batch["label"],
            model.prototype_class.cpu(), keypoints=batch.get("keypoints"), generator=torch.Generator().manual_seed(0))
    return {f"{model.model_name} prototypes (EvalProtoPNet)": row}


def ood_sets(n: int, channels: int, size: int, datamodule=None, seed: int = 0) -> dict[str, Tensor]:
    """Out-of-distribution image sets (name → (n,C,H,W) in [-1, 1]): two noise sets, plus the
    datamodule's contrast images (another dataset at this geometry) when it has them."""
    g = torch.Generator().manual_seed(seed)
    sets = {"uniform noise": torch.rand(n, channels, size, size, generator=g) * 2 - 1,
            "smooth noise": F.interpolate(torch.rand(n, channels, 4, 4, generator=g) * 2 - 1, size=(size, size),
                                          mode="bilinear", align_corners=False)}
    if datamodule is not None:
        sets.update(datamodule.contrast_images(n, channels, size, seed))
    return sets


@torch.no_grad()
def uncertainty_scores(model, images: Tensor, chunk: int = 128) -> tuple[dict[str, Tensor], Tensor]:
    """Every uncertainty score (name → (N,)) and the predictive probabilities (N,K)."""
    scores: dict[str, list[Tensor]] = {}
    probs = []
    for start in range(0, images.shape[0], chunk):
        expl = model.explain(images[start:start + chunk].to(model.device), maps=False)
        for k, v in expl.uncertainty.items():
            scores.setdefault(k, []).append(v.cpu())
        probs.append(expl.logits.softmax(-1).cpu())
    return {k: torch.cat(v) for k, v in scores.items()}, torch.cat(probs)


def uncertainty_rows(model, datamodule, n_images: int = 512) -> dict[str, dict[str, float]]:
    """Calibration and OOD-detection rows of a probabilistic prototype network (module docstring)."""
    model.eval()
    batch = take_images(datamodule, "test", n_images)
    ind, probs = uncertainty_scores(model, batch["image"])
    ece = torchmetrics.CalibrationError(task="multiclass", num_classes=model.num_classes, n_bins=15)
    calib = {"ece": float(ece(probs, batch["label"])),
             "acc": float((probs.argmax(1) == batch["label"]).float().mean()),
             **{f"in-dist {k}": float(v.mean()) for k, v in ind.items()}}
    rows = {f"{model.model_name} calibration": calib}
    n = batch["image"].shape[0]
    for name, images in ood_sets(n, model.in_channels, model.image_size, datamodule).items():
        ood, _ = uncertainty_scores(model, images)
        row = {}
        for k in ind:
            scores = torch.cat([ind[k], ood[k]])
            labels = torch.cat([torch.zeros(len(ind[k])), torch.ones(len(ood[k]))]).long()
            row[f"auroc {k}"] = float(torchmetrics.functional.auroc(scores, labels, task="binary"))
        rows[f"{model.model_name} OOD vs {name}"] = row
    return rows
