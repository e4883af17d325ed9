"""The X-Node comparison table in one command (CPU, one thread: ~20 min for 3 seeds on a shared 2-core machine):

    ZOO_DATA_DIR=/path/to/medmnist python benchmarks/xnode_table.py [--seeds 3] [--datasets ...]

For each MedMNIST graph (pneumonia, breast, retina; conf/data/graph_<name>.yaml settings) it prints
test accuracy / AUROC of
  * the zoo's image CNN, the recipe's ``cnn`` fitted on every training image (the baseline at its
    best), and the cross-fitted encoders that made the node features (each fitted on 4/5 of them),
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
from zoo.training import build_datamodule, fit_image_encoder, prepare_graph  # noqa: E402

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


def image_cnn_row(dm: GraphDataModule) -> dict[str, float]:
    """Test accuracy / AUROC of the recipe's image CNN fitted on all training images (same budget)."""
    import torchmetrics

    r = dm.recipe
    with torch.random.fork_rng():
        cnn = fit_image_encoder(*dm.train_split(), dm.num_classes, r["encoder_widths"], r["encoder_epochs"],
                                r["encoder_lr"], r["encoder_batch_size"], r["seed"]).eval()
    images, labels = dm.images_of("test")
    with torch.no_grad():
        probs = torch.cat([cnn(images[i:i + 512]).softmax(1) for i in range(0, len(images), 512)])
    kw = dict(task="multiclass", num_classes=dm.num_classes)
    return {"acc": float(torchmetrics.functional.accuracy(probs, labels, **kw)),
            "auroc": float(torchmetrics.functional.auroc(probs, labels, **kw))}


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
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "xnode_table.md", help="markdown file written")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    lines = ["| data | model | test acc | test AUROC | decoder R² (test) | control R² (shuffled ctx) "
             "| probe R² (real ctx) | fid+ | fid− |", "|---|---|---|---|---|---|---|---|---|"]
    started = time.perf_counter()
    for name in args.datasets:
        dm = graph_datamodule(name)
        enc_epochs, folds = dm.recipe["encoder_epochs"], dm.recipe["folds"]
        for label, row in ((f"image CNN (zoo cnn, {enc_epochs} ep, all training images)", image_cnn_row(dm)),
                           (f"its {folds} cross-fitted encoders (node features)",
                            next(iter(dm.reference_rows().values())))):
            lines.append(f"| {name} | {label} | {row['acc']:.3f} | {row['auroc']:.3f} | | | | | |")
            print(lines[-1], flush=True)
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
    title = (f"X-Node comparison, test split, mean±std over {args.seeds} GNN seed(s), {args.epochs} epochs × "
             f"{dm.steps_per_epoch} full-batch steps per GNN, node cues cross-fitted over {dm.recipe['folds']} folds "
             f"({time.perf_counter() - started:.0f} s on {torch.get_num_threads()} CPU thread(s))")
    command = "ZOO_DATA_DIR=<medmnist dir> OMP_NUM_THREADS=1 python benchmarks/xnode_table.py " + " ".join(sys.argv[1:])
    text = f"# X-Node vs the same GNN vs the image CNN\n\n{title}.\n\nMade by `{command}`.\n\n" + "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
