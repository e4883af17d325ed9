"""ProtoPNet's sum-exact map: where to put each W·g (the default ``spread``), measured against
best-layer Grad-CAM of the shipped CNN, on the synthetic val split (the choice) or test (reported once).

Rows: the exact map spread over the receptive field / the stride cell by the upsampled similarity,
evenly in the cell, the similarity view, Grad-CAM at the layer chosen on val (hit rate). Columns:
hit rate and deletion AUC on each substrate (grey, blur, noise; lower is better), 24 steps, plateau
ties, ground-truth class, 256 class-balanced images.

    OMP_NUM_THREADS=1 python benchmarks/bench_protopnet_maps.py [--split val|test] [--n 256]
"""

from __future__ import annotations

import argparse

import torch

import zoo
from zoo.data import SyntheticDataModule
from zoo.evaluation import attribution_metrics, best_gradcam_layer, take_images
from zoo.nets.backbones import conv_layer_names
from zoo.nets.posthoc import gradcam

VARIANTS = {"exact, spread=receptive_field": {}, "exact, spread=similarity (cell)": {"spread": "similarity"},
            "exact, spread=even (cell)": {"spread": "even"}, "view=similarity": {"view": "similarity"}}


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
    proto, cnn = zoo.load(args.model), zoo.load("cnn-synthetic")
    rows = {}
    for name, kw in VARIANTS.items():
        rows[f"{args.model} {name}"] = attribution_metrics(
            proto, lambda x, t, kw=kw: proto.explain(x, t, **kw).attribution, batch, steps=24)
    layer = best_gradcam_layer(cnn, take_images(dm, "val", args.n, balanced=True), conv_layer_names(cnn))
    rows[f"cnn grad-cam best[{layer}] (layer on val)"] = attribution_metrics(
        cnn, lambda x, t: gradcam(cnn, x, t, layer), batch, steps=24)
    keys = ["hit_rate"] + sorted(k for k in next(iter(rows.values())) if k.startswith("deletion"))
    print(f"split={args.split}, n={batch['image'].shape[0]}")
    print("| map | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
