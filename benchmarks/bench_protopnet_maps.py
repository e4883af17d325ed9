"""ProtoPNet's sum-exact map: where to put each W·g (the default ``spread``), measured against
best-layer Grad-CAM of the shipped CNN, on the synthetic val split (the choice) or test (reported once).

Every option is sum-exact (each prototype's W[t,j]·g_j is shared over input pixels by weights that
sum to 1, so the map sums to the target logit; checked for every batch). Options (``--split val``
prints all; ``--split test`` the shipped spreads, the chosen one first):

* shipped (``explain(spread=...)``): ``receptive_field`` (default: softmax(ŝ_j/0.25) over the RF
  box of the peak cell, ŝ_j = upsampled similarity), ``receptive_field_linear`` (ŝ_j clipped at 0,
  the previous default), ``similarity`` / ``even`` (inside the 2×2 stride cell), and the
  ``view=similarity`` row (not a decomposition);
* tried, not shipped (dense re-implementations here): the RF box weighted by ŝ_j^p, by softmax
  with other temperatures, by a Gaussian effective receptive field centred on the cell (Luo et al.
  2016; σ = size/4 or size/6) with or without ŝ_j, by the gradient |∂g_j/∂x| (the field measured
  per image; zero outside the RF box), and the top-k cells of each s_j instead of its peak only.

Columns: hit rate (pointing game on the part masks) and deletion AUC per substrate (grey, blur,
noise; lower is better; ``deletion`` = the worst), 24 steps, plateau ties, ground-truth class, 256
class-balanced images. Grad-CAM of ``cnn-synthetic`` at the layer chosen on val (hit rate).

    OMP_NUM_THREADS=1 python benchmarks/bench_protopnet_maps.py [--split val|test] [--n 256]

Measured 2026-12-02 (2 shared CPU cores), the protopnet-synthetic retrained and re-published that
day (unique push); Grad-CAM best layer on val = backbone.features.17. val (the choice):

| map | hit | deletion | blur | grey | noise |
|---|---|---|---|---|---|
| spread=receptive_field_linear (previous default) | 0.891 | 0.268 | 0.268 | 0.266 | 0.266 |
| RF, softmax T=0.1 | 0.961 | 0.270 | 0.270 | 0.269 | 0.268 |
| RF, softmax T=0.15 | 0.961 | 0.270 | 0.270 | 0.263 | 0.267 |
| RF, softmax T=0.2 | 0.961 | 0.268 | 0.268 | 0.263 | 0.267 |
| **RF, softmax T=0.25 (chosen: spread=receptive_field)** | 0.953 | 0.268 | 0.268 | 0.264 | 0.265 |
| RF, softmax T=0.35 | 0.945 | 0.268 | 0.268 | 0.263 | 0.266 |
| RF, Gaussian σ=size/4 (no ŝ) | 0.770 | 0.265 | 0.265 | 0.245 | 0.264 |
| RF, ŝ × Gaussian σ=size/4 | 0.820 | 0.264 | 0.264 | 0.248 | 0.264 |
| RF, ŝ × Gaussian σ=size/6 | 0.824 | 0.283 | 0.283 | 0.259 | 0.282 |
| RF, ŝ^1.5 × Gaussian σ=size/4 | 0.836 | 0.284 | 0.284 | 0.264 | 0.278 |
| RF, ŝ^1.5 × Gaussian σ=size/6 | 0.836 | 0.300 | 0.300 | 0.281 | 0.280 |
| top-2 cells, softmax T=0.25 | 0.957 | 0.270 | 0.268 | 0.265 | 0.270 |
| top-3 cells, softmax T=0.25 | 0.957 | 0.270 | 0.268 | 0.267 | 0.270 |
| cnn Grad-CAM best[backbone.features.17] (on the CNN) | 0.871 | 0.299 | 0.270 | 0.299 | 0.264 |
| diag: the CNN's Grad-CAM map, scored on ProtoPNet | 0.863 | 0.282 | 0.276 | 0.282 | 0.273 |

Earlier, on the previous shipped checkpoint (duplicates in its push), val: linear 0.941 / 0.279
(blur 0.272, grey 0.279, noise 0.271); ŝ² 0.977 / 0.298; ŝ⁴ 0.980 / 0.419; ŝ⁸ 0.980 / 0.567; even box
0.379 / 0.316; softmax T=0.5 0.961 / 0.279 (0.274, 0.279, 0.272); T=0.25 0.973 / 0.275 (0.274,
0.275, 0.272); Gaussian σ=size/4 0.816 / 0.268 (0.268, 0.259, 0.267); ŝ × Gaussian σ=size/6 0.859 /
0.270 (0.270, 0.253, 0.266); top-3 ŝ × Gaussian 0.926 / 0.270 (0.267, 0.249, 0.270); gradient
|∂g/∂x| 0.664 / 0.277; (∂g/∂x)² 0.684 / 0.289; |∂g/∂x| × ŝ 0.848 / 0.273 (0.273, 0.267, 0.268).
The val rows came from a deletion-only scratch copy of these maps (same metric code, same images;
its T=0.25 map equals ``spread="receptive_field"`` to 1e-8), not yet from one run of this script on val.

test (read once, after the choice; this script, ``--split test``):

| map | hit | deletion | blur | grey | noise |
|---|---|---|---|---|---|
| **spread=receptive_field (default: softmax T=0.25)** | 0.941 | 0.270 | 0.265 | 0.265 | 0.270 |
| spread=receptive_field_linear | 0.910 | 0.269 | 0.264 | 0.260 | 0.269 |
| spread=similarity (cell) | 0.945 | 0.603 | 0.500 | 0.603 | 0.385 |
| spread=even (cell) | 0.836 | 0.603 | 0.501 | 0.603 | 0.385 |
| view=similarity (not sum-exact) | 0.867 | 0.344 | 0.274 | 0.344 | 0.276 |
| cnn Grad-CAM best[backbone.features.17] (on the shipped CNN) | 0.883 | 0.297 | 0.267 | 0.297 | 0.254 |
| diag: the CNN's Grad-CAM map, scored on ProtoPNet | 0.883 | 0.283 | 0.274 | 0.283 | 0.274 |

Against the shipped ``cnn-synthetic``: hit ≥ 0.9 and grey, blur, worst substrate better; noise not
(0.270 vs 0.254). In the publishing run itself (``experiment=protopnet_synthetic``, test, the CNN
retrained in the same run with the same 8 epochs) Grad-CAM best[features.17] scores blur 0.277 /
grey 0.276 / noise 0.272 (hit 0.820), and the default map is better on all three. Two CNNs of one
recipe differ by 0.018 on noise, more than the gap, so the noise AUC mostly measures the model.

Reading: the softmax over the box raises the hit rate and keeps deletion at the linear box's level;
the Gaussian weighting is the only one reaching Grad-CAM's noise AUC and it drops the hit rate below
0.9. No sum-exact option measured beats the CNN's Grad-CAM on noise by a margin: the CNN's own
Grad-CAM map scored on ProtoPNet gives 0.273 on noise, so part of the gap is the model's response to
the noise substrate, not the map.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import zoo
from zoo import metrics as M
from zoo.data import SyntheticDataModule
from zoo.evaluation import attribution_metrics, best_gradcam_layer, take_images
from zoo.models.prototypes.rf import rf_boxes
from zoo.nets.backbones import conv_layer_names
from zoo.nets.posthoc import gradcam

SHIPPED = {"spread=receptive_field (default)": {}, "spread=receptive_field_linear": {"spread": "receptive_field_linear"},
           "spread=similarity (cell)": {"spread": "similarity"}, "spread=even (cell)": {"spread": "even"},
           "view=similarity (not sum-exact)": {"view": "similarity"}}


def box_weights(net, where: torch.Tensor, w: int, up: torch.Tensor, how: dict) -> torch.Tensor:
    """(B,P,H,W) weights summing to 1 over the RF box of flat location `where` (B,P) on a w-wide grid."""
    B, P, H, W = up.shape
    rf = net.receptive_field()
    loc = torch.stack([where // w, where % w], -1).reshape(-1, 2)
    box = rf_boxes(loc, rf, (H, W)).view(B, P, 4)
    yy, xx = torch.arange(H).view(1, 1, H, 1), torch.arange(W).view(1, 1, 1, W)
    inside = ((yy >= box[..., 0, None, None]) & (yy <= box[..., 2, None, None])
              & (xx >= box[..., 1, None, None]) & (xx <= box[..., 3, None, None])).float()
    if "temperature" in how:
        peak = up.masked_fill(inside == 0, float("-inf")).amax((-2, -1), keepdim=True)
        weight = torch.exp((up - peak) / how["temperature"])
    elif how.get("similarity", True):
        weight = up.clamp_min(0) ** how.get("power", 1.0)
    else:
        weight = torch.ones_like(up)
    if "sigma" in how:  # Gaussian effective receptive field centred on the feature's field
        cy = rf.start + loc[:, 0].double().view(B, P, 1, 1) * rf.jump
        cx = rf.start + loc[:, 1].double().view(B, P, 1, 1) * rf.jump
        weight = weight * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * how["sigma"] ** 2)).float()
    weight = weight * inside
    total = weight.sum((-2, -1), keepdim=True)
    return torch.where(total > 0, weight / total.clamp_min(1e-30), inside / inside.sum((-2, -1), keepdim=True))


def tried_map(net, x: torch.Tensor, t: torch.Tensor, how: dict) -> torch.Tensor:
    """A sum-exact map not shipped (module docstring): W[t,j]·g_j shared by `how`'s weights."""
    if how.get("gradient"):
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            parts = net._parts(net.features(xg))
            g = parts["g"]
            eye = torch.eye(g.shape[1])[:, None, :].expand(g.shape[1], *g.shape)
            grads = torch.autograd.grad(g, xg, grad_outputs=eye, is_grads_batched=True)[0]  # (P,B,C,H,W)
        sens = grads.abs().sum(2).transpose(0, 1)  # zero outside each feature's receptive field
        if how.get("similarity"):
            sens = sens * F.interpolate(parts["s"].detach(), size=x.shape[-2:], mode="bilinear").clamp_min(0)
        weight = sens / sens.sum((-2, -1), keepdim=True).clamp_min(1e-30)
        return torch.einsum("bp,bphw->bhw", (net.last_layer.weight[t] * g).detach(), weight)[:, None]
    with torch.no_grad():
        parts = net._parts(net.features(x))
        s, g = parts["s"], parts["g"]
        up = F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False)
        values = net.last_layer.weight[t] * g  # (B,P)
        k = how.get("topk", 1)
        top_s, top_i = s.flatten(2).topk(k, dim=2)  # (B,P,k); k=1 is the peak cell
        share = top_s.clamp_min(0) / top_s.clamp_min(0).sum(-1, keepdim=True).clamp_min(1e-30)  # split ∝ s over cells
        out = sum(torch.einsum("bp,bphw->bhw", values * share[..., i], box_weights(net, top_i[..., i], s.shape[-1], up, how))
                  for i in range(k))
    return out[:, None]


T = 0.25
TRIED = {"RF, softmax T=0.1": {"temperature": 0.1}, "RF, softmax T=0.15": {"temperature": 0.15},
         "RF, softmax T=0.2": {"temperature": 0.2}, "RF, softmax T=0.25 (= default, dense check)": {"temperature": T},
         "RF, softmax T=0.35": {"temperature": 0.35}, "RF, softmax T=0.5": {"temperature": 0.5},
         "RF, ŝ^2": {"power": 2.0}, "RF, ŝ^4": {"power": 4.0}, "RF, ŝ^8": {"power": 8.0},
         "RF, even box": {"similarity": False},
         "RF, Gaussian σ=size/4 (no ŝ)": {"similarity": False, "sigma": 14 / 4},
         "RF, Gaussian σ=size/6 (no ŝ)": {"similarity": False, "sigma": 14 / 6},
         "RF, ŝ × Gaussian σ=size/4": {"sigma": 14 / 4}, "RF, ŝ × Gaussian σ=size/6": {"sigma": 14 / 6},
         "RF, ŝ^1.5 × Gaussian σ=size/4": {"power": 1.5, "sigma": 14 / 4},
         "RF, ŝ^1.5 × Gaussian σ=size/6": {"power": 1.5, "sigma": 14 / 6},
         "top-2 cells, softmax T=0.25": {"topk": 2, "temperature": T},
         "top-3 cells, softmax T=0.25": {"topk": 3, "temperature": T},
         "gradient |∂g/∂x|": {"gradient": True}, "gradient |∂g/∂x| × ŝ": {"gradient": True, "similarity": True}}


def sum_exact(net, fn):
    def checked(x, t):
        a = fn(x, t)
        logit = net.compute_logits(x).gather(1, t[:, None])[:, 0].detach()
        if not torch.allclose(a.sum((1, 2, 3)), logit, atol=1e-3, rtol=1e-4):
            raise AssertionError("map does not sum to the target logit")
        return a.detach()
    return checked


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--model", default="protopnet-synthetic")
    args = ap.parse_args()
    torch.manual_seed(0)
    dm = SyntheticDataModule(image_size=32, channels=1, num_classes=4, seed=0)
    dm.setup("fit")
    dm.setup("test")
    batch = take_images(dm, args.split, args.n, balanced=True)
    proto, cnn = zoo.load(args.model).eval(), zoo.load("cnn-synthetic").eval()
    if proto.receptive_field().size != 14:
        raise SystemExit("the tried Gaussian widths assume the shipped 14 px receptive field")
    rows = {}
    for name, kw in SHIPPED.items():
        fn = lambda x, t, kw=kw: proto.explain(x, t, **kw).attribution  # noqa: E731
        rows[f"{name}"] = attribution_metrics(proto, fn if "view" in kw else sum_exact(proto, fn), batch, steps=24)
    if args.split == "val":
        for name, how in TRIED.items():
            rows[name] = attribution_metrics(proto, sum_exact(proto, lambda x, t, how=how: tried_map(proto, x, t, how)),
                                             batch, steps=24)
    layer = best_gradcam_layer(cnn, take_images(dm, "val", args.n, balanced=True), conv_layer_names(cnn))
    rows[f"cnn grad-cam best[{layer}] (layer on val; on the CNN)"] = attribution_metrics(
        cnn, lambda x, t: gradcam(cnn, x, t, layer), batch, steps=24)

    def cam_on_proto(x, t):  # diagnostic: the CNN's map (shifted ≥ 0, scaled to the logit) scored on ProtoPNet
        a = gradcam(cnn, x, t, layer).detach()
        a = a - a.amin((1, 2, 3), keepdim=True)
        return a / a.sum((1, 2, 3), keepdim=True).clamp_min(1e-12) * proto.compute_logits(x).gather(1, t[:, None])[
            :, 0, None, None, None].detach()
    rows["diag: the CNN's Grad-CAM map, scored on ProtoPNet"] = attribution_metrics(proto, cam_on_proto, batch, steps=24)
    keys = ["hit_rate"] + sorted(k for k in next(iter(rows.values())) if k.startswith("deletion"))
    print(f"{args.model}, split={args.split}, n={batch['image'].shape[0]}")
    print("| map | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |", flush=True)


if __name__ == "__main__":
    main()
