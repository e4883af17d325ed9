"""The prototype network every prototype family shares: extractor → similarity layer → last layer,
its loss, explanation, training schedule and push (CaBRNet / ProtoPNeXt's split).

:class:`PrototypeNetwork` is the Lightning base of ``protopnet``, ``prob_protopnet`` and
``proto_head``: a subclass builds ``self.backbone`` and ``self.add_on`` (the feature extractor) and
calls :meth:`PrototypeNetwork._build_head`. With P prototypes, D feature dims, an (h,w) feature grid
and K classes:

    z = add_on(backbone(x))          (B,D,h,w)
    d = distance(z, p)               (B,P,h,w)   similarity.py: log-L2 ‖z − p‖² or cosine 1 − cos(z, p)
    s = similarity(d)                (B,P,h,w)   log((d+1)/(d+ε)) or cos
    g_j = max_hw s_j                 (B,P)
    logits = g Wᵀ                    (B,K)       no bias (as in the paper)

Explanation (``kind="prototype"``): ``contributions[b,k,j] = W[k,j]·g_j(x_b)`` sum exactly to the
logits (zero bias); ``attribution`` is attribution.py's map (``view="exact"`` sums to the target
logit; ``view="similarity"`` is the smoother Σ_j W[t,j]·upsampled s_j, reported as a second row);
``prototype_maps`` the upsampled s_j; the top-k prototypes with their push provenance (push.py).
Training: losses.py (CE + Clst − Sep + L1), phases warm / joint / last_layer and the push action as
the ``schedule`` hyperparameter (zoo.schedule).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import evaluation
from zoo.base import SelfExplainingModule
from zoo.explanation import Explanation
from zoo.schedule import Phase

from .attribution import check_view, prototype_attribution
from .losses import LOSS_WEIGHTS, cluster_separation, l1_wrong_class
from .push import PushResult, duplicate_images, find_duplicates, percentile_box, provenance_dicts, push_prototypes
from .rf import ReceptiveField, receptive_field, rf_boxes
from .report import interpretability_rows
from .similarity import SIMILARITIES, distances, similarity_from_distance

log = logging.getLogger("zoo.prototypes")


def class_identity(num_prototypes_per_class: int, num_classes: int) -> Tensor:
    """(P,K) one-hot: prototype j belongs to class j // per_class."""
    return torch.eye(num_classes).repeat_interleave(num_prototypes_per_class, dim=0)


class PrototypeNetwork(SelfExplainingModule):
    """Base of the prototype family (not registered). Subclasses build the extractor and call
    :meth:`_build_head` after ``super().__init__``."""

    explanation_kind = "prototype"
    phases = ("warm", "joint", "last_layer")
    actions = ("push",)
    # Parts trained in each phase (ProtoPNet: warm = add-on + prototypes; joint = + backbone;
    # last_layer = the last layer only). Subclasses may change the sets (ProtoHead never trains its backbone).
    phase_parts: dict[str, tuple[str, ...]] = {
        "warm": ("add_on", "prototypes"),
        "joint": ("backbone", "add_on", "prototypes"),
        "last_layer": ("last_layer",),
    }

    # ------------------------------------------------------------------ building
    def _build_head(self, prototype_dim: int, prototypes_per_class: int, similarity: str,
                    incorrect_weight: float, last_layer_scale: float = 1.0, keep_push_images: bool = True,
                    prototype_init: str = "uniform") -> None:
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")
        if prototypes_per_class < 1:
            raise ValueError(f"prototypes_per_class must be ≥ 1, got {prototypes_per_class}")
        K, P = self.num_classes, prototypes_per_class * self.num_classes
        self.similarity_kind, self.num_prototypes = similarity, P
        # log-L2 + sigmoid add-on: features live in (0,1)^D, so uniform [0,1) prototypes start among them.
        init = torch.rand(P, prototype_dim) if prototype_init == "uniform" else torch.randn(P, prototype_dim)
        self.prototypes = nn.Parameter(init)  # (P,D)
        identity = class_identity(prototypes_per_class, K)  # (P,K)
        self.register_buffer("prototype_identity", identity, persistent=False)
        self.register_buffer("prototype_class", identity.argmax(1), persistent=False)  # (P,)
        self.last_layer = nn.Linear(P, K, bias=False)
        # Paper's initialisation: +1 to the own class, `incorrect_weight` (−0.5) to the others.
        with torch.no_grad():
            self.last_layer.weight.copy_(last_layer_scale * (identity.T + incorrect_weight * (1 - identity.T)))
        # Provenance of the last push, as buffers so it travels with the safetensors weights.
        self.register_buffer("push_index", torch.full((P,), -1, dtype=torch.long))
        self.register_buffer("push_location", torch.zeros(P, 2, dtype=torch.long))
        self.register_buffer("push_distance", torch.full((P,), float("inf")))
        self.register_buffer("push_box", torch.zeros(P, 4, dtype=torch.long))
        self.register_buffer("push_cell", torch.zeros(P, 4, dtype=torch.long))
        if keep_push_images:  # the source images for galleries (fp16: P·C·H·W·2 bytes, 80 kB at 40×32²)
            self.register_buffer("push_images", torch.zeros(P, self.in_channels, self.image_size, self.image_size,
                                                            dtype=torch.float16))
        else:
            self.push_images = None
        self._frozen: set[str] = set()
        self._loss_overrides: dict[str, float] = {}

    # ------------------------------------------------------------------ computation
    def features(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,D,h,w)
        return self.add_on(self.backbone(x))

    def prototype_vectors(self) -> Tensor:  # (P,D): what push projects (the means for Prob-PSENN)
        return self.prototypes

    def distances(self, z: Tensor, prototypes: Tensor | None = None) -> Tensor:  # (B,P,h,w)
        return distances(z, self.prototype_vectors() if prototypes is None else prototypes, self.similarity_kind)

    def similarity(self, d: Tensor) -> Tensor:
        return similarity_from_distance(d, self.similarity_kind)

    def _parts(self, z: Tensor, prototypes: Tensor | None = None) -> dict[str, Tensor]:
        """Everything the prediction is made of, for one set of prototype vectors."""
        d = self.distances(z, prototypes)  # (B,P,h,w)
        s = self.similarity(d)  # (B,P,h,w)
        g, where = s.flatten(2).max(dim=2)  # (B,P) max-pooled similarity and its flat location
        logits = self.last_layer(g)  # (B,K)
        return {"d": d, "s": s, "g": g, "where": where, "logits": logits, "d_min": d.flatten(2).min(dim=2).values}

    def compute_logits(self, x: Tensor) -> Tensor:
        return self._parts(self.features(x))["logits"]

    # ------------------------------------------------------------------ loss
    def prototype_loss(self, labels: Tensor, d_min: Tensor) -> tuple[Tensor, Tensor]:
        """Cluster and separation costs (Clst, Sep) of d_min (B,P); see losses.py."""
        return cluster_separation(labels, d_min, self.prototype_identity)

    def l1_wrong_class(self) -> Tensor:
        """‖W ⊙ (1 − I)‖₁: only the weights from prototypes to classes they do not belong to."""
        return l1_wrong_class(self.last_layer.weight, self.prototype_identity)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        x, y = batch["image"], batch["label"]
        self.validate_input(x)
        parts = self._parts(self.features(x))
        ce = self.task_loss(parts["logits"], y)
        clst, sep = self.prototype_loss(y, parts["d_min"])
        l1 = self.l1_wrong_class()
        w = self.loss_weight
        loss = ce + w("clst_weight") * clst - w("sep_weight") * sep + w("l1_weight") * l1
        return loss, parts["logits"], {"ce": ce.detach(), "clst": clst.detach(), "sep": sep.detach(), "l1": l1.detach()}

    # ------------------------------------------------------------------ explanation
    # evaluation: one more row per entry (the second view, and the exact map spread evenly in its cells)
    explanation_variants = {"similarity": {"view": "similarity"}, "cell": {"spread": "similarity"},
                            "even": {"spread": "even"}}

    def explain(self, x: Tensor, target: Tensor | int | None = None, view: str = "exact", top_k: int = 3,
                maps: bool = True, spread: str = "receptive_field") -> Explanation:
        """This looks like that: per-prototype similarity maps, contributions, top-k prototypes.

        view: "exact" (attribution sums to the target logit) or "similarity" (Σ_j W[t,j]·upsampled s_j).
        spread: where "exact" shares a contribution: "receptive_field" (over the feature's receptive
            field, by a softmax of the prototype's upsampled map), "receptive_field_linear" (same box,
            by the clipped map itself), "similarity" (linear, inside the stride cell) or "even"
            (evenly in the cell); attribution.py. maps: fill ``prototype_maps`` (B,P,H,W); turn off
            for many prototypes at large sizes.
        """
        self.validate_input(x)
        check_view(view, spread)
        with torch.no_grad():
            parts = self._parts(self.features(x))
        logits = parts["logits"]
        target = self.resolve_target(logits, target)
        return self._explanation(x, target, parts, view, top_k, maps, spread=spread)

    @torch.no_grad()
    def _explanation(self, x: Tensor, target: Tensor, parts: dict[str, Tensor], view: str, top_k: int,
                     maps: bool, logits: Tensor | None = None, spread: str = "receptive_field", **extra: Any) -> Explanation:
        H, W = x.shape[-2:]
        s, g, where = parts["s"], parts["g"], parts["where"]  # (B,P,h,w), (B,P), (B,P)
        B, P, h, w = s.shape
        weight = self.last_layer.weight  # (K,P)
        contributions = weight[None] * g[:, None, :]  # (B,K,P): sums to the logits (no bias)
        w_t = weight[target]  # (B,P)
        attribution = self.attribution_map(parts, target, view, (H, W), spread)
        k = min(top_k, P)
        top = (w_t * g).topk(k, dim=1).indices  # (B,k) prototypes contributing most to the target
        loc = where.gather(1, top)  # (B,k) flat feature location of each
        extras = {"view": view, "spread": spread, "top_prototypes": top, "top_locations": torch.stack([loc // w, loc % w], -1),
                  "prototype_class": self.prototype_class, "grid": (h, w), "similarity": self.similarity_kind,
                  "duplicates": self.duplicate_groups(), "duplicate_images": self.duplicate_image_groups()}
        if maps:
            up = F.interpolate(s, size=(H, W), mode="bilinear", align_corners=False)  # (B,P,H,W)
            extras["top_boxes"] = percentile_box(up[torch.arange(B)[:, None], top].reshape(B * k, H, W)).view(B, k, 4)
        if self.push_images is not None and bool((self.push_index >= 0).any()):
            extras["source_images"] = self.push_images.float()
        extras.update(extra)
        return Explanation(
            logits=parts["logits"] if logits is None else logits, target=target, kind="prototype",
            attribution=attribution, inputs=x, contributions=None if logits is not None else contributions,
            bias=None if logits is not None else torch.zeros(self.num_classes, device=x.device),
            prototype_similarities=g, prototype_maps=up if maps else None,
            prototype_provenance=self.provenance(), extras=extras)

    @torch.no_grad()
    def attribution_map(self, parts: dict[str, Tensor], target: Tensor, view: str, size: tuple[int, int],
                        spread: str = "receptive_field") -> Tensor:
        """(B,1,H,W) map of the target logit. "exact" (sum-exact): W[t,j]·g_j shared over the
        receptive field (default: by a softmax of s_j's upsampled map; "receptive_field_linear": by
        the map) or the stride cell of the location where g_j is attained, or evenly in the cell
        (spread="even"); it sums to the logit (attribution.py). "similarity":
        Σ_j W[t,j]·s_j bilinearly upsampled (smoother, not a decomposition)."""
        return prototype_attribution(parts["s"], parts["g"], parts["where"], self.last_layer.weight[target], view,
                                     size, spread, rf=self.receptive_field())

    def receptive_field(self) -> ReceptiveField:
        """Receptive field of a feature cell (conv arithmetic over backbone then add-on; rf.py)."""
        return receptive_field(self.backbone, self.add_on)  # a walk over the modules: microseconds

    def provenance(self) -> list[dict]:
        """Per prototype: source index, feature location, distance, the 95th-percentile box of the
        upsampled similarity (``box``, the paper's), the stride cell (``cell``) and the receptive
        field box of that location (``rf_box``; unpushed prototypes get the box of location (0,0))."""
        rf = rf_boxes(self.push_location.cpu(), self.receptive_field(), self.image_size)
        return provenance_dicts(self.push_index, self.push_location, self.push_distance, self.push_box,
                                self.push_cell, self.prototype_class, rf_box=rf)

    def card_metrics(self, results, rows) -> dict[str, float]:
        """The base card plus the push's diversity and receptive field (issue 17): same-class prototypes
        sharing a source image / sharing a patch (0 with the unique push), the field's side in pixels,
        and each prototype's receptive-field box (y0, x0, y1, x1) as one row."""
        card = super().card_metrics(results, rows)
        if bool((self.push_index >= 0).any()):
            card["duplicate_source_images"] = sum(len(g) - 1 for g in self.duplicate_image_groups())
            card["duplicate_source_patches"] = sum(len(g) - 1 for g in self.duplicate_groups())
            card["receptive_field_px"] = self.receptive_field().size
            card["rf_boxes"] = " ".join(f"p{r['prototype']}{list(r['rf_box'])}" for r in self.provenance())
        return card

    def duplicate_groups(self) -> list[list[int]]:
        found = self.push_index >= 0
        if not bool(found.any()):
            return []
        h_w = int(self.push_location.max()) + 1
        return find_duplicates(self.push_index, self.push_location[:, 0] * h_w + self.push_location[:, 1], found)

    def duplicate_image_groups(self) -> list[list[int]]:
        """Groups of prototypes of one class whose last push used the same source image."""
        return duplicate_images(self.push_index, self.prototype_class, self.push_index >= 0)

    # ------------------------------------------------------------------ push
    @torch.no_grad()
    def push(self, dataset, batch_size: int = 256, **kwargs: Any) -> PushResult:
        """Project the prototypes onto their nearest training patches (see push.push_prototypes),
        copy the result in and record the provenance. Runs the extractor in eval mode."""
        was_training = self.training
        self.eval()
        try:
            result = push_prototypes(
                self.features, self.prototype_vectors(), self.prototype_class, dataset, self.distances,
                self.similarity, image_size=self.image_size, batch_size=batch_size,
                keep_images=self.push_images is not None, rf=self.receptive_field(), device=self.device, **kwargs)
        finally:
            self.train(was_training)
        self.set_prototype_vectors(result.prototypes)
        self.push_index.copy_(result.index)
        self.push_location.copy_(result.location)
        self.push_distance.copy_(result.distance)
        self.push_box.copy_(result.box)
        self.push_cell.copy_(result.cell)
        if self.push_images is not None and result.source_images is not None:
            self.push_images.copy_(result.source_images.to(self.push_images.dtype))
        return result

    def set_prototype_vectors(self, vectors: Tensor) -> None:
        self.prototypes.data.copy_(vectors)

    # ------------------------------------------------------------------ schedule as data
    def part_modules(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.backbone.parameters()), "add_on": list(self.add_on.parameters()),
                "prototypes": self.prototype_parameters(), "last_layer": list(self.last_layer.parameters())}

    def prototype_parameters(self) -> list[nn.Parameter]:
        return [self.prototypes]

    def set_trainable(self, parts: Sequence[str]) -> None:
        """Train only `parts`; the others get requires_grad=False and (modules) stay in eval mode, so
        frozen BatchNorm statistics do not drift (a pushed prototype stays equal to its source patch)."""
        for name, params in self.part_modules().items():
            for p in params:
                p.requires_grad_(name in parts)
        self._frozen = {name for name in ("backbone", "add_on") if name not in parts}
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in getattr(self, "_frozen", ()):
            getattr(self, name).eval()
        return self

    def apply_phase(self, phase: Phase | None) -> None:
        # None (no phase in force): every part trains, the hyperparameters' loss weights.
        self.set_trainable(self.phase_parts[phase.name] if phase is not None else tuple(self.part_modules()))
        # A schedule entry may override loss weights for its epochs, e.g. {phase: joint, epochs: 2,
        # clst_weight: 0, sep_weight: 0}: CE-only epochs first when the backbone starts from scratch.
        overrides = phase.overrides if phase is not None else {}
        unknown = set(overrides) - set(LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f"{self.model_name}: schedule phase {phase.name!r} overrides unknown key(s) "
                             f"{sorted(unknown)}; a phase may override {LOSS_WEIGHTS}")
        self._loss_overrides = {k: float(v) for k, v in overrides.items()}

    def run_action(self, name: str) -> None:  # the only action: "push"
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "dataset"):
            raise RuntimeError("push needs the trainer's datamodule (with .dataset('train'))")
        result = self.push(dm.dataset("train"), batch_size=self.hparams.get("push_batch_size", 256))
        log.info("push at epoch %d: mean distance %.4f, %d duplicate patch group(s), %d same-class image group(s)",
                 self.current_epoch, float(result.distance[result.index >= 0].mean()), len(result.duplicates),
                 len(result.duplicate_images))
        self._save_gallery(dm)

    def prototypes_moved_since_push(self, epochs_run: int) -> bool:
        """Whether a phase that trains the prototypes ran after the last scheduled push, among the first
        ``epochs_run`` epochs. Derived from the schedule alone, so a resumed run agrees."""
        schedule = self.training_schedule
        for epoch in schedule.epochs_since_action("push", epochs_run):
            phase = schedule.phase_at(epoch)
            if phase is None or "prototypes" in self.phase_parts[phase.name]:
                return True
        return False

    def _save_gallery(self, datamodule) -> None:
        """The prototype gallery of this push as a PNG in the run folder (rank 0 only)."""
        if self.push_images is None or not self.trainer.is_global_zero:
            return
        from zoo.viz.prototype import prototype_gallery  # lazy: matplotlib only where figures are drawn

        path = Path(self.trainer.default_root_dir) / "figures" / f"prototype-gallery-epoch{self.current_epoch:03d}.png"
        prototype_gallery(self, path, class_names=getattr(datamodule, "class_names", None))

    def loss_weight(self, name: str) -> float:
        return self._loss_overrides.get(name, self.hparams[name])

    def on_fit_start(self) -> None:
        total = self.training_schedule.total_epochs
        if self.trainer.max_epochs is not None and total > self.trainer.max_epochs:
            log.warning("%s: schedule has %d epochs but trainer.max_epochs=%d; later phases will not run",
                        self.model_name, total, self.trainer.max_epochs)

    def on_fit_end(self) -> None:
        # A network whose prototypes were trained after the last push is not a "this looks like that"
        # model yet (prototypes are not real patches): push once more (the last layer is not refit).
        if self._trainer is None or not self.hparams.get("push_at_end", True):
            return
        if self.prototypes_moved_since_push(self.trainer.fit_loop.epoch_progress.current.completed):
            log.warning("%s: prototypes changed after the last push; pushing at the end of fit", self.model_name)
            self.run_action("push")

    def param_groups(self) -> list[dict]:
        hp = self.hparams
        lrs = {"backbone": hp.backbone_lr, "add_on": hp.lr, "prototypes": hp.lr, "last_layer": hp.last_layer_lr}
        groups = []
        for name, params in self.part_modules().items():
            params = [p for p in params if name != "backbone" or not self.hparams.get("freeze_backbone", False)]
            if params:
                # No weight decay on prototypes and the last layer (their own losses regularise them).
                wd = hp.weight_decay if name in ("backbone", "add_on") else 0.0
                groups.append({"params": params, "lr": lrs[name], "weight_decay": wd, "name": name})
        return groups

    # ------------------------------------------------------------------ interpretability report
    def image_report_rows(self, datamodule, baseline=None, n_images: int = 256) -> dict[str, dict[str, float]]:
        """EvalProtoPNet consistency / stability (keypoints) or the annotation-free stability, and Grad-CAM
        on this network itself with its layer chosen on val (report.py)."""
        batch, select = (evaluation.report_images(datamodule, split, n_images) for split in ("test", "val"))
        return {**interpretability_rows(self, datamodule, n_images),
                **evaluation.same_network_gradcam_rows(self, batch, select)}

    @torch.no_grad()
    def prototype_maps(self, x: Tensor) -> Tensor:
        """(B,P,H,W) similarity maps upsampled to the input (bicubic, as EvalProtoPNet does)."""
        s = self._parts(self.features(x))["s"]
        return F.interpolate(s, size=x.shape[-2:], mode="bicubic", align_corners=False)
