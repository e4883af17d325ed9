"""GdVAE counterfactual validity on the VAL split, judged by an independent classifier: the number a
GdVAE setting is chosen by (test is read once, by the training run). Each model is a saved folder
(``<run>/model``); the judge is the zoo ``cnn`` trained on the same training split and seed.

    python benchmarks/gdvae_val_validity.py --judge logs/leaderboard/synthetic/cnn/seed0/model \\
        --models logs/gdvae_default_seed0/model logs/leaderboard/synthetic/gdvae/seed0/model --seed 0
"""

from __future__ import annotations

import argparse

from zoo import hub
from zoo.data import create_datamodule
from zoo.models.gdvae import counterfactual_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--judge", required=True)
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--seed", type=int, default=0, help="the data seed of the runs (synthetic images)")
    ap.add_argument("--n-images", type=int, default=256)
    args = ap.parse_args()
    dm = create_datamodule(args.data, seed=args.seed)
    judge = hub.load(args.judge).eval()
    keys = ["cf_validity_judge", "cf_validity_judge_worst", "cf_validity", "cf_judge_nn_ratio", "cf_change_l1"]
    print(f"val split, {args.n_images} images, toward every other class, δ = 0.99 (judge: {args.judge})")
    print(f"{'model [row]':75s} " + " ".join(f"{k:>24s}" for k in keys))
    for path in args.models:
        rows = counterfactual_rows(hub.load(path).eval(), dm, judge=judge, n_images=args.n_images, split="val",
                                   gradient_images=0)
        for name, row in rows.items():  # the model's own latent path, then the other one
            if "counterfactuals" in name and "→" not in name:
                label = f"{path} [{name}]"
                print(f"{label:75s} " + " ".join(f"{row.get(k, float('nan')):24.3f}" for k in keys))


if __name__ == "__main__":
    main()
