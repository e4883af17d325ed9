"""GdVAE's rows in a run's table (``image_report_rows``) and the comparison point they need.

* :func:`counterfactual_rows` — counterfactual metrics toward every class other than the
  prediction, for both closed-form latent paths. The headline validity and realism are judged by an
  *independent* classifier (``judge=``: the zoo ``cnn`` trained on the same data, never on
  counterfactuals — the black-box baseline of the same run); the self-judged ones (the GdVAE's own
  encoder, the one its decoder was trained to satisfy through the consistency terms) sit beside them.
  Also: proximity, latent consistency, nearest-training-image distance, change inside the evidence
  mask / box, milliseconds per counterfactual;
* :func:`gradient_counterfactuals` — a gradient-based latent counterfactual search on the same
  model (latent or REVISE-style cycle objective), timed against the closed form.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from typing import Sequence

from torch import Tensor

from zoo.evaluation import take_images
from zoo.metrics import counterfactuals as CF


def counterfactual_rows(model, datamodule, judge=None, n_images: int = 256, prob: float = 0.99,
                        gradient_images: int = 128, split: str = "test",
                        methods: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """The first `n_images` images of `split` (choose on "val", report "test" once) against 2000
    training images (the realism reference), judged by `judge` (see :func:`counterfactual_report`).

    `prob` = 0.99, chosen on VAL by the independent judge (256 val images, every other class): judged
    validity synthetic 0.84 → 0.94 (minimal path), PneumoniaMNIST 0.88 → 0.95 from δ = 0.9, at the
    same change L1 (docs/notes/gdvae.md); the closed form costs the same at any δ."""
    model.eval()
    batch = take_images(datamodule, split, n_images)
    reference = take_images(datamodule, "train", 2000)
    return counterfactual_report(model, batch, reference, judge=judge, prob=prob,
                                 gradient_images=gradient_images, methods=methods)


def judge_features(judge, x: Tensor, batch_size: int = 256) -> Tensor:
    """(N,F) the independent judge's pooled features — the zoo ``cnn``'s layout, ``backbone`` then global
    average pooling then ``head`` (zoo/models/baseline.py) — the space its realism distance is taken in."""
    return torch.cat([judge.backbone(x[i:i + batch_size]).mean(dim=(2, 3)) for i in range(0, x.shape[0], batch_size)])


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
def counterfactual_report(model, batch: dict[str, Tensor], reference: dict[str, Tensor], judge=None,
                          prob: float = 0.9, gradient_images: int = 128, gradient_steps: int = 100,
                          methods: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Counterfactual metrics toward *every* class other than the prediction, at pairwise target
    probability `prob`, for both closed-form paths, plus the gradient-based search (toward the
    runner-up on the first `gradient_images` images) for validity and time.

    `judge` is an independent classifier (the zoo ``cnn``, trained on the same training split, never on
    counterfactuals; NOT the GdVAE's encoder). With it, the headline columns: ``cf_validity_judge``
    (the judge's argmax on x_δ is the target), ``cf_validity_judge_worst`` (worst target class),
    ``cf_realism_conf`` (the judge's probability of the target on x_δ), ``cf_judge_nn_dist`` /
    ``real_judge_nn_dist`` (Euclidean distance, in the judge's pooled feature space, to the nearest
    training image of the target class, for CFs / for real images of the predicted class — a kNN
    realism check: a CF as realistic as a real image has ratio ``cf_judge_nn_ratio`` ≈ 1).
    Self-judged, beside them: ``cf_validity`` (the GdVAE's own encoder reads the re-encoded CF as the
    target — the criterion its decoder was trained to satisfy), ``cf_validity_worst``,
    ``cf_latent_validity`` (full softmax argmax at z_δ), ``cf_latent_consistency``; and
    ``cf_proximity_l1`` (mean |x_δ − x| per pixel, in [0,1] pixel units — images live in [-1,1], so
    half the raw L1; it includes the reconstruction error), ``cf_change_l1`` (mean |x_δ − x̂| per pixel,
    [0,1] units: the change the latent move itself makes, x̂ the reconstruction), ``cf_nn_dist`` / ``real_nn_dist`` (RMS pixel distance to the nearest training
    image of the target / own class, for CFs / real images), ``cf_mass_in_mask`` (|x_0.5 − x̂|),
    ``cf_mass_in_mask_input`` (|x_0.5 − x|) and ``cf_mass_in_box`` (|x_0.5 − x̂| inside the evidence
    object's bounding box ± 1 px, where any class's shape at that place would lie: a pixel-exact shape
    swap scores 1.00 there and 0.50 in the source mask, see CF.bounding_box_mask) when masks exist,
    ``cf_ms`` (milliseconds per CF). `methods`: the latent paths (default: both)."""
    device = model.device
    if judge is not None:
        judge = judge.to(device).eval()
        ref_feat = judge_features(judge, reference["image"].to(device))
    x = batch["image"].to(device)
    masks = batch.get("mask")
    ref_x, ref_y = reference["image"].to(device), reference["label"].to(device)
    z, _ = model.encode(x)
    pred = model.latent_logits(z).argmax(1)
    rows: dict[str, dict[str, float]] = {}
    for method in (model.cf_methods if methods is None else methods):
        cols: dict[str, list[Tensor]] = {}
        per_class, per_class_judge, elapsed, count = [], [], 0.0, 0
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
            recon = model.decode(out["latent"])
            valid = CF.validity(model.latent_logits(z_re), target)
            per_class.append(float(valid.mean()))
            parts = {}
            if judge is not None:
                judged = CF.validity(judge(x_cf), target)
                per_class_judge.append(float(judged.mean()))
                parts["cf_validity_judge"] = judged
                parts["cf_realism_conf"] = CF.classifier_confidence(judge, x_cf, target)
                parts["cf_judge_nn_dist"] = CF.nearest_neighbour_distance(
                    judge_features(judge, x_cf), ref_feat[ref_y == k], rms=False)
            parts.update({
                "cf_validity": valid,
                "cf_latent_validity": CF.validity(model.latent_logits(z_cf), target),
                "cf_proximity_l1": CF.proximity_l1(x_cf, xs) / 2,  # [-1,1] images → [0,1] pixel units
                "cf_change_l1": CF.proximity_l1(x_cf, recon) / 2,  # the latent move's own change
                "cf_latent_consistency": CF.latent_consistency(z_re, z_cf),
                "cf_nn_dist": CF.nearest_neighbour_distance(x_cf, ref_x[ref_y == k]),
            })
            if masks is not None:
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
        if per_class_judge:
            row["cf_validity_judge_worst"] = min(per_class_judge)
        row["cf_ms"] = 1000 * elapsed / max(count, 1)
        rows[f"{model.model_name} (counterfactuals)" if method == model.hparams.cf_method
             else f"{model.model_name}[{method} path] counterfactuals"] = row
    main = rows.get(f"{model.model_name} (counterfactuals)")
    if main is not None:
        present = [k for k in range(model.num_classes) if (pred == k).any()]
        real = [CF.nearest_neighbour_distance(x[pred == k], ref_x[ref_y == k]) for k in present]
        main["real_nn_dist"] = float(torch.cat(real).mean())
        if judge is not None:
            feats = judge_features(judge, x)
            real_j = torch.cat([CF.nearest_neighbour_distance(feats[pred == k], ref_feat[ref_y == k], rms=False)
                                for k in present])
            main["real_judge_nn_dist"] = float(real_j.mean())
            main["cf_judge_nn_ratio"] = main["cf_judge_nn_dist"] / main["real_judge_nn_dist"]
    if gradient_images <= 0:
        return rows

    # The gradient-based search on the same model, same CFs (toward the runner-up), same validity test.
    xs = x[:gradient_images]
    closed_start = time.perf_counter()
    closed = model.counterfactuals(xs, probs=(prob,))
    closed_s = time.perf_counter() - closed_start
    source, target = closed["source"], closed["target"]
    closed_valid = CF.validity(model.latent_logits(model.encode(closed["images"][:, 0])[0]), target)
    rows[f"{model.model_name} closed-form → runner-up"] = {
        "cf_validity": float(closed_valid.mean()),
        "cf_proximity_l1": float(CF.proximity_l1(closed["images"][:, 0], xs).mean() / 2),
        "cf_ms": 1000 * closed_s / xs.shape[0]}
    for objective in ("latent", "cycle"):
        start = time.perf_counter()
        out = gradient_counterfactuals(model, xs, source, target, prob=prob, objective=objective, steps=gradient_steps)
        seconds = time.perf_counter() - start
        valid = CF.validity(model.latent_logits(model.encode(out["images"])[0]), target)
        rows[f"{model.model_name} gradient search[{objective}] → runner-up"] = {
            "cf_validity": float(valid.mean()),
            "cf_proximity_l1": float(CF.proximity_l1(out["images"], xs).mean() / 2),
            "cf_ms": 1000 * seconds / xs.shape[0], "steps": float(out["steps"].float().mean()),
            "speedup_closed_form": seconds / closed_s}
    return rows
