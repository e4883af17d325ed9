"""Time make_synthetic: 5000 images at 32 and 64 px on one CPU thread.

The target (kept out of the test suite, which has no timed tests) is <= 10 s
for 5000 images at 32 px. Run: python benchmarks/bench_synthetic.py
"""

from __future__ import annotations

import time

import torch

from zoo.data import make_synthetic


def main(n: int = 5000) -> None:
    torch.set_num_threads(1)
    make_synthetic(64, image_size=32)  # warm-up (allocator, kernels)
    for size in (32, 64):
        for mode, k in (("evidence", 4), ("interaction", 2)):
            start = time.perf_counter()
            make_synthetic(n, image_size=size, num_classes=k, mode=mode)
            print(f"{mode:12s} n={n} size={size:3d}: {time.perf_counter() - start:6.2f} s")


if __name__ == "__main__":
    main()
