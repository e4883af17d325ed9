"""Push cost vs one plain feature pass over the same training set (floor 1×, target ≤ 1.05×).

Push needs one feature pass anyway; everything beyond it (distances to all prototypes, the running
arg-min, provenance, boxes) is the overhead measured here. Two scales:

* CUB-like: 224 px RGB, 200 classes × 10 = 2000 prototypes, timm resnet18 (random weights, 7×7×512
  → add-on 128), a modest random tensor set (default 200 images, one per class) so it runs in minutes on CPU;
* zoo default: synthetic 32 px, zoo CNN, 4 classes × 10 prototypes, the 4000 training images.

Each is timed `--repeats` times alternating the two passes; the minimum of each is reported. The
ratio uses process CPU time (one thread: OMP_NUM_THREADS=1), which a machine shared with other
jobs disturbs far less than wall time; wall times are printed beside it.

On a busy shared machine even the minimum of separate passes moves by ±20 %, so a second ratio is
measured inside each push: the feature calls are timed batch by batch (interleaved with the search,
so both see the same load) and the search overhead is push − its own feature calls; the printed
``same-pass`` ratio is (plain pass + overhead) ÷ plain pass with the plain pass = the push's feature
calls + the loader time of a separate loader-only pass (the part shared by both, a few %).

    OMP_NUM_THREADS=1 python benchmarks/bench_push.py [--cub-images 256] [--repeats 3] [--scales cub default]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch.utils.data import DataLoader

import zoo
from zoo.data import SyntheticDataModule


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


@torch.no_grad()
def feature_pass(model, dataset, batch_size: int) -> tuple[float, float]:
    start = _clock()
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        model.features(batch["image"])
    return _since(start)


def loader_pass(dataset, batch_size: int) -> tuple[float, float]:
    start = _clock()
    for _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        pass
    return _since(start)


def push_time(model, dataset, batch_size: int) -> tuple[tuple[float, float], float]:
    """(wall, CPU) of one push and the CPU time of its own feature calls."""
    inner = [0.0]
    features = model.features

    def timed(x):
        t = time.process_time()
        out = features(x)
        inner[0] += time.process_time() - t
        return out

    model.features = timed  # instance attribute: push_prototypes calls model.features
    try:
        start = _clock()
        model.push(dataset, batch_size=batch_size)
        total = _since(start)
    finally:
        del model.features
    return total, inner[0]


def measure(name: str, model, dataset, batch_size: int, repeats: int) -> None:
    model.eval()
    feat, push, overhead, loader = [], [], [], []
    feature_pass(model, dataset[:batch_size] if isinstance(dataset, list) else dataset, batch_size)  # warm-up
    for _ in range(repeats):
        feat.append(feature_pass(model, dataset, batch_size))
        total, inner = push_time(model, dataset, batch_size)
        push.append(total)
        overhead.append(total[1] - inner)
        loader.append(loader_pass(dataset, batch_size)[1])
    fw, fc = min(f[0] for f in feat), min(f[1] for f in feat)
    pw, pc = min(p[0] for p in push), min(p[1] for p in push)
    # same-pass, per repeat: o = push − its feature calls holds the loader (L) and the search, so
    # plain pass = (push − o) + L, search = o − L; the median over repeats is printed.
    mid = len(push) // 2
    plain = sorted(p[1] - o + L for p, o, L in zip(push, overhead, loader))[mid]
    search = sorted(o - L for o, L in zip(overhead, loader))[mid]
    same_ratio = sorted(p[1] / (p[1] - o + L) for p, o, L in zip(push, overhead, loader))[mid]
    print(f"{name:38s} images={len(dataset):5d} prototypes={model.num_prototypes:5d}\n"
          f"    separate passes, CPU: feature pass {fc:6.2f} s, push {pc:6.2f} s, ratio {pc / fc:5.3f}×  "
          f"(wall {fw:.2f} s / {pw:.2f} s = {pw / fw:.3f}×)\n"
          f"    same pass, CPU: plain pass {plain:6.2f} s (loader {min(loader):.2f} s), search overhead "
          f"{search:5.2f} s, ratio {same_ratio:5.3f}×", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cub-images", type=int, default=200)  # one per class
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--scales", nargs="+", choices=("cub", "default"), default=["cub", "default"])
    args = parser.parse_args()
    torch.manual_seed(0)
    logging.getLogger("zoo.prototypes").setLevel(logging.ERROR)  # duplicate reports are not what is timed

    if "cub" in args.scales:
        cub_scale(args)
    if "default" in args.scales:
        dm = SyntheticDataModule()
        model = zoo.create_model("protopnet", num_classes=4, in_channels=1, image_size=32)
        measure("zoo default 32 px, zoo_cnn, 40 protos", model, dm.dataset("train"), 256, args.repeats)


def cub_scale(args) -> None:
    cub = zoo.create_model("protopnet", num_classes=200, in_channels=3, image_size=224, backbone="resnet18",
                           prototype_dim=128, prototypes_per_class=10, keep_push_images=False)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.cub_images, 3, 224, 224, generator=g) * 2 - 1
    y = torch.arange(args.cub_images) % 200  # every class present while n ≥ 200
    cub_data = [{"image": x[i], "label": y[i], "index": torch.tensor(i)} for i in range(len(y))]
    measure("CUB-like 224 px, resnet18, 2000 protos", cub, cub_data, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
