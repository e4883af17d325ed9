"""A ProtoFM head over a frozen backbone ("Tell me why", a prototype head on a frozen visual
foundation model; REFERENCES.md §1).

Only a light head is trained (≤ 1M parameters, checked in the tests): a 1×1-conv projection of the
frozen backbone's patch tokens / feature map, cosine prototypes and the prototype→class layer. The
backbone never trains in any phase. Objective (protofm_losses.py): CE + student–teacher prototype
assignment + alignment of patches to their assigned prototypes + contrast between prototypes of
different classes + L1 sparsity of the prototype→class layer.

The backbone is named in the config, with no default checkpoint: any timm model (documented choice
``backbone=vit_small_patch14_dinov2`` with ``pretrained=true`` online, or ``pretrained_file=`` offline)
or the zoo CNN with ``backbone_checkpoint=<zoo folder / shipped name>`` (conf/experiment/proto_head_synthetic.yaml
names ``cnn-synthetic``). A named checkpoint that is absent is an error, never a silent random backbone.

Cosine similarities lie in [−1, 1], so the last layer starts at ``last_layer_scale``·(+1/−0.5)
(a temperature folded into W: the contributions W·g still sum to the logits).

Teacher: an EMA copy of the prototypes (``teacher_prototypes``, momentum ``teacher_momentum``) gives the
assignment targets (protofm_losses.py); it is updated after every optimiser step that trains the
prototypes and never by gradient.

As in ProtoFM the prototypes are not projected onto training patches (the default schedule has no
push; a schedule may still name one, network.py): they are shown by their k nearest training patches
under the head's own cosine (:func:`nearest_patches`), drawn at the end of fit as
``figures/prototype-neighbours.png`` (zoo/viz/prototype_neighbours.py).

Explanation (network.py) with one changed default, ``spread="similarity"``: the exact map shares each
contribution W[t,j]·g_j inside the input patch (stride cell) of the token where g_j is attained, not
over that token's receptive field. Why: a foundation model's token stands for its patch while its
receptive field is the whole image (attention), and the frozen zoo CNN's field is 32 px on a 32-px
image; spread over such boxes, the map's maximum is set by where the clipped boxes overlap (small
boxes at the border are dense), not by the evidence — on synthetic val (128 images, n_train 1000) the
pointing-game hit rate of a trained head was 0.016 over the field and 0.23 in the cell.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from zoo import hub
from zoo.explanation import Explanation
from zoo.nets.backbones import build_backbone, load_pretrained
from zoo.registry import register_model

from .network import PrototypeNetwork
from .protofm_losses import ema_update, patch_cosine, protofm_terms
from .push import cell_box
from .rf import ReceptiveField, rf_boxes

log = logging.getLogger("zoo.prototypes")


@dataclass
class NearestPatches:
    """Per prototype its k nearest training patches, nearest first (all (P,k[,…]))."""

    similarity: Tensor  # cosine of the patch's projected token with the prototype
    position: Tensor  # position of the image in the dataset
    index: Tensor  # the dataset's own ``index`` of it (= position when items carry none)
    location: Tensor  # (P,k,2) feature cell (row, col) of the patch
    box: Tensor  # (P,k,4) its receptive-field box (y0, x0, y1, x1), inclusive, clipped to the image
    cell: Tensor  # (P,k,4) its stride cell (the input patch the token stands for)


@torch.no_grad()
def nearest_patches(features: Callable[[Tensor], Tensor], prototypes: Tensor, dataset, rf: ReceptiveField,
                    image_size: int, k: int = 5, batch_size: int = 256, device=None) -> NearestPatches:
    """The k training patches (one per image: its best cell; so k distinct images, since adjacent
    cells of one image are near-copies) with the largest cosine to each prototype.

    Exact kNN in torch (faiss is not a dependency; P·k results are tiny), in batches of images: memory
    is one batch's (B, h·w, P) cosines plus the running (P,k) best, whatever the dataset's size. Ties
    keep the earlier image (stable sort). Images are read by position (no DataLoader, no RNG drawn)."""
    if k < 1:
        raise ValueError(f"nearest_patches: k must be ≥ 1, got {k}")
    n = len(dataset)
    if n == 0:
        raise ValueError("nearest_patches: the dataset is empty")
    P = prototypes.shape[0]
    protos = prototypes.detach().float().to(device)
    best_s = torch.empty(P, 0, device=device)
    best_pos = torch.empty(P, 0, dtype=torch.long, device=device)
    best_loc = torch.empty(P, 0, dtype=torch.long, device=device)
    best_idx = torch.empty(P, 0, dtype=torch.long, device=device)
    grid = None
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        x = torch.stack([it["image"] for it in items]).to(device)
        idx = torch.tensor([int(it.get("index", start + i)) for i, it in enumerate(items)], device=device)
        z = features(x).float()  # (B,D,h,w)
        grid = tuple(z.shape[-2:])
        cos = patch_cosine(z, protos)  # (B,N,P): the head's own similarity (protofm_losses)
        s_img, loc_img = cos.max(dim=1)  # (B,P) best cell of each image
        pos = torch.arange(start, start + x.shape[0], device=device)
        all_s = torch.cat([best_s, s_img.T], 1)
        order = all_s.sort(dim=1, descending=True, stable=True).indices[:, :k]
        best_s = all_s.gather(1, order)
        best_pos = torch.cat([best_pos, pos[None].expand(P, -1)], 1).gather(1, order)
        best_idx = torch.cat([best_idx, idx[None].expand(P, -1)], 1).gather(1, order)
        best_loc = torch.cat([best_loc, loc_img.T], 1).gather(1, order)
    h, w = grid
    location = torch.stack([best_loc // w, best_loc % w], -1).cpu()  # (P,k,2)
    flat = location.reshape(-1, 2)
    return NearestPatches(similarity=best_s.cpu(), position=best_pos.cpu(), index=best_idx.cpu(), location=location,
                          box=rf_boxes(flat, rf, image_size).view(P, -1, 4),
                          cell=cell_box(flat, grid, image_size).view(P, -1, 4))


@register_model("proto_head")
class ProtoHead(PrototypeNetwork):
    # The backbone never trains; the last layer trains with the head (ProtoFM trains the head jointly).
    phase_parts = {
        "warm": ("add_on", "prototypes"),
        "joint": ("add_on", "prototypes", "last_layer"),
        "last_layer": ("last_layer",),
    }

    def __init__(
        self,
        backbone: str = "zoo_cnn",  # "zoo_cnn" or any timm name (e.g. vit_tiny_patch16_224, resnet18)
        widths: Sequence[int] = (32, 64, 128),  # zoo_cnn stages (must match backbone_checkpoint's)
        pretrained: bool = False,  # timm weights: only where a user has them locally
        pretrained_file: str | None = None,  # local weights file, see build_backbone (backbone_checkpoint wins)
        backbone_checkpoint: str | None = None,  # zoo folder/name whose `backbone.*` weights to load; no silent default
        prototype_dim: int = 64,  # projection width of the head
        prototypes_per_class: int = 10,
        similarity: str = "cosine",  # ProtoFM: cosine over patch tokens / feature cells
        incorrect_weight: float = -0.5,
        last_layer_scale: float = 10.0,  # temperature for cosine similarities in [-1, 1]
        assign_weight: float = 1.0,  # ProtoFM terms, see protofm_losses.py (paper weights unpublished: unit)
        align_weight: float = 1.0,
        contrast_weight: float = 1.0,
        sparsity_weight: float = 1e-4,  # L1 of W summed over all P·K entries, as ProtoPNet's l1 scale
        student_temp: float = 0.1,  # assignment temperatures; the teacher's is sharper
        teacher_temp: float = 0.04,
        # EMA teacher prototypes: 1/(1−m) = 100 steps ≈ 1.6 epochs of the default synthetic run (4000
        # images, batch 64), so the targets are smoothed over recent steps yet follow the student within
        # a 5-epoch run (DINO's 0.996 is for ~1000 steps an epoch over 100+ epochs); 0 = the student itself
        teacher_momentum: float = 0.99,
        backbone_lr: float = 0.0,  # unused: the backbone is frozen
        last_layer_lr: float = 3e-3,
        push_batch_size: int = 256,  # also the image batch of the nearest-patch search
        push_at_end: bool = False,  # ProtoFM does not project its prototypes onto patches
        keep_push_images: bool = True,  # only used when a schedule pushes
        neighbours: int = 5,  # nearest training patches drawn per prototype at the end of fit (0: no figure)
        # ProtoFM trains the head jointly (projection + prototypes + last layer; backbone frozen), no push
        schedule: Sequence[dict] | None = ({"phase": "joint", "epochs": 5},),
        lr: float = 3e-3,  # head: projection + prototypes
        scheduler: str = "none",  # as ProtoPNet: the phases set the trained parts
        **base,
    ) -> None:
        super().__init__(schedule=schedule, lr=lr, scheduler=scheduler, **base)
        self.backbone = build_backbone(backbone, self.in_channels, widths=widths, pretrained=pretrained,
                                       pretrained_file=pretrained_file)
        if backbone_checkpoint:
            self._load_backbone(backbone_checkpoint)  # absent → FileNotFoundError
        elif not (pretrained or pretrained_file) and not hub.rebuilding_saved_model():
            # not an error (contract tests build it), but a random frozen backbone learns nothing useful:
            # `train.py model=proto_head` alone gave chance accuracy on synthetic
            log.warning("%s: the frozen backbone %r is random — name its weights (backbone_checkpoint=<zoo "
                        "model>, pretrained_file=<file> or pretrained=true)", self.model_name, backbone)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self._frozen_backbone()
        # Light head: 1×1 projection (ReLU between), no sigmoid: cosine needs signed features.
        D = self.backbone.out_channels
        self.add_on = nn.Sequential(nn.Conv2d(D, prototype_dim, 1), nn.ReLU(inplace=True),
                                    nn.Conv2d(prototype_dim, prototype_dim, 1))
        self._build_head(prototype_dim, prototypes_per_class, similarity, incorrect_weight,
                         last_layer_scale=last_layer_scale, keep_push_images=keep_push_images,
                         prototype_init="normal")
        # The teacher starts as the student (DINO); a buffer, so it is saved and resumed with the weights.
        if not 0 <= teacher_momentum < 1:
            raise ValueError(f"teacher_momentum must be in [0, 1), got {teacher_momentum}")
        self.register_buffer("teacher_prototypes", self.prototypes.detach().clone())
        self._frozen = {"backbone"}
        self.train(self.training)

    def _frozen_backbone(self) -> None:
        self.backbone.eval()

    def _load_backbone(self, source: str) -> None:
        load_pretrained(source, {"backbone": self.backbone}, self.model_name,
                        mismatch=f"has backbone weights that do not fit backbone={self.hparams.backbone!r} "
                                 f"with in_channels={self.in_channels}")

    def set_trainable(self, parts: Sequence[str]) -> None:
        super().set_trainable([p for p in parts if p != "backbone"])
        self._frozen.add("backbone")
        self.train(self.training)

    def part_modules(self):
        parts = super().part_modules()
        parts.pop("backbone")  # never optimised
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        return parts

    def loss(self, batch):
        """CE + the ProtoFM terms (protofm_losses.py) on the projected patch tokens."""
        hp = self.hparams
        x, y = batch["image"], batch["label"]
        self.validate_input(x)
        z = self.features(x)
        parts = self._parts(z)
        ce = self.task_loss(parts["logits"], y)
        terms = protofm_terms(z, self.prototypes, self.prototype_class, self.last_layer.weight,
                              hp.student_temp, hp.teacher_temp, teacher_prototypes=self.teacher_prototypes)
        w = self.loss_weight
        loss = ce + sum(w(f"{k}_weight") * v for k, v in terms.items())
        return loss, parts["logits"], {"ce": ce.detach(), **{k: v.detach() for k, v in terms.items()}}

    def update_teacher(self) -> None:
        """teacher ← m·teacher + (1−m)·prototypes (no gradient; the EMA of the student)."""
        ema_update(self.teacher_prototypes, self.prototypes, self.hparams.teacher_momentum)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # after the optimiser step; only while the prototypes train (a frozen student leaves it still)
        if self.prototypes.requires_grad:
            self.update_teacher()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a head saved before the EMA teacher existed: its teacher starts as its prototypes (momentum 0)
        key = prefix + "teacher_prototypes"
        if key not in state_dict and prefix + "prototypes" in state_dict:
            state_dict[key] = state_dict[prefix + "prototypes"].detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_prototype_vectors(self, vectors: Tensor) -> None:
        super().set_prototype_vectors(vectors)
        self.teacher_prototypes.copy_(vectors)  # a push moves the teacher with the student

    def explain(self, x: Tensor, target: Tensor | int | None = None, view: str = "exact", top_k: int = 3,
                maps: bool = True, spread: str = "similarity") -> Explanation:
        """network.py's explanation; the exact map shares contributions inside the token's patch
        (spread="similarity") by default — module docstring."""
        return super().explain(x, target, view=view, top_k=top_k, maps=maps, spread=spread)

    # the evaluation's extra rows: the other view and the receptive-field spread (network.py's default)
    explanation_variants = {"similarity": {"view": "similarity"}, "rf": {"spread": "receptive_field"},
                            "even": {"spread": "even"}}

    @torch.no_grad()
    def nearest_training_patches(self, dataset, k: int | None = None, batch_size: int | None = None) -> NearestPatches:
        """Each prototype's k nearest training patches by the head's cosine (:func:`nearest_patches`)."""
        was_training = self.training
        self.eval()
        try:
            return nearest_patches(self.features, self.prototypes, dataset, self.receptive_field(), self.image_size,
                                   k=k or self.hparams.neighbours, batch_size=batch_size or self.hparams.push_batch_size,
                                   device=self.device)
        finally:
            self.train(was_training)

    def on_fit_end(self) -> None:
        super().on_fit_end()
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.hparams.neighbours < 1 or dm is None or not hasattr(dm, "dataset") or not self.trainer.is_global_zero:
            return
        from zoo.viz.prototype_neighbours import nearest_patch_figure  # lazy: matplotlib only where drawn

        train = dm.dataset("train")
        found = self.nearest_training_patches(train)
        path = Path(self.trainer.default_root_dir) / "figures" / "prototype-neighbours.png"
        nearest_patch_figure(found, [train[int(i)]["image"] for i in found.position.flatten()], self.prototype_class,
                             path, class_names=getattr(dm, "class_names", None))
        log.info("nearest training patches of the %d prototypes drawn to %s (mean top-1 cosine %.3f)",
                 self.num_prototypes, path, float(found.similarity[:, 0].mean()))

    def head_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("backbone."))
