"""Dense MedicalPatchNet map: one fully convolutional pass vs the anchor's shift-averaging.

The anchor averages P² shifted copies of the patch map (4096 at P=64). ``dense_map`` gets the same
map from one pass of the unpadded per-patch CNN over the image. Both are timed here on the same
images, in the same run, on one CPU thread, and the maps are compared (correlation, max difference).

Two naive references: the anchor's loop (one forward per shift) and the same shifts stacked into
one big batch (the best a shift-averaging implementation can do on batching alone).

Target (kept out of the test suite, which has no timed tests): ≥ 50× faster than shift-averaging at
correlation ≥ 0.95. Run: python benchmarks/bench_dense_map.py

What bounds the ratio: shift-averaging evaluates every P×P window exactly once too (P² shifts ×
(H/P)² patches ≈ H² windows); the one-pass map saves only the work windows share, i.e. the early
layers, where a window still has many positions (6×6 at P=8). With 8 px patches most of the per-patch
network's multiply-adds sit in its last layers, at 1–4 positions per window, so the saving is a few
times, not 50×; it grows with P (the anchor's P=64 spends most work on 64×64 early feature maps).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import zoo
from zoo.data import make_synthetic


def best_of(fn, repeats: int = 3) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def shift_average_batched(model, x: torch.Tensor) -> torch.Tensor:
    """All P² shifted grids in one batch (same definition as ``model.shift_averaged_map``)."""
    P, (H, W) = model.patch_size, x.shape[-2:]
    big = model._pad_windows(x, 2 * P)  # padded the way dense_map pads (cropping = padding less)
    span = -(-(H + P - 1) // P) * P  # one canvas size that fits the image at every offset
    crops = []
    for dy in range(P):
        for dx in range(P):
            top, left = 2 * P - dy, 2 * P - dx  # the image starts at (dy, dx) inside the crop
            crops.append(big[..., top:top + span, left:left + span])
    grids = model._grid_logits(torch.cat(crops))  # (P²·B,K,h,w), one forward
    up = grids.repeat_interleave(P, dim=2).repeat_interleave(P, dim=3)
    B = x.shape[0]
    total = 0.0
    for k, (dy, dx) in enumerate((dy, dx) for dy in range(P) for dx in range(P)):
        total = total + up[k * B:(k + 1) * B, :, dy:dy + H, dx:dx + W]
    return total / (P * P)


def run(model, x: torch.Tensor, label: str) -> None:
    P = model.patch_size
    t_dense, dense = best_of(lambda: model.dense_map(x))
    t_loop, naive = best_of(lambda: model.shift_averaged_map(x), repeats=1)
    t_batch, naive_b = best_of(lambda: shift_average_batched(model, x), repeats=1)
    corr = torch.corrcoef(torch.stack([dense.flatten(), naive.flatten()]))[0, 1].item()
    corr_b = torch.corrcoef(torch.stack([naive_b.flatten(), naive.flatten()]))[0, 1].item()
    print(f"{label}: {x.shape[0]} images {x.shape[-1]} px, P={P} ({P * P} shifts)")
    print(f"  dense (one conv pass)        {t_dense * 1e3:9.1f} ms")
    print(f"  shift-averaging, loop        {t_loop * 1e3:9.1f} ms   ratio {t_loop / t_dense:7.1f}x")
    print(f"  shift-averaging, one batch   {t_batch * 1e3:9.1f} ms   ratio {t_batch / t_dense:7.1f}x")
    print(f"  same map: corr {corr:.6f}, max |diff| {(dense - naive).abs().max().item():.2e} "
          f"(batched reference corr {corr_b:.6f})")


def main(n: int = 64) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        model = zoo.load("patchnet-synthetic")
        source = "pretrained patchnet-synthetic"
    except FileNotFoundError:
        model = zoo.create_model("patchnet", num_classes=4, image_size=32).eval()
        source = "untrained patchnet (no checkpoint found)"
    x = make_synthetic(n, image_size=32, num_classes=4, seed=123)["images"] * 2 - 1  # the datamodule's [-1,1]
    run(model, x, source)
    # A larger geometry (64 px, P=16: 256 shifts), untrained; 8 images keep the naive runs short.
    big = zoo.create_model("patchnet", num_classes=4, image_size=64, patch_size=16).eval()
    run(big, F.interpolate(x[:8], scale_factor=2, mode="bilinear"), "untrained patchnet")


if __name__ == "__main__":
    main()
