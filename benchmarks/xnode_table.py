"""The X-Node comparison table in one command (CPU, one thread: ~20 min for 3 seeds on a shared 2-core machine):

    ZOO_DATA_DIR=/path/to/medmnist python benchmarks/xnode_table.py [--seeds 3] [--datasets ...]

For each MedMNIST graph (pneumonia, breast, retina; conf/data/graph_<name>.yaml settings) it prints
test accuracy / AUROC of
  * the zoo's image CNN (the graph's encoder: a zoo ``cnn`` trained on the train split only),
  * the same GNN without X-Node (``gnn``: GCN / GAT / GIN),
  * X-Node-GCN / GAT / GIN,
with the same full-batch budget for every GNN (trainer epochs × steps_per_epoch), mean ± std over
seeds; and for X-Node the decoder reconstruction R² on test nodes next to a control decoder fitted
on shuffled context vectors (and a probe fitted on the real ones), plus PyG fid+/fid− of the own
explanation. Graphs are cached under logs/graph_cache (built once, keyed by their inputs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402
from zoo.config import register_model_configs  # noqa: E402
from zoo.data import GraphDataModule  # noqa: E402
from zoo.metrics import graphs as GM  # noqa: E402
from zoo.training import build_datamodule, prepare_graph  # noqa: E402

DATASETS = ("pneumoniamnist", "breastmnist", "retinamnist")
BACKBONES = ("gcn", "gat", "gin")


def graph_datamodule(name: str) -> GraphDataModule:
    """The graph exactly as conf/data/graph_<name>.yaml builds it (its encoder fitted as train() does)."""
    cfg = compose([f"data=graph_{name}", f"paths.log_dir={ROOT / 'logs'}", "seed=0"])
    cfg.data.root = os.environ.get("ZOO_DATA_DIR")
    dm = build_datamodule(cfg)
    prepare_graph(dm)
    dm.setup()
    return dm


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_model_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def fit(dm: GraphDataModule, config: str, seed: int, epochs: int):
    """config: "gnn_<backbone>" or "xnode_<backbone>" — the registered model with that backbone."""
    L.seed_everything(seed, verbose=False)
    name, backbone = config.split("_")
    model = zoo.create_model(name, num_classes=dm.num_classes, in_channels=dm.in_channels,
                             image_size=dm.image_size, **dm.model_kwargs, backbone=backbone)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    res = trainer.test(model, datamodule=dm, verbose=False)[0]
    return model.eval(), {"acc": res["test/acc"], "auroc": res["test/auroc"]}


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f}±{statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12, help="trainer epochs (× steps_per_epoch full-batch steps)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    lines = ["| data | model | test acc | test AUROC | decoder R² (test) | control R² (shuffled ctx) "
             "| probe R² (real ctx) | fid+ | fid− |", "|---|---|---|---|---|---|---|---|---|"]
    started = time.perf_counter()
    for name in args.datasets:
        dm = graph_datamodule(name)
        enc = dm.reference_rows()["cnn encoder (image CNN, train split)"]
        enc_epochs = dm.recipe["encoder_epochs"]
        lines.append(f"| {name} | image CNN (zoo cnn, {enc_epochs} ep) | {enc['acc']:.3f} | {enc['auroc']:.3f} "
                     "| | | | | |")
        data, test, train = dm.graph, dm.graph.test_mask, dm.graph.train_mask
        for backbone in BACKBONES:
            for config in (f"gnn_{backbone}", f"xnode_{backbone}"):
                acc, auc, r2, ctrl, probe, fp, fm = [], [], [], [], [], [], []
                for seed in range(args.seeds):
                    model, res = fit(dm, config, seed, args.epochs)
                    acc.append(res["acc"])
                    auc.append(res["auroc"])
                    if config.startswith("xnode"):
                        r2.append(GM.decoder_r2(model, data, test))
                        c = GM.control_decoder_r2(model, data, train, test, seed=seed)
                        ctrl.append(c["shuffled"])
                        probe.append(c["real"])
                        fid = GM.pyg_fidelity(model, data, test.nonzero().squeeze(1)[:256])
                        fp.append(fid["fid_plus"])
                        fm.append(fid["fid_minus"])
                label = f"X-Node-{backbone.upper()}" if config.startswith("xnode") else f"{backbone.upper()} (no X-Node)"
                extra = [fmt(v) if v else "" for v in (r2, ctrl, probe, fp, fm)]
                lines.append(f"| {name} | {label} | {fmt(acc)} | {fmt(auc)} | " + " | ".join(extra) + " |")
                print(lines[-1], flush=True)
    print()
    print(f"X-Node comparison, test split, mean±std over {args.seeds} seed(s), {args.epochs} epochs × "
          f"{dm.steps_per_epoch} full-batch steps per GNN ({time.perf_counter() - started:.0f} s)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
