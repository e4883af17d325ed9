"""Closed-form GdVAE counterfactuals vs a gradient-based latent counterfactual search on the same model.

    OMP_NUM_THREADS=1 python benchmarks/bench_counterfactuals.py [--model gdvae-synthetic] [--n 128]

Both make counterfactuals of the same test images toward the runner-up class at pairwise target
probability --prob, and both are scored the same way: validity = the re-encoded decoded image is
classified as the target. Timings are measured in this run, on this machine; the script prints
ratios (gradient time / closed-form time), never absolute targets. Target: ≥ 20× at equal or better
validity.
"""

from __future__ import annotations

import argparse
import time

import torch

import zoo
import zoo.data
from zoo.metrics import counterfactuals as CF
from zoo.models.gdvae import gradient_counterfactuals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gdvae-synthetic", help="saved folder or pretrained name")
    parser.add_argument("--data", default="synthetic", help="synthetic or a MedMNIST flag")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--prob", type=float, default=0.9)
    parser.add_argument("--closed-prob", type=float, default=0.999, help="second closed-form row's target probability")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = zoo.load(args.model)
    if args.data == "synthetic":
        dm = zoo.data.SyntheticDataModule(num_classes=model.num_classes, image_size=model.image_size, seed=0)
    else:
        import os

        dm = zoo.data.MedMNISTDataModule(flag=args.data, image_size=model.image_size, root=os.environ.get("ZOO_DATA_DIR"),
                                         as_rgb=model.in_channels == 3)
    from zoo.evaluation import take_images

    x = take_images(dm, "test", args.n)["image"]

    def closed(prob):
        return model.counterfactuals(x, probs=(prob,))

    closed(args.prob)  # warm-up
    print(f"{args.n} counterfactuals of {args.model} toward the runner-up, pairwise p = {args.prob}")
    print(f"{'method':28} {'validity':>9} {'ms / CF':>9} {'steps':>6} {'ratio':>7}")
    # The closed form picks its target probability for free (same cost): the second row asks for a more
    # confident counterfactual, so validity can be compared at equal or better validity.
    for i, prob in enumerate((args.prob, args.closed_prob)):
        start = time.perf_counter()
        for _ in range(args.repeats):
            out = closed(prob)
        seconds = (time.perf_counter() - start) / args.repeats
        if i == 0:
            closed_s, source, target = seconds, out["source"], out["target"]
        with torch.no_grad():
            valid = float(CF.validity(model(out["images"][:, 0]), target).mean())
        print(f"{'closed form (minimal) p=' + format(prob, 'g'):28} {valid:9.3f} {1000 * seconds / args.n:9.3f} "
              f"{0:6d} {seconds / closed_s:7.1f}")
    for objective in ("latent", "cycle"):
        start = time.perf_counter()
        g = gradient_counterfactuals(model, x, source, target, prob=args.prob, objective=objective, steps=args.steps)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            valid = float(CF.validity(model(g["images"]), target).mean())
        print(f"{'gradient search [' + objective + ']':28} {valid:9.3f} {1000 * seconds / args.n:9.3f} "
              f"{float(g['steps'].float().mean()):6.1f} {seconds / closed_s:7.1f}")
    print("ratio = gradient-search time / closed-form time (same images, same machine, this run)")


if __name__ == "__main__":
    main()
