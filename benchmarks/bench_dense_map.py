"""Dense MedicalPatchNet map: one fully convolutional pass vs the anchor's shift-averaging.

Shift-averaging (MedicalPatchNet's dense map): for every grid offset (dy, dx) ∈ [0, P)², shift the
image, classify the non-overlapping P×P patches, upsample the grid and average the P² maps (4096
shifts at the anchor's P=64). ``model.dense_map`` gets the *same* map from one fully convolutional
pass of the unpadded per-patch CNN (pools at stride 1, later layers dilated), then averages the
window logits per pixel (box filter via ``F.fold``).

Fairness: both run on the same device (CPU, one torch thread), on the same images, after a warm-up;
the median of repeats is reported, in process CPU time (the machine is shared: wall time, printed
too, charges either side for other jobs at random). The baseline is at its best: all shifts are cut
from one padded canvas and pushed through the patch network in batches of the size that runs
fastest for that geometry (calibrated on 1/8 of the shifts: small batches stay in cache); at the
small sizes the anchor's one-forward-per-shift loop is timed too and the faster of the two counts.
The baseline's map is checked against ``model.shift_averaged_map`` (the definition the tests use).

What bounds the ratio (plainly): shift-averaging also evaluates every P×P window exactly once (P²
shifts × (H/P)² patches ≈ H² windows), so no scheme at "equal map" can skip windows; the one-pass
map only saves the work that overlapping windows share. In a valid-conv patch network that is the
early, high-resolution layers: a layer with n×n positions inside one window costs n² per window
but only 1 per pixel in the one-pass net. The speed-up is therefore the per-window cost divided by
the per-pixel cost of the dilated net (printed as "MAC ratio" below), about
  P=8: 4×,  P=14: 10×,  P=32: 46×,  P=64: 118×
for the zoo's ``patch_cnn`` (widths 32/64/128); the measured ratio is lower at large P because the
one-pass net also computes the early layers on the border that windows sticking out of the image
see, and its big dilated feature maps run at a lower rate than the baseline's small patch batches.
At the zoo's 28–32 px images (P=8 / P=14) 50× is impossible at equal map: most multiply-adds sit in
the last layers, which see 1–4 positions per window. The target holds at the anchor's patch size
(P=64, 4096 shifts) — the size at which shift-averaging is the problem MedicalPatchNet has.

Measured 2026-12-01 (second session, quiet 2-core CPU, one thread; ratio in CPU time, wall in
brackets), all maps equal (corr 1.000000, max |diff| ≤ 7e-5):
  32 px,  P=8,  16 images (patchnet-synthetic):        4.9x  (4.9x)
  28 px,  P=14, 16 images (patchnet-pneumoniamnist):  10.7x (10.7x)
  128 px, P=32, 1 image (untrained):                  30.3x (30.3x)
  128 px, P=64, 1 image (untrained):                  54.7x (54.8x)
(earlier runs under load: 5.3x, 10.3x, 32.8x, 56.4x and 4.8x, 12.1x, 35.3x, 56.5x CPU).
Run:

    python benchmarks/bench_dense_map.py            # all geometries (P=64 takes a few minutes)
    python benchmarks/bench_dense_map.py --quick    # skip P=64

Target (kept out of the test suite, which has no timed tests): ≥ 50× at correlation ≥ 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import zoo
from zoo.data import make_synthetic
from zoo.nets.patches import ValidConvNet


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, torch.Tensor]:
    """Median time of `repeats` calls after `warmup` calls (no autograd).

    The time is this process's CPU time (``time.process_time``): with one torch thread it is the
    compute the call costs, whatever else runs on the (shared) machine; wall time would charge
    each side for other people's jobs at random. :func:`run` prints both."""
    with torch.no_grad():
        for _ in range(warmup):
            out = fn()
        cpu, wall = [], []
        for _ in range(repeats):
            start, start_wall = time.process_time(), time.perf_counter()
            out = fn()
            cpu.append(time.process_time() - start)
            wall.append(time.perf_counter() - start_wall)
    timed.wall = statistics.median(wall)  # wall time of the last measurement, for the printout
    return statistics.median(cpu), out


def shift_average_batched(model, x: torch.Tensor, max_patches: int = 512, shifts=None) -> torch.Tensor:
    """Shift-averaging at its best: every shifted copy is a crop of one padded canvas (padded the way
    ``dense_map`` pads), and the shifts go through the patch network in batches of ≤ `max_patches`
    patches (:func:`best_batch` picks the fastest size). Same definition as
    ``model.shift_averaged_map`` (checked in :func:`run`); `shifts` (default: all P²) is for timing
    a sample only."""
    P, (H, W) = model.patch_size, x.shape[-2:]
    B = x.shape[0]
    big = model._pad_windows(x, P)  # a crop at offset (dy, dx) = the image padded by (dy, dx) top-left
    span_h, span_w = -(-(H + P - 1) // P) * P, -(-(W + P - 1) // P) * P  # one canvas fits every offset
    big = F.pad(big, (0, span_w + P - big.shape[-1], 0, span_h + P - big.shape[-2]), mode="replicate")
    shifts = shifts or [(dy, dx) for dy in range(P) for dx in range(P)]
    per_shift = B * (span_h // P) * (span_w // P)
    step = max(1, max_patches // per_shift)
    total = torch.zeros(B, model.num_classes, H, W)
    for s in range(0, len(shifts), step):
        chunk = shifts[s:s + step]
        crops = torch.cat([big[..., P - dy:P - dy + span_h, P - dx:P - dx + span_w] for dy, dx in chunk])
        grids = model._grid_logits(crops)  # (len(chunk)·B,K,h,w): one batched forward per chunk
        up = grids.repeat_interleave(P, dim=2).repeat_interleave(P, dim=3)
        for k, (dy, dx) in enumerate(chunk):
            total += up[k * B:(k + 1) * B, :, dy:dy + H, dx:dx + W]
    return total / len(shifts)


def best_batch(model, x: torch.Tensor, candidates=(16, 64, 256, 1024)) -> int:
    """The baseline's fastest batch size (patches per forward), timed on the first 1/8 of the shifts:
    small batches stay in cache, large ones amortise per-call overhead; it differs per geometry."""
    P = model.patch_size
    sample = [(dy, dx) for dy in range(P) for dx in range(P)][:max(1, P * P // 8)]
    timed(lambda: shift_average_batched(model, x, candidates[0], sample[:1]), repeats=1)  # warm-up
    timings = {c: timed(lambda: shift_average_batched(model, x, c, sample), repeats=1, warmup=0)[0]
               for c in candidates}
    return min(timings, key=timings.get)


def mac_ratio(net: ValidConvNet, patch: int) -> float:
    """Multiply-adds of one window evaluated alone ÷ multiply-adds per pixel of the one-pass net."""
    size, per_window, per_pixel = patch, 0, 0
    for layer in net.body:
        if isinstance(layer, nn.MaxPool2d):
            size //= 2
            continue
        conv = layer[0]
        size = size - conv.kernel_size[0] + 1
        macs = conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        per_window += macs * size * size
        per_pixel += macs
    return per_window / per_pixel


def run(model, x: torch.Tensor, label: str, repeats: int, loop: bool) -> float:
    """Time both on `x`. The dense map: warm-up + median of ≥ 3 repeats. The baseline: its fastest
    batch size (calibrated, which also warms it up), then the median of `repeats` (1 for the large
    geometries, where one call takes seconds to minutes); the ratio is taken against the faster of
    the batched and the loop baseline."""
    P = model.patch_size
    t_dense, dense = timed(lambda: model.dense_map(x), repeats=max(repeats, 5))
    w_dense = timed.wall
    batch = best_batch(model, x)  # the calibration calls also warm the baseline up
    t_base, naive = timed(lambda: shift_average_batched(model, x, batch), repeats=repeats, warmup=int(repeats > 1))
    w_base = timed.wall
    corr = torch.corrcoef(torch.stack([dense.flatten(), naive.flatten()]))[0, 1].item()
    print(f"{label}: {x.shape[0]} images {x.shape[-1]} px, P={P} ({P * P} shifts), "
          f"MAC ratio {mac_ratio(model.backbone, P):.0f}x")
    print(f"  dense map, one conv pass           {t_dense * 1e3:10.1f} ms CPU  ({w_dense * 1e3:.1f} ms wall)")
    print(f"  shift-averaging, batched ({batch:4d})   {t_base * 1e3:10.1f} ms CPU  ({w_base * 1e3:.1f} ms wall)"
          f"   ratio {t_base / t_dense:6.1f}x  (wall {w_base / w_dense:.1f}x)")
    if loop:  # the anchor's way, one forward per shift (also the reference map)
        t_loop, reference = timed(lambda: model.shift_averaged_map(x), repeats=1, warmup=0)
        ref_corr = torch.corrcoef(torch.stack([naive.flatten(), reference.flatten()]))[0, 1].item()
        print(f"  shift-averaging, loop (anchor)     {t_loop * 1e3:10.1f} ms CPU  ratio {t_loop / t_dense:6.1f}x"
              f"   (batched = reference: corr {ref_corr:.6f})")
        t_base = min(t_base, t_loop)
    print(f"  => speed-up over the faster shift-averaging: {t_base / t_dense:.1f}x")
    print(f"  same map: corr {corr:.6f}, max |diff| {(dense - naive).abs().max().item():.1e}", flush=True)
    return t_base / t_dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the P=64 geometry")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images = make_synthetic(16, image_size=32, num_classes=4, seed=123)["images"] * 2 - 1  # [-1, 1]

    def pretrained(name: str, **fallback):
        try:
            return zoo.load(name), f"pretrained {name}"
        except FileNotFoundError:
            return zoo.create_model("patchnet", num_classes=4, **fallback).eval(), "untrained patchnet"

    # The zoo's geometries: the shipped checkpoints (32 px, P=8; 28 px, P=14).
    model, source = pretrained("patchnet-synthetic", image_size=32)
    run(model, images, source, repeats=5, loop=True)
    model, source = pretrained("patchnet-pneumoniamnist", image_size=28, patch_size=14)
    run(model, F.interpolate(images, size=28, mode="bilinear"), source, repeats=5, loop=True)
    # Larger patches (speed does not depend on the weights: untrained, eval mode).
    # Larger patches on 128 px images (larger images shrink the border the one-pass net also computes).
    big = zoo.create_model("patchnet", num_classes=4, image_size=128, patch_size=32).eval()
    run(big, F.interpolate(images[:1], size=128, mode="bilinear"), "untrained patchnet", repeats=1, loop=False)
    if not args.quick:  # the anchor's patch size: 4096 shifts
        anchor = zoo.create_model("patchnet", num_classes=4, image_size=128, patch_size=64).eval()
        run(anchor, F.interpolate(images[:1], size=128, mode="bilinear"), "untrained patchnet (anchor P)",
            repeats=1, loop=False)


if __name__ == "__main__":
    main()
