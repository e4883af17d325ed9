"""Cost of a Sum-of-Parts explanation, in backbone forwards and in time, against one plain forward.

Target (issue 5): explaining a batch costs at most M + 1 backbone forwards (one clean pass for the
group generator's tokens, one per group on the masked images). Counted exactly (images through the
backbone, via a forward hook) and timed against one plain forward of the same backbone + head on the
same batch, in the same run, on one CPU thread. Also shown: the SOP forward alone (the prediction
costs the same M + 1 passes: the explanation is a by-product of the prediction) and the chunk size's
effect (memory bound, not speed).

Run: python benchmarks/bench_sop.py [--groups 8] [--batch 64] [--checkpoint sop-synthetic]
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

import zoo


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--checkpoint", default=None, help="a saved SOP (e.g. sop-synthetic) instead of a fresh one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    best = functools.partial(best_of, repeats=args.repeats)
    torch.manual_seed(0)
    if args.checkpoint:
        model = zoo.load(args.checkpoint)
    else:
        model = zoo.create_model("sop", num_classes=4, in_channels=1, image_size=32, num_groups=args.groups).eval()
    M, B = model.num_groups, args.batch
    x = torch.rand(B, model.in_channels, model.image_size, model.image_size) * 2 - 1

    images = []
    handle = model.backbone.register_forward_hook(lambda m, i, o: images.append(i[0].shape[0]))
    model.explain(x)
    handle.remove()
    passes = sum(images) / B

    plain = best(lambda: model.backbone_logits(x))
    # The bound in time, measured: M + 1 plain forwards of the same batch, one after the other. On a
    # loaded CPU a B·M-image batch runs slower per image than a B-image one (cache), so the explain ÷
    # plain ratio can exceed M + 1 while the work is M + 1 forwards; this row separates the two.
    bound = best(lambda: [model.backbone_logits(x) for _ in range(M + 1)])
    forward = best(lambda: model(x))
    explain = best(lambda: model.explain(x))
    chunked = zoo.create_model("sop", **{**dict(model.hparams), "chunk_size": B}).eval()
    chunked.load_state_dict(model.state_dict())
    small_chunks = best(lambda: chunked.explain(x))

    unit = "cells" if model.hparams.mask_resolution == "cells" else "pixels"
    total = model.grid[0] * model.grid[1] if unit == "cells" else model.image_size ** 2
    print(f"SOP M={M} groups of {model.keep} of {total} {unit}, batch {B}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"backbone forwards per explained batch: {passes:.2f}  (bound M + 1 = {M + 1}) -> "
          f"{'OK' if passes <= M + 1 else 'OVER BUDGET'}")
    print(f"{'plain forward (backbone + head)':36s} {plain * 1e3:8.1f} ms   1.00×")
    print(f"{'M + 1 plain forwards (the bound)':36s} {bound * 1e3:8.1f} ms  {bound / plain:5.2f}×")
    print(f"{'SOP forward (prediction)':36s} {forward * 1e3:8.1f} ms  {forward / plain:5.2f}×")
    print(f"{'SOP explain':36s} {explain * 1e3:8.1f} ms  {explain / plain:5.2f}×   (bound {M + 1}×)")
    print(f"{'SOP explain, chunk = batch size':36s} {small_chunks * 1e3:8.1f} ms  {small_chunks / plain:5.2f}×")
    print(f"explain ÷ (M + 1 plain forwards): {explain / bound:.2f} (chunk {model.hparams.chunk_size}), "
          f"{small_chunks / bound:.2f} (chunk {B})")


if __name__ == "__main__":
    main()
