"""Sum-of-Parts' rows in a run's table (``image_report_rows``), beside the shared metrics:

* the SOP's own backbone + head as a plain classifier — accuracy / AUROC on the whole test split and
  Grad-CAM on it (the same network explained post hoc);
* with evidence masks: purity and true IoU of the groups that carry the explained logit
  (:func:`zoo.metrics.groups.group_report`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zoo import evaluation
from zoo.metrics import groups as G


def group_rows(model, datamodule, n_images: int = 256) -> dict[str, dict[str, float]]:
    """Rows beside the shared table: this SOP's own backbone as a plain classifier (accuracy on the
    whole test split, and Grad-CAM on it: the same network explained post hoc, on the test images of the
    SOP's own map row), and, when the data has evidence masks, purity / true IoU of the groups that
    carry the explained logit (the same images)."""
    model.eval()
    wrapper = _BackboneClassifier(model).eval()
    own = f"{model.model_name} backbone"
    batch, select = (evaluation.report_images(datamodule, split, n_images) for split in ("test", "val"))
    rows = {f"{own} (plain classifier)": evaluation.classification_metrics(wrapper, datamodule),
            **evaluation.same_network_gradcam_rows(wrapper, batch, select, prefix=own)}
    if "mask" in batch and batch["label"].ndim == 1:
        expls = [model.explain(batch["image"][i:i + 64].to(model.device), batch["label"][i:i + 64].to(model.device))
                 .detach() for i in range(0, batch["image"].shape[0], 64)]
        masks = torch.cat([e.group_masks for e in expls])  # (N,M,H,W)
        contrib = torch.cat([e.contributions[torch.arange(len(e)), e.target] for e in expls])  # (N,M) to target
        # "<name> (…)" rows also go into the model card (SelfExplainingModule.card_metrics)
        rows[f"{model.model_name} (groups)"] = G.group_report(masks, contrib, batch["mask"])
    return rows


class _BackboneClassifier(nn.Module):
    """The SOP's own backbone + head as a black box (for Grad-CAM on the same network)."""

    model_name = "sop-backbone"

    def __init__(self, sop) -> None:
        super().__init__()
        self.backbone, self.head = sop.backbone, sop.head
        self.task = sop.task
        self._make_metrics, self.probabilities = sop._make_metrics, sop.probabilities  # for classification_metrics

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x).mean(dim=(2, 3)))
