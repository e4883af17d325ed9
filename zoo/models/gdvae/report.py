"""GdVAE's rows in a run's table (``image_report_rows``) and the comparison point they need.

* :func:`counterfactual_rows` — counterfactual metrics toward every class other than the
  prediction, for both closed-form latent paths (validity after re-encoding, latent validity,
  proximity, latent consistency, realism by the same-run CNN, nearest-training-image distance,
  change inside the evidence mask / box, milliseconds per counterfactual);
* :func:`gradient_counterfactuals` — a gradient-based latent counterfactual search on the same
  model (latent or REVISE-style cycle objective), timed against the closed form.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.evaluation import take_images
from zoo.metrics import counterfactuals as CF


def counterfactual_rows(model, datamodule, baseline=None, n_images: int = 256, prob: float = 0.9,
                        gradient_images: int = 128) -> dict[str, dict[str, float]]:
    """The first `n_images` test images against 2000 training images (the realism reference)."""
    model.eval()
    batch = take_images(datamodule, "test", n_images)
    datamodule.setup("fit")
    reference = take_images(datamodule, "train", 2000)
    return counterfactual_report(model, batch, reference, baseline=baseline, prob=prob,
                                 gradient_images=gradient_images)


def gradient_counterfactuals(model, x: Tensor, source: Tensor, target: Tensor, prob: float = 0.9,
                             objective: str = "latent", steps: int = 100, lr: float = 0.05,
                             distance_weight: float = 0.01) -> dict[str, Tensor]:
    """The comparison point: a gradient-based latent counterfactual search on the same model.

    Starts at z₀ = m(x) and runs Adam on ``softplus(−(logit_k − logit_c)) + λ‖z − z₀‖²`` (i.e.
    −log of the pairwise probability p̃_k = p_k/(p_c+p_k), plus a proximity term) until p̃_k ≥ `prob`
    per image (finished images stop moving), at most `steps` steps.
    ``objective="latent"``: p̃_k of the latent classifier at z (the criterion the closed form solves);
    ``objective="cycle"``: p̃_k of the classifier on the re-encoded decoded image m(Dec(z)) (REVISE-style;
    it optimises validity directly). Returns {"images" (B,C,H,W), "latents" (B,D), "steps" (B,)}."""
    if objective not in ("latent", "cycle"):
        raise ValueError(f"objective must be 'latent' or 'cycle', got {objective!r}")
    with torch.no_grad():
        z0, _ = model.encode(x)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    used = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    rows = torch.arange(x.shape[0], device=x.device)
    with torch.enable_grad():
        for _ in range(steps):
            zz = model.encode(model.decode(z))[0] if objective == "cycle" else z
            logits = model.latent_logits(zz)
            pair = logits[rows, target] - logits[rows, source]  # log-odds of k vs c
            done = done | (torch.sigmoid(pair) >= prob).detach()
            if bool(done.all()):
                break
            used += (~done).long()
            loss = (F.softplus(-pair) + distance_weight * (z - z0).square().sum(1))[~done].sum()
            opt.zero_grad()
            loss.backward()
            z.grad[done] = 0  # finished images stay where they crossed
            opt.step()
    with torch.no_grad():
        z = z.detach()
        return {"images": model.decode(z), "latents": z, "steps": used}


@torch.no_grad()
def counterfactual_report(model, batch: dict[str, Tensor], reference: dict[str, Tensor], baseline=None,
                          prob: float = 0.9, gradient_images: int = 128,
                          gradient_steps: int = 100) -> dict[str, dict[str, float]]:
    """Counterfactual metrics toward *every* class other than the prediction, at pairwise target
    probability `prob`, for both closed-form paths, plus the gradient-based search (toward the
    runner-up on the first `gradient_images` images) for validity and time.

    Columns: ``cf_validity`` (re-encoded CF classified as the target), ``cf_validity_worst`` (the
    worst target class), ``cf_latent_validity`` (full softmax argmax at z_δ), ``cf_proximity_l1``,
    ``cf_latent_consistency``, ``cf_realism_conf`` (baseline CNN's probability of the target on x_δ),
    ``cf_nn_dist`` / ``real_nn_dist`` (RMS distance to the nearest training image of the target /
    own class, for CFs / real test images), ``cf_mass_in_mask`` (|x_0.5 − x̂|),
    ``cf_mass_in_mask_input`` (|x_0.5 − x|) and ``cf_mass_in_box`` (|x_0.5 − x̂| inside the evidence
    object's bounding box ± 1 px, where any class's shape at that place would lie: a pixel-exact shape
    swap scores 1.00 there and 0.50 in the source mask, see CF.bounding_box_mask) when masks exist,
    ``cf_ms`` (milliseconds per CF)."""
    device = model.device
    x = batch["image"].to(device)
    masks = batch.get("mask")
    ref_x, ref_y = reference["image"].to(device), reference["label"].to(device)
    z, _ = model.encode(x)
    pred = model.latent_logits(z).argmax(1)
    rows: dict[str, dict[str, float]] = {}
    for method in model.cf_methods:
        cols: dict[str, list[Tensor]] = {}
        per_class, elapsed, count = [], 0.0, 0
        for k in range(model.num_classes):
            keep = pred != k
            if not keep.any():
                continue
            xs = x[keep]
            start = time.perf_counter()
            out = model.counterfactuals(xs, cf_target=k, probs=(prob, 0.5), method=method)
            elapsed += time.perf_counter() - start
            count += int(keep.sum())
            x_cf, z_cf = out["images"][:, 0], out["latents"][:, 0]
            target = out["target"]
            z_re, _ = model.encode(x_cf)
            valid = CF.validity(model.latent_logits(z_re), target)
            per_class.append(float(valid.mean()))
            parts = {
                "cf_validity": valid,
                "cf_latent_validity": CF.validity(model.latent_logits(z_cf), target),
                "cf_proximity_l1": CF.proximity_l1(x_cf, xs),
                "cf_latent_consistency": CF.latent_consistency(z_re, z_cf),
                "cf_nn_dist": CF.nearest_neighbour_distance(x_cf, ref_x[ref_y == k]),
            }
            if baseline is not None:
                parts["cf_realism_conf"] = CF.classifier_confidence(baseline.to(device).eval(), x_cf, target)
            if masks is not None:
                recon = model.decode(out["latent"])
                boundary = out["images"][:, 1]
                m = masks[keep.cpu()].to(device)
                change = (boundary - recon).abs().sum(1, keepdim=True)
                parts["cf_mass_in_mask"] = CF.mass_in_mask(change, m)
                parts["cf_mass_in_mask_input"] = CF.mass_in_mask((boundary - xs).abs().sum(1, keepdim=True), m)
                parts["cf_mass_in_box"] = CF.mass_in_mask(change, CF.bounding_box_mask(m))
            for name, v in parts.items():
                cols.setdefault(name, []).append(v.float().cpu())
        row = {name: float(torch.nanmean(torch.cat(v))) for name, v in cols.items()}
        row["cf_validity_worst"] = min(per_class)
        row["cf_ms"] = 1000 * elapsed / max(count, 1)
        rows[f"{model.model_name} (counterfactuals)" if method == model.hparams.cf_method
             else f"{model.model_name}[{method} path] counterfactuals"] = row
    real = [CF.nearest_neighbour_distance(x[pred == k], ref_x[ref_y == k]) for k in range(model.num_classes)
            if (pred == k).any()]
    rows[f"{model.model_name} (counterfactuals)"]["real_nn_dist"] = float(torch.cat(real).mean())

    # The gradient-based search on the same model, same CFs (toward the runner-up), same validity test.
    xs = x[:gradient_images]
    closed_start = time.perf_counter()
    closed = model.counterfactuals(xs, probs=(prob,))
    closed_s = time.perf_counter() - closed_start
    source, target = closed["source"], closed["target"]
    closed_valid = CF.validity(model.latent_logits(model.encode(closed["images"][:, 0])[0]), target)
    rows[f"{model.model_name} closed-form → runner-up"] = {
        "cf_validity": float(closed_valid.mean()),
        "cf_proximity_l1": float(CF.proximity_l1(closed["images"][:, 0], xs).mean()),
        "cf_ms": 1000 * closed_s / xs.shape[0]}
    for objective in ("latent", "cycle"):
        start = time.perf_counter()
        out = gradient_counterfactuals(model, xs, source, target, prob=prob, objective=objective, steps=gradient_steps)
        seconds = time.perf_counter() - start
        valid = CF.validity(model.latent_logits(model.encode(out["images"])[0]), target)
        rows[f"{model.model_name} gradient search[{objective}] → runner-up"] = {
            "cf_validity": float(valid.mean()),
            "cf_proximity_l1": float(CF.proximity_l1(out["images"], xs).mean()),
            "cf_ms": 1000 * seconds / xs.shape[0], "steps": float(out["steps"].float().mean()),
            "speedup_closed_form": seconds / closed_s}
    return rows
