"""The one explanation type every zoo model returns from ``model.explain(x, target)``.

Like Hugging Face's typed outputs: a few fields every family fills (``logits``, ``target``,
``kind``, ``attribution``) and optional family fields that stay ``None`` where they do not apply.
Rendering lives apart, in :mod:`zoo.viz`; :meth:`Explanation.plot` only dispatches there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

KINDS = ("prototype", "patch", "group", "counterfactual", "node-context", "post-hoc")


@dataclass
class Explanation:
    """The model's own explanation of a batch.

    Shapes: B batch, K classes, C channels, H×W input size, P prototypes / parts, M groups,
    h×w a family's coarse grid, T counterfactual targets.
    """

    logits: Tensor  # (B,K) exactly what forward(x) returns
    target: Tensor  # (B,) the class explained (argmax of logits unless given)
    kind: str  # one of KINDS
    attribution: Tensor | None = None  # (B,1,H,W) input-space map for `target`; None for graphs
    inputs: Tensor | None = None  # (B,C,H,W) the explained inputs (for figures)

    # Additive decompositions: logits[b,k] == contributions[b,k,:].sum() + bias[k] (tested per family).
    contributions: Tensor | None = None  # (B,K,P) per-part contribution to each logit
    bias: Tensor | None = None  # (K,) what the parts leave out (zero for most families)

    # Prototype networks
    prototype_similarities: Tensor | None = None  # (B,P) max-pooled similarity g_j(x)
    prototype_maps: Tensor | None = None  # (B,P,H,W) similarity maps upsampled to the input
    prototype_provenance: list[dict] | None = None  # per prototype: source index, box, distance

    # Patch classifiers
    patch_logits: Tensor | None = None  # (B,K,h,w) one logit vector per patch / location

    # Sum-of-Parts
    group_masks: Tensor | None = None  # (B,M,H,W) binary group masks
    group_weights: Tensor | None = None  # (B,M,K) selector weights α

    # GdVAE
    counterfactuals: Tensor | None = None  # (B,T,C,H,W) decoded counterfactual images
    counterfactual_latents: Tensor | None = None  # (B,T,D)
    counterfactual_targets: Tensor | None = None  # (B,) target class of the counterfactuals

    # X-Node (graphs)
    node_context: Tensor | None = None  # (B,F) context vector of each explained node
    node_text: list[str] | None = None  # one text explanation per node

    # Any family: uncertainty of the prediction/explanation (e.g. predictive entropy)
    uncertainty: dict[str, Tensor] | None = None  # name -> (B,)
    extras: dict[str, Any] = field(default_factory=dict)  # anything else, documented by the family

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown explanation kind {self.kind!r}; expected one of {KINDS}")
        if self.logits.ndim != 2:
            raise ValueError(f"logits must be (B,K), got shape {tuple(self.logits.shape)}")
        if self.attribution is not None and self.attribution.ndim != 4:
            raise ValueError(f"attribution must be (B,1,H,W), got {tuple(self.attribution.shape)}")

    # ------------------------------------------------------------------ converters
    def to_captum(self) -> Tensor:
        """Attribution shaped like the input (B,C,H,W), as Captum's attribute() returns it."""
        if self.attribution is None:
            raise ValueError(f"a {self.kind!r} explanation has no pixel attribution")
        channels = self.inputs.shape[1] if self.inputs is not None else 1
        return self.attribution.expand(-1, channels, -1, -1)

    def to_quantus(self) -> np.ndarray:
        """Attribution as a float32 numpy array (B,1,H,W), the `a_batch` Quantus metrics expect."""
        if self.attribution is None:
            raise ValueError(f"a {self.kind!r} explanation has no pixel attribution")
        return self.attribution.detach().float().cpu().numpy()

    def to_numpy(self) -> dict[str, Any]:
        """Every filled field as numpy (tensors) or plain Python (the rest)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, Tensor):
                value = value.detach().cpu().numpy()
            elif isinstance(value, dict):
                value = {k: v.detach().cpu().numpy() if isinstance(v, Tensor) else v for k, v in value.items()}
            out[f.name] = value
        return out

    def detach(self) -> Explanation:
        """A copy whose tensors are detached and on the CPU (safe to keep across batches)."""
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value.detach().cpu()
            elif isinstance(value, dict) and f.name == "uncertainty":
                changes[f.name] = {k: v.detach().cpu() for k, v in value.items()}
        return replace(self, **changes)

    def __len__(self) -> int:
        return self.logits.shape[0]

    # ------------------------------------------------------------------ figures
    def plot(self, path: str | None = None, max_items: int = 8, **kwargs: Any):
        """Draw this explanation with the figure of its kind (see zoo.viz); save as PNG if `path`."""
        from zoo import viz  # lazy: matplotlib is only needed for figures

        return viz.plot_explanation(self, path=path, max_items=max_items, **kwargs)
