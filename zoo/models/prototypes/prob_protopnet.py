"""Probabilistic prototypes (Prob-PSENN, Vadillo et al., 2024): every prototype is a Gaussian
N(μ_j, diag σ_j²).

Training draws reparameterised prototype samples p = μ + σ ⊙ ε (one set per step, shared by the
batch) and minimises the ProtoPNet loss on them + a KL term that keeps σ near a prior scale
(without it σ → 0 and the model is a plain ProtoPNet). Push projects the means μ.

Inference uses S prototype samples. ε is drawn once at construction from a seeded generator and
stored as a buffer, so the model is a deterministic function (the contract test compares forward,
explain and a saved/loaded copy bit for bit) while still being an S-sample Monte-Carlo estimate:

    logits_s = W g(x; μ + σ ε_s)                 (S,B,K)  one ProtoPNet per sample
    forward(x) = log mean_s softmax(logits_s)     (B,K)    log predictive probabilities

so ``softmax(forward(x))`` is the predictive distribution. The explanation is a distribution too:
per-sample similarities, contributions and top prototypes. ``Explanation.uncertainty`` (all (B,)):

* predictive: ``predictive_entropy``, ``mutual_information`` (its epistemic part);
* explanatory, over the S prototype samples, with d_j = min_hw ‖z_hw − p_j‖² (for p = μ + σε,
  Var_s d_j ≈ 4σ²‖z − μ_j‖²: it grows with the distance to the prototype's mean):
  ``class_distance_variance`` — mean of Var_s d_j over the prototypes of the explained class (an
  in-distribution image holds the evidence all its class's prototypes describe, an off-distribution
  one matches at most a few of them; with the class-mean Mahalanobis below, the signal that rises
  off-distribution on every OOD set measured);
  ``distance_variance`` (mean over all prototypes) and ``top_prototype_distance_variance`` (the modal
  top prototype); ``similarity_variance`` (mean Var_s g_j; runs the *other* way: log((d+1)/(d+ε))
  flattens far from every prototype); ``contribution_variance`` Σ_j Var_s W[t,j]·g_j (the
  predictive variance of the explanation's contributions); ``top_prototype_disagreement``;
* distance to the prototype distributions: ``class_prototype_mahalanobis`` (mean over the explained
  class's prototypes of min_hw ‖(z_hw − μ_j)/σ_j‖²/D), ``prototype_mahalanobis`` (its minimum over
  all prototypes) and ``nearest_sample_distance`` (min over samples and prototypes of d_j).

Measured OOD AUROC of every one: benchmarks/bench_prob_ood.py (chosen on val, reported on test).
σ hardly leaves its initial 0.05 in training, so the variance signals are ≈ 4σ²·distance: their
ranking is that of the distance to the prototypes' means.

``attribution`` is the mean over samples of the exact per-sample maps (it sums to the mean sampled
target logit, not to the log predictive probability); ``extras["sample_contributions"]`` (S,B,K,P)
sum to ``extras["sample_logits"]`` (S,B,K) exactly.

Deviation from ProtoPNet's defaults, chosen on the val split (synthetic, n_train 1000, seed 0): the
schedule is 6 epochs, so the default ``trainer.max_epochs=6`` runs all of it (cut at 6 of 8, the
end-of-fit push left the last layer un-refit: test acc 0.526 vs val 0.995), and the last layer
learns at 1e-2 (at 1e-3 its 2 epochs do not recover from the push: val acc 0.82, 0.995 at 1e-2).

No public code exists; this follows the paper's description. Calibration and OOD rows: report.py.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.explanation import Explanation
from zoo.nets.backbones import build_backbone
from zoo.registry import register_model

from .attribution import check_view
from .network import PrototypeNetwork
from .protopnet import add_on_layers
from .report import uncertainty_rows

# ProtoPNet's from-scratch schedule (protopnet.DEFAULT_SCHEDULE) cut to the default trainer's 6
# epochs: 2 CE-only joint epochs, 2 with the paper's weights, push, 2 last-layer epochs.
DEFAULT_SCHEDULE = (
    {"phase": "joint", "epochs": 2, "clst_weight": 0.0, "sep_weight": 0.0},
    {"phase": "joint", "epochs": 2},
    {"phase": "push"},
    {"phase": "last_layer", "epochs": 2},
)


@register_model("prob_protopnet")
class ProbProtoPNet(PrototypeNetwork):
    def __init__(
        self,
        backbone: str = "zoo_cnn",
        widths: Sequence[int] = (32, 64),  # see ProtoPNet: 16×16 grid at 32 px
        pretrained: bool = False,
        pretrained_file: str | None = None,  # local weights file (safetensors / state dict), see build_backbone
        prototype_dim: int = 64,
        prototypes_per_class: int = 10,
        similarity: str = "log_l2",
        incorrect_weight: float = -0.5,
        clst_weight: float = 0.8,
        sep_weight: float = 0.08,
        l1_weight: float = 1e-4,
        # per prototype dimension; keeps σ near prior_std (without it σ collapses and uncertainty vanishes),
        # small: σ is a scale, not the point of the loss
        kl_weight: float = 1e-3,
        prior_std: float = 0.1,  # σ the KL pulls towards; features live in (0,1), so 0.1 is a sizeable spread
        init_std: float = 0.05,
        n_samples: int = 16,  # S prototype draws at inference (MC estimate of the predictive)
        sample_seed: int = 0,  # seeds the stored ε (S,P,D) so inference is deterministic and reproducible
        backbone_lr: float = 1e-3,
        last_layer_lr: float = 1e-2,  # 1e-3 does not refit it in 2 epochs after the push (module docstring)
        push_batch_size: int = 256,
        push_at_end: bool = True,
        keep_push_images: bool = True,
        schedule: Sequence[dict] | None = DEFAULT_SCHEDULE,
        lr: float = 3e-3,  # add-on and prototypes, as ProtoPNet
        scheduler: str = "none",  # as ProtoPNet: the phases set the trained parts
        **base,
    ) -> None:
        super().__init__(schedule=schedule, lr=lr, scheduler=scheduler, **base)
        if self.task != "multiclass":  # the predictive is a mixture of softmaxes: one class per image
            raise ValueError(f"prob_protopnet supports task='multiclass' only, got {self.task!r}")
        if n_samples < 2:
            raise ValueError(f"n_samples must be ≥ 2 to estimate uncertainty, got {n_samples}")
        if prior_std <= 0 or init_std <= 0:
            raise ValueError("prior_std and init_std must be > 0")
        self.backbone = build_backbone(backbone, self.in_channels, widths=widths, pretrained=pretrained,
                                       pretrained_file=pretrained_file)
        self.add_on = add_on_layers(self.backbone.out_channels, prototype_dim)
        self._build_head(prototype_dim, prototypes_per_class, similarity, incorrect_weight,
                         keep_push_images=keep_push_images)
        P = self.num_prototypes
        # `self.prototypes` (P,D) holds the means μ; log σ per prototype and dimension.
        self.log_std = nn.Parameter(torch.full((P, prototype_dim), math.log(init_std)))
        g = torch.Generator().manual_seed(sample_seed)
        self.register_buffer("eps", torch.randn(n_samples, P, prototype_dim, generator=g))  # (S,P,D)

    # ------------------------------------------------------------------ sampling
    def prototype_parameters(self) -> list[nn.Parameter]:
        return [self.prototypes, self.log_std]

    def prototype_samples(self, eps: Tensor | None = None) -> Tensor:
        """(S,P,D) prototypes μ + σ ε for the stored ε (or the given one)."""
        eps = self.eps if eps is None else eps
        return self.prototypes[None] + self.log_std.exp()[None] * eps

    def _sample_parts(self, z: Tensor) -> list[dict[str, Tensor]]:
        """Parts of every prototype sample on features z (B,D,h,w): shared by all samples, since only
        the prototypes are random."""
        return [self._parts(z, p) for p in self.prototype_samples()]

    @staticmethod
    def _log_predictive(sample_logits: Tensor) -> Tensor:
        """(S,B,K) → (B,K) log mean_s softmax(logits_s)."""
        S = sample_logits.shape[0]
        return torch.logsumexp(F.log_softmax(sample_logits, dim=-1), dim=0) - math.log(S)

    def compute_logits(self, x: Tensor) -> Tensor:
        return self._log_predictive(torch.stack([p["logits"] for p in self._sample_parts(self.features(x))]))

    # ------------------------------------------------------------------ loss
    def kl(self) -> Tensor:
        """KL(N(μ, σ²) ‖ N(μ, σ_p²)) per dimension, averaged: acts on σ only."""
        ratio = (2 * self.log_std).exp() / self.hparams.prior_std ** 2
        return 0.5 * (ratio - 1 - ratio.log()).mean()

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        hp = self.hparams
        x, y = batch["image"], batch["label"]
        self.validate_input(x)
        if not self.training:  # val/test: the S-sample predictive forward() returns, not one random draw
            logits = self.compute_logits(x)  # log predictive probabilities: CE on them is its NLL
            return self.task_loss(logits, y), logits, {}
        sample = self.prototype_samples(torch.randn_like(self.eps[0])[None])[0]  # (P,D) reparameterised
        parts = self._parts(self.features(x), sample)
        ce = self.task_loss(parts["logits"], y)
        clst, sep = self.prototype_loss(y, parts["d_min"])
        l1, kl = self.l1_wrong_class(), self.kl()
        w = self.loss_weight
        loss = ce + w("clst_weight") * clst - w("sep_weight") * sep + w("l1_weight") * l1 + hp.kl_weight * kl
        return loss, parts["logits"], {"ce": ce.detach(), "clst": clst.detach(), "sep": sep.detach(),
                                       "kl": kl.detach(), "std": self.log_std.exp().mean().detach()}

    # ------------------------------------------------------------------ explanation
    def explain(self, x: Tensor, target: Tensor | int | None = None, view: str = "exact", top_k: int = 3,
                maps: bool = True, spread: str = "receptive_field") -> Explanation:
        self.validate_input(x)
        check_view(view, spread)
        with torch.no_grad():
            z = self.features(x)  # shared by all samples and the mean prototypes
            samples = self._sample_parts(z)
        sample_logits = torch.stack([p["logits"] for p in samples])  # (S,B,K)
        logits = self._log_predictive(sample_logits)
        target = self.resolve_target(logits, target)
        # One exact explanation per sample; the reported maps are their means.
        attribution = torch.stack([self.attribution_map(p, target, view, tuple(x.shape[-2:]), spread)
                                   for p in samples]).mean(0)  # (B,1,H,W)
        g_s = torch.stack([p["g"] for p in samples])  # (S,B,P)
        weight = self.last_layer.weight
        sample_contrib = weight[None, None] * g_s[:, :, None, :]  # (S,B,K,P)
        top_s = (weight[target][None] * g_s).argmax(-1)  # (S,B) top prototype per sample
        mode = top_s.mode(dim=0).values  # (B,)
        agreement = (top_s == mode[None]).float().mean(0)  # (B,)
        with torch.no_grad():
            mean_parts = self._parts(z, self.prototypes)  # maps, top-k and boxes of the mean prototypes μ
            maha = standardised_distances(z, self.prototypes, self.log_std.exp())  # (B,P)
        d_s = torch.stack([p["d_min"] for p in samples])  # (S,B,P)
        d_var = d_s.var(dim=0)  # (B,P) per-prototype variance of the distance over prototype samples
        own = (self.prototype_class[None] == target[:, None]).float()  # (B,P) the explained class's prototypes
        uncertainty = predictive_uncertainty(sample_logits)
        uncertainty.update(
            class_distance_variance=(d_var * own).sum(1) / own.sum(1),
            distance_variance=d_var.mean(1),
            top_prototype_distance_variance=d_var.gather(1, mode[:, None])[:, 0],
            similarity_variance=g_s.var(dim=0).mean(1),
            contribution_variance=(weight[target][None] * g_s).var(dim=0).sum(1),
            top_prototype_disagreement=1 - agreement,
            class_prototype_mahalanobis=(maha * own).sum(1) / own.sum(1),
            prototype_mahalanobis=maha.min(1).values,
            nearest_sample_distance=d_s.amin(dim=(0, 2)),
        )
        expl = self._explanation(x, target, mean_parts, view, top_k, maps, logits=logits, spread=spread,
                                 sample_logits=sample_logits, sample_contributions=sample_contrib,
                                 sample_similarities=g_s, sample_top_prototype=top_s, top_prototype_mode=mode,
                                 top_prototype_agreement=agreement,
                                 attribution_sums_to="mean over samples of the sampled target logit")
        expl.attribution = attribution
        expl.prototype_similarities = g_s.mean(0)
        expl.uncertainty = uncertainty
        return expl

    # ------------------------------------------------------------------ OOD / calibration report
    def image_report_rows(self, datamodule, baseline=None, n_images: int = 256) -> dict[str, dict[str, float]]:
        """The family's EvalProtoPNet rows, then calibration and OOD detection (report.py)."""
        rows = super().image_report_rows(datamodule, baseline, n_images)
        rows.update(uncertainty_rows(self, datamodule))
        return rows


def standardised_distances(z: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(B,D,h,w) features, (P,D) means and σ → (B,P) min_hw ‖(z_hw − μ_j)/σ_j‖² / D: the squared
    distance to prototype j's Gaussian in its own σ units (Mahalanobis for a diagonal covariance),
    per dimension. Expanded as Σ z²/σ² − 2 z·μ/σ² + μ²/σ² (two matmuls, no (B,P,D,hw) tensor), fp32."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        zf, mean, inv = z.flatten(2).float(), mean.float(), std.float().pow(-2)  # (B,D,hw), (P,D), (P,D)
        d = (torch.einsum("pd,bdl->bpl", inv, zf.square()) - 2 * torch.einsum("pd,bdl->bpl", mean * inv, zf)
             + (mean.square() * inv).sum(1)[None, :, None])
        return d.clamp_min(0).amin(2) / z.shape[1]


def predictive_uncertainty(sample_logits: Tensor) -> dict[str, Tensor]:
    """(S,B,K) sampled logits → predictive entropy H[E p] and mutual information H[E p] − E H[p] (B,)."""
    probs = sample_logits.softmax(-1)  # (S,B,K)
    mean = probs.mean(0)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(-1)
    expected = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(0)
    return {"predictive_entropy": entropy, "mutual_information": (entropy - expected).clamp_min(0)}
