"""Prob-PSENN: OOD AUROC of every uncertainty signal of ``Explanation.uncertainty``, chosen on val, reported on test.

Trains a small ``prob_protopnet`` on the synthetic data (its default hyperparameters and 6-epoch
schedule; ``--n-train`` images, seeded), then scores each signal as a detector of
out-of-distribution inputs (AUROC, in-distribution = negatives, scores never flipped) on three OOD
sets: uniform noise in [-1, 1], smooth noise (bilinearly upsampled 4×4 grid) and PneumoniaMNIST
(resized to 32 px; needs ``$ZOO_DATA_DIR/pneumoniamnist.npz``, else that column is skipped).

Two disjoint passes, so the choice never sees the reported numbers:

* selection: in-distribution = the synthetic **val** split, noise drawn with ``--select-seed``,
  PneumoniaMNIST **val** images;
* report: the synthetic **test** split, noise drawn with ``--report-seed``, PneumoniaMNIST **test** images.

The chosen signal is the explanatory (per-prototype) one with the highest worst-case selection
AUROC over the three sets (mean over ``--seeds`` training seeds); the table prints every signal on
both passes, the chosen one marked ``*``.

    OMP_NUM_THREADS=1 ZOO_DATA_DIR=/path/to/medmnist python benchmarks/bench_prob_ood.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

import zoo
from zoo.data import SyntheticDataModule
from zoo.data.medmnist import MedMNISTDataModule, default_root
from zoo.models.prototypes.report import ood_sets, uncertainty_scores

PREDICTIVE = ("predictive_entropy", "mutual_information")  # not explanatory: excluded from the choice


def train_model(seed: int, n_train: int, n_val: int, n_test: int):
    L.seed_everything(seed, workers=True, verbose=False)
    dm = SyntheticDataModule(n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    model = zoo.create_model("prob_protopnet", num_classes=dm.num_classes, in_channels=dm.in_channels,
                             image_size=dm.image_size)
    trainer = L.Trainer(max_epochs=model.training_schedule.total_epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    acc = {split: trainer.validate(model, dataloaders=getattr(dm, f"{split}_dataloader")(), verbose=False)[0]
           for split in ("val", "test")}
    return model.eval(), dm, {split: r["val/acc"] for split, r in acc.items()}


def pneumonia(split: str, n: int, channels: int, size: int) -> dict[str, Tensor]:
    root = default_root()
    if not (root / "pneumoniamnist.npz").is_file():
        return {}
    ds = MedMNISTDataModule(flag="pneumoniamnist", root=str(root), image_size=28, as_rgb=channels == 3).dataset(split)
    images = torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))])
    return {"pneumoniamnist": F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)}


def aurocs(model, dm, split: str, noise_seed: int, n: int) -> dict[str, dict[str, float]]:
    """signal → OOD set → AUROC of in-distribution `split` images against that set."""
    ds = dm.dataset(split)
    ind, _ = uncertainty_scores(model, torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))]))
    sets = ood_sets(n, model.in_channels, model.image_size, seed=noise_seed)
    sets.update(pneumonia(split, n, model.in_channels, model.image_size))
    table: dict[str, dict[str, float]] = {k: {} for k in ind}
    for name, images in sets.items():
        ood, _ = uncertainty_scores(model, images)
        for k in ind:
            labels = torch.cat([torch.zeros(len(ind[k])), torch.ones(len(ood[k]))]).long()
            table[k][name] = float(torchmetrics.functional.auroc(torch.cat([ind[k], ood[k]]), labels, task="binary"))
    return table


def mean_tables(tables: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {k: {s: sum(t[k][s] for t in tables) / len(tables) for s in tables[0][k]} for k in tables[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (data and model)")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=512)
    ap.add_argument("--n", type=int, default=256, help="images per in-distribution and OOD set")
    ap.add_argument("--select-seed", type=int, default=1, help="noise seed of the selection pass")
    ap.add_argument("--report-seed", type=int, default=2, help="noise seed of the report pass")
    args = ap.parse_args()
    if args.select_seed == args.report_seed:
        raise SystemExit("error: --select-seed and --report-seed must differ (the choice must not see the report)")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    select, report, accs = [], [], []
    for seed in args.seeds:
        model, dm, acc = train_model(seed, args.n_train, args.n_val, args.n_test)
        accs.append(acc)
        select.append(aurocs(model, dm, "val", args.select_seed, args.n))
        report.append(aurocs(model, dm, "test", args.report_seed, args.n))
        print(f"seed {seed}: val acc {acc['val']:.3f}, test acc {acc['test']:.3f}, "
              f"mean σ {model.log_std.exp().mean():.4f}", flush=True)
    sel, rep = mean_tables(select), mean_tables(report)
    candidates = [k for k in sel if k not in PREDICTIVE]
    chosen = max(candidates, key=lambda k: min(sel[k].values()))
    sets = list(sel[chosen])
    print(f"\nprob_protopnet, synthetic n_train={args.n_train}, seeds {args.seeds} (mean), {args.n} images per set; "
          f"AUROC (OOD = positives). select: val split + noise seed {args.select_seed} + PneumoniaMNIST val; "
          f"report: test split + noise seed {args.report_seed} + PneumoniaMNIST test. * = chosen on select (max of "
          f"the worst set), per-prototype signals only.\n")
    head = " | ".join([f"select {s}" for s in sets] + [f"report {s}" for s in sets])
    print(f"| signal | {head} |\n|---|" + "---|" * (2 * len(sets)))
    for k in sel:
        cells = " | ".join(f"{sel[k][s]:.3f}" for s in sets) + " | " + " | ".join(f"{rep[k][s]:.3f}" for s in sets)
        print(f"| {k}{' *' if k == chosen else ''} | {cells} |")
    if len(args.seeds) > 1:
        print(f"\n{chosen} per seed (report): " + "; ".join(
            f"seed {s}: " + " / ".join(f"{t[chosen][n]:.3f}" for n in sets) for s, t in zip(args.seeds, report)))
    print(f"\nmean acc: val {sum(a['val'] for a in accs) / len(accs):.3f}, test "
          f"{sum(a['test'] for a in accs) / len(accs):.3f} · {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
