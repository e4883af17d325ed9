"""MedicalPatchNet: classify every non-overlapping P×P patch on its own, predict the mean patch logit.

The prediction *is* the explanation: ``logit_k(x) = (1/n) Σ_patches l_k(patch)``, so the patch-logit
grid decomposes every logit exactly, and the evidence of a patch cannot leak into another (each
patch is seen by the shared backbone alone).

Explanation (``kind="patch"``):
  * ``patch_logits`` (B,K,h,w): the logit grid, h = w = ceil(H/P);
  * ``contributions`` (B,K,n) = patch logits / n — they sum to the logits (tested);
  * ``attribution`` (B,1,H,W): by default (``attribution_map="auto"`` with ``patch_cnn``) the
    *refined* map, else the raw map; both are exact decompositions (pixel mean = target logit, and
    the pixels of every patch sum to P² × that patch's logit):
      - ``raw_map``: the target's patch-logit map, nearest-upsampled (with padding, border cells are
        re-weighted by area so this stays exact). Its maximum is a whole P×P plateau, so on the
        synthetic data even a perfect patch choice puts the pointing-game point (the plateau's
        centre) inside the 6–10 px evidence object only ~60 % of the time at P=8 (an oracle grid
        of mask fractions scores 0.60), whatever the training;
      - ``refined_map`` = raw + α (dense − its mean over the patch): the same patch totals, with the
        detail inside each patch taken from the dense map (which windows around a pixel carry the
        evidence), scaled per image (α ≤ 1, :func:`refine`) so that it only orders pixels within a
        patch — pixels rank by their patch's logit first. It points like the dense map and still adds
        up exactly;
  * ``extras``: ``raw_map``, ``refined_map`` (when the dense map is computed), ``scaled_map`` (patch
    logit × global probability of the target, the paper's "scaled" map), ``dense_map`` (overlapping
    windows at stride 1, averaged per pixel; see :meth:`MedicalPatchNet.dense_map` — *not* a
    decomposition of the logit: its pixel mean is the mean over shifted grids, not the grid the
    model used), ``patch_size``, ``probability``.

Dense map: the anchor shifts the patch grid by every (dy, dx) ∈ [0, P)² and averages P² maps (4096
forward passes at P=64). Averaging over all shifts is the same as averaging, per pixel, the logits
of *every* P×P window that covers it. With the default per-patch backbone (``patch_cnn``: unpadded
convs whose receptive field is exactly P) all windows at stride 1 come out of one fully
convolutional pass over the padded image. Shift-averaging evaluates every window once as well, so
the speed-up is exactly the work overlapping windows share (the early, high-resolution layers):
measured ≈5× at P=8, ≈11× at P=14, ≈30–35× at P=32 and ≈55× at the anchor's P=64 (multiply-add
bounds 4×, 10×, 46×, 118×; see benchmarks/bench_dense_map.py). Other backbones (``zoo_cnn``, any timm model)
evaluate unfolded windows at ``dense_stride`` in batches. ``shift_averaged_map`` keeps the naive
definition as the reference (tests and the benchmark check the maps are equal).

``blank_weight`` (0 by default; 0.01 in ``experiment=patch_patchnet_synthetic`` and its checkpoint) adds
a training penalty on the spread across classes of a blank (``pad_value`` = mid-grey) patch's logits,
so that a patch with no content leans to no class. Why: padding and deletion metrics fill with that
grey, and the unpenalised model answers an all-grey image with class 0 at p = 1.00 (a blank patch is
far out of distribution: its logits were ≈ (66, 30, −89, −112)); with the penalty the all-grey image
gets p ≈ (0.25, 0.25, 0.23, 0.27). The blank weight's effect on accuracy and the maps, and why
subtracting f(blank) exactly is not offered: docs/notes/patchnet.md.

Reference: Wienholt et al., "MedicalPatchNet: A Patch-Based Self-Explainable AI Architecture for Chest
X-ray Classification" (2025); code TruhnLab/MedicalPatchNet.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.base import SelfExplainingModule
from zoo.explanation import Explanation
from zoo.nets.backbones import build_backbone
from zoo.nets.patches import PatchCNN, cell_mean, pad_to_multiple, place_map, splat_windows, to_patches
from zoo.registry import register_model


MAPS = ("auto", "raw", "refined", "dense")


def refine(raw: Tensor, detail: Tensor) -> Tensor:
    """raw (B,1,H,W) + α_b · detail, with α_b ≤ 1 per image small enough that the detail never
    reorders pixels of patches whose raw values differ: α_b = ½ · (smallest gap between distinct raw
    values) / max |detail|. Pixels then rank first by their patch's logit (the model's own
    decomposition), and the dense detail (zero mean over every patch, so the sums stay exact) only
    orders pixels *within* a patch. Unscaled (α = 1) the detail of a weaker patch can outrank the
    top patch (docs/notes/patchnet.md: deletion AUC 0.265 unscaled vs 0.183 scaled)."""
    values = raw.flatten(1).sort(dim=1).values  # (B,H·W)
    steps = values.diff(dim=1)
    tol = 1e-5 * values.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)  # float noise inside a plateau
    gap = steps.masked_fill(steps <= tol, float("inf")).amin(dim=1)  # (B,), inf: one value only
    spread = detail.flatten(1).abs().amax(dim=1).clamp(min=1e-12)  # (B,)
    alpha = (0.5 * gap / spread).clamp(max=1.0)
    return raw + alpha.view(-1, 1, 1, 1) * detail


@register_model("patchnet")
class MedicalPatchNet(SelfExplainingModule):
    explanation_kind = "patch"

    def __init__(
        self,
        # 8 px on 32 px images: a 4×4 grid; evidence objects are 6–10 px, so a patch sees a good part of one
        patch_size: int = 8,
        # "patch_cnn": unpadded per-patch CNN with receptive field exactly P, so the dense map is one conv
        # pass (exact); "zoo_cnn" or a timm name
        backbone: str = "patch_cnn",
        # stage widths of patch_cnn / zoo_cnn; patch_cnn at P=8: 8→6→4→2→1 (each 3×3 followed by a 1×1)
        widths: Sequence[int] = (32, 64, 128),
        pretrained: bool = False,  # timm weights (cannot be downloaded offline)
        pretrained_file: str | None = None,  # local weights file (safetensors / state dict), see build_backbone
        pad_value: float = 0.0,  # fills the border when H is not a multiple of P (0 = mid-grey in [-1,1])
        dense_stride: int | None = None,  # window stride of the dense map; None: 1 for patch_cnn, ≤ P/2 otherwise
        # what windows sticking out of the image see: replicate|reflect|constant|none; replicate continues
        # the border (a zero fill looks like an object)
        dense_padding: str = "replicate",
        # `attribution`: auto (refined with patch_cnn, else raw) | raw (patch-logit map) | refined (raw + the
        # dense map's detail inside each patch; both exact: pixel mean = logit) | dense (overlapping windows)
        attribution_map: str = "auto",
        # training penalty on the spread across classes of a blank (grey) patch's logits; off by default
        # (0.01 in experiment=patch_patchnet_synthetic)
        blank_weight: float = 0.0,
        lr: float = 3e-3,  # the cnn baseline's lr: same budget for the side-by-side rows
        **base,
    ) -> None:
        super().__init__(lr=lr, **base)
        if patch_size < 2 or patch_size > self.image_size:
            raise ValueError(f"patch_size must be in 2..image_size ({self.image_size}), got {patch_size}")
        if attribution_map not in MAPS:
            raise ValueError(f"attribution_map must be one of {', '.join(MAPS)}, got {attribution_map!r}")
        if dense_padding not in ("replicate", "reflect", "constant", "none"):
            raise ValueError(f"dense_padding must be replicate, reflect, constant or none, got {dense_padding!r}")
        if dense_stride is not None and not 1 <= dense_stride <= patch_size:
            raise ValueError(f"dense_stride must be in 1..patch_size ({patch_size}), got {dense_stride}")
        self.patch_size = patch_size
        self.backbone = build_backbone(backbone, self.in_channels, widths=widths, pretrained=pretrained,
                                       patch_size=patch_size, pretrained_file=pretrained_file)
        self.head = nn.Linear(self.backbone.out_channels, self.num_classes)  # shared by every patch

    def _resolve_map(self, choice: str | None) -> str:
        choice = choice or self.hparams.attribution_map
        if choice not in MAPS:
            raise ValueError(f"attribution_map must be one of {', '.join(MAPS)}, got {choice!r}")
        if choice == "auto":  # the refined map needs the dense map: one pass with patch_cnn only
            return "refined" if isinstance(self.backbone, PatchCNN) else "raw"
        return choice

    @property
    def explanation_variants(self) -> dict[str, dict]:
        """Evaluation reports the other maps in rows of their own beside `attribution`."""
        chosen = self._resolve_map(None)
        return {m: {"attribution_map": m} for m in ("raw", "refined", "dense") if m != chosen}

    # ------------------------------------------------------------------ the model
    def _blank_window(self, like: Tensor) -> Tensor:
        """One constant P×P window of ``pad_value`` (0 = mid-grey in [-1,1]: what deletion metrics fill in)."""
        P = self.patch_size
        return like.new_full((1, like.shape[1], P, P), float(self.hparams.pad_value))

    def _window_logits(self, windows: Tensor) -> Tensor:
        """(N,C,P,P) windows → (N,K) logits, each window on its own."""
        features = self.backbone(windows)  # (N,D,h',w'); 1×1 for patch_cnn
        return self.head(features.mean(dim=(2, 3)))  # (N,K)

    def _grid_logits(self, x: Tensor) -> Tensor:
        """Images whose sides are multiples of P → the non-overlapping patch-logit grid (B,K,h,w)."""
        B, _, H, W = x.shape
        P = self.patch_size
        patches = to_patches(x, P)  # (B,n,C,P,P), raster order
        logits = self._window_logits(patches.flatten(0, 1))  # (B·n,K)
        return logits.view(B, H // P, W // P, -1).permute(0, 3, 1, 2)  # (B,K,h,w)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Task loss on the mean patch logit; with ``blank_weight`` > 0 plus that weight × the variance
        across classes of a blank (``pad_value``) patch's logits, evaluated in the same batch as the
        image patches (batch-norm statistics as in training): a patch with no content should carry
        no evidence for any class (softmax only sees differences, hence the spread, not the level)."""
        weight = self.hparams.blank_weight
        if not weight:
            return super().loss(batch)
        x = batch["image"]
        self.validate_input(x)
        padded, _ = pad_to_multiple(x, self.patch_size, self.hparams.pad_value)
        B = padded.shape[0]
        patches = to_patches(padded, self.patch_size).flatten(0, 1)
        out = self._window_logits(torch.cat([patches, self._blank_window(patches)]))
        logits = out[:-1].view(B, -1, out.shape[-1]).mean(dim=1)  # (B,K): the same as forward
        spread = out[-1].var(unbiased=False)
        return self.task_loss(logits, batch["label"]) + weight * spread, logits, {"blank_spread": spread.detach()}

    def patch_logits(self, x: Tensor) -> Tensor:
        """(B,C,H,W) → (B,K,h,w): one logit vector per non-overlapping patch (padded to a multiple of P)."""
        padded, _ = pad_to_multiple(x, self.patch_size, self.hparams.pad_value)
        return self._grid_logits(padded)

    def compute_logits(self, x: Tensor) -> Tensor:
        return self.patch_logits(x).mean(dim=(2, 3))  # (B,K): the mean patch logit

    # ------------------------------------------------------------------ dense evidence map
    def _pad_windows(self, x: Tensor, amount: int) -> Tensor:
        """Pad by `amount` px per side the way windows that stick out of the image see it."""
        mode = self.hparams.dense_padding
        if mode == "none" or amount == 0:
            return x
        if mode == "constant":
            return F.pad(x, (amount,) * 4, value=self.hparams.pad_value)
        return F.pad(x, (amount,) * 4, mode=mode)  # replicate / reflect

    def _default_stride(self, span_h: int, span_w: int) -> int:
        if isinstance(self.backbone, PatchCNN):
            return 1  # every window at stride 1 comes out of one fully convolutional pass
        # Other backbones evaluate each window: the largest stride ≤ P/2 whose windows tile the span exactly.
        P = self.patch_size
        return max(s for s in range(1, max(1, P // 2) + 1) if span_h % s == 0 and span_w % s == 0)

    def dense_map(self, x: Tensor, stride: int | None = None, chunk: int = 4096) -> Tensor:
        """(B,C,H,W) → (B,K,H,W): per pixel, the mean logit of every P×P window (at `stride`) covering it.

        Windows may stick out of the image by up to P-1 px; ``dense_padding`` says what they see there
        (default "replicate": the border pixels continued; "none": such windows are skipped, so
        border pixels average fewer windows). At stride 1 this equals :meth:`shift_averaged_map`.
        """
        P = self.patch_size
        H, W = x.shape[-2:]
        pad = 0 if self.hparams.dense_padding == "none" else P - 1
        padded = self._pad_windows(x, pad)  # (B,C,H+2pad,W+2pad)
        span_h, span_w = padded.shape[-2] - P, padded.shape[-1] - P
        stride = stride or self.hparams.dense_stride or self._default_stride(span_h, span_w)
        if span_h % stride or span_w % stride:
            raise ValueError(f"dense stride {stride} must divide {span_h}×{span_w} (padded side - patch_size) "
                             f"so that the windows reach the border")
        if isinstance(self.backbone, PatchCNN) and stride == 1:
            # One fully convolutional pass: the logits of every window at stride 1.
            values = F.conv2d(self.backbone.dense(padded), self.head.weight[:, :, None, None], self.head.bias)
        else:
            B = x.shape[0]
            windows = to_patches(padded, P, stride).flatten(0, 1)  # (B·h·w,C,P,P)
            logits = torch.cat([self._window_logits(windows[i:i + chunk]) for i in range(0, windows.shape[0], chunk)])
            values = logits.view(B, span_h // stride + 1, span_w // stride + 1, -1).permute(0, 3, 1, 2)
        # values: (B,K,h,w) window logits; each pixel takes the mean over the windows covering it.
        canvas = splat_windows(values, P, stride, tuple(padded.shape[-2:]))
        return canvas[:, :, pad:pad + H, pad:pad + W]  # (B,K,H,W)

    def shift_averaged_map(self, x: Tensor) -> Tensor:
        """The anchor's dense map, kept as the reference: for every grid offset (dy, dx) ∈ [0,P)², shift
        the patch grid (pad top-left by (dy, dx), bottom-right up to a multiple of P, as
        ``dense_padding`` says), compute the non-overlapping patch map, upsample it (nearest), crop
        back, and average the P² maps per pixel (with ``dense_padding="none"``: only over patches
        inside the image). P² forward passes — use :meth:`dense_map` instead."""
        P = self.patch_size
        H, W = x.shape[-2:]
        total = count = 0.0
        big = self._pad_windows(x, P - 1)  # cropping this = padding by any amount ≤ P-1 the same way
        for dy in range(P):
            for dx in range(P):
                bottom, right = (-(H + dy)) % P, (-(W + dx)) % P
                top, left = P - 1 - dy, P - 1 - dx
                if self.hparams.dense_padding == "none":
                    shifted = F.pad(x, (dx, right, dy, bottom))
                else:
                    shifted = big[..., top:top + dy + H + bottom, left:left + dx + W + right]
                grid = self._grid_logits(shifted)  # (B,K,h,w)
                valid = torch.ones(1, 1, *grid.shape[-2:], device=x.device)
                if self.hparams.dense_padding == "none":
                    inside = torch.zeros(1, 1, *shifted.shape[-2:], device=x.device)
                    inside[..., dy:dy + H, dx:dx + W] = 1
                    valid = (F.avg_pool2d(inside, P) == 1).float()  # patches with no padded pixel

                def up(t: Tensor) -> Tensor:  # nearest upsampling to the shifted canvas, cropped to the image
                    return t.repeat_interleave(P, dim=2).repeat_interleave(P, dim=3)[:, :, dy:dy + H, dx:dx + W]

                total = total + up(grid * valid)
                count = count + up(valid)
        return total / count  # (B,K,H,W)

    # ------------------------------------------------------------------ explanation
    def explain(self, x: Tensor, target: Tensor | int | None = None, dense: bool | None = None,
                attribution_map: str | None = None) -> Explanation:
        """Patch-logit grid, raw and scaled maps, and the dense and refined maps (``dense``; default:
        with patch_cnn, where the dense map costs a few forward passes; always when the attribution
        needs it). ``attribution_map`` (auto/raw/refined/dense) overrides the hyperparameter of the
        same name for this call."""
        self.validate_input(x)
        choice = self._resolve_map(attribution_map)
        P = self.patch_size
        with torch.no_grad():
            padded, (left, _, top, _) = pad_to_multiple(x, P, self.hparams.pad_value)
            grid = self._grid_logits(padded)  # (B,K,h,w)
            logits = grid.mean(dim=(2, 3))  # (B,K) exactly what forward returns
            target = self.resolve_target(logits, target)
            B, K, h, w = grid.shape
            rows = torch.arange(B, device=x.device)
            # Patch centres in input coordinates; cells = patch ∩ image, re-weighted so means add up.
            cy = [i * P + (P - 1) / 2 - top for i in range(h)]
            cx = [j * P + (P - 1) / 2 - left for j in range(w)]
            raw = place_map(grid[rows, target][:, None], cy, cx, tuple(x.shape[-2:]))  # (B,1,H,W), mean = logit
            prob = self.probabilities(logits)[rows, target]  # (B,) global probability of the target
            extras = {"raw_map": raw, "scaled_map": raw * prob[:, None, None, None], "probability": prob,
                      "patch_size": P, "grid_offset": (top, left)}
            if dense is None:
                dense = isinstance(self.backbone, PatchCNN)
            if dense or choice != "raw":
                dmap = self.dense_map(x)[rows, target][:, None]  # (B,1,H,W)
                extras["dense_map"] = dmap
                # Same patch totals as raw (exact), detail inside each patch from the dense map.
                extras["refined_map"] = refine(raw, dmap - cell_mean(dmap, cy, cx))
        return Explanation(
            logits=logits, target=target, kind="patch", inputs=x,
            attribution=raw if choice == "raw" else extras[f"{choice}_map"],
            contributions=grid.flatten(2) / (h * w),  # (B,K,n): the sum over patches is the logit
            patch_logits=grid, extras=extras)
