"""Measure a trained model: accuracy/AUROC and the explanation metrics, side by side with the
post-hoc baseline at its best (Grad-CAM at the last conv layer *and* at its best-scoring layer, and
Integrated Gradients).

Used by ``train(cfg)`` at the end of a run and by ``evaluate.py`` on a saved model.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torchmetrics
from torch import Tensor

from zoo import metrics as M
from zoo.report_html import table_columns, write_report
from zoo.nets.backbones import conv_layer_names
from zoo.nets.posthoc import gradcam, gradcam_layers, integrated_gradients


def take_images(datamodule, split: str = "test", n: int = 256, balanced: bool = False) -> dict[str, Tensor]:
    """The first `n` samples of a split as one batch dict (fixed, so every model sees the same).

    ``balanced`` (single-label data): the first ⌈n/K⌉ samples of every class instead, topped up in
    split order where a class has fewer. Why: a deletion curve ends on the all-grey image, which a
    model assigns to *one* class, so its tail scores the share of that class in the sample; with
    class counts equal that share is 1/K for every model, whichever class it calls grey (with the
    first 256 synthetic test images, 72 of class 0 and 57 of class 1, the tail alone moved two
    models' deletion AUCs 0.06 apart)."""
    loaders = {"train": lambda: datamodule.train_dataloader(), "val": lambda: datamodule.val_dataloader(),
               "test": lambda: datamodule.test_dataloader()}
    if split not in loaders:
        raise ValueError(f"split must be train, val or test, got {split!r}")
    datamodule.setup("test" if split == "test" else "fit")
    loader = loaders[split]()
    parts: dict[str, list[Tensor]] = {}
    count, wanted = 0, n * (20 if balanced else 1)  # balanced: read ahead for the rarer classes
    for batch in loader:
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
        count += batch["image"].shape[0]
        if count >= wanted:
            break
    data = {k: torch.cat(v) for k, v in parts.items()}
    labels = data["label"]
    if not balanced or labels.ndim != 1:
        return {k: v[:n] for k, v in data.items()}
    classes = int(labels.max()) + 1
    quota = -(-n // classes)
    rank = torch.zeros_like(labels)  # rank[i] = how many earlier samples share i's class
    for c in range(classes):
        where = labels == c
        rank[where] = torch.arange(int(where.sum()))
    chosen = (rank < quota).nonzero().flatten()
    rest = (rank >= quota).nonzero().flatten()
    keep = torch.cat([chosen, rest])[:n].sort().values
    return {k: v[keep] for k, v in data.items()}


@torch.no_grad()
def classification_metrics(model, datamodule, split: str = "test") -> dict[str, float]:
    """Accuracy and AUROC over a whole split (for evaluating a saved model outside a Trainer)."""
    datamodule.setup("test" if split == "test" else "fit")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    collection = model._make_metrics().to(model.device)
    for batch in loader:
        logits = model(batch["image"].to(model.device))
        labels = batch["label"].to(model.device)
        collection.update(model.probabilities(logits), labels.long() if model.task == "multilabel" else labels)
    return {k: float(v) for k, v in collection.compute().items()}


def _explain_fn(model, **kwargs) -> Callable[[Tensor, Tensor], Tensor]:
    def fn(x: Tensor, target: Tensor) -> Tensor:
        return model.explain(x, target, **kwargs).attribution

    return fn


def attribution_metrics(model, explain_fn, batch: dict[str, Tensor], steps: int = 24, chunk: int = 64,
                        seed: int = 0) -> dict[str, float]:
    """Explanation metrics for the ground-truth class, computed in chunks to bound memory. Deletion and
    insertion are reported per substrate (grey, blur, noise; ``deletion_auc[grey]``, ...); the headline
    ``deletion_auc`` / ``insertion_auc`` is the worst substrate's mean over the whole batch
    (:func:`zoo.metrics.worst_substrate`), so a family trained on grey patches cannot win by grey."""
    device = model.device
    target = batch["label"] if batch["label"].ndim == 1 else None  # multi-label: explain the prediction
    rows: list[dict[str, float]] = []
    weights: list[int] = []
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, batch["image"].shape[0], chunk):
        sl = slice(start, start + chunk)
        images = batch["image"][sl].to(device)
        rows.append(M.explanation_metrics(
            model, explain_fn, images,
            target=None if target is None else target[sl].to(device),
            masks=batch["mask"][sl].to(device) if "mask" in batch else None,
            steps=steps, generator=generator,
            activation="sigmoid" if model.task == "multilabel" else "softmax"))
        weights.append(images.shape[0])
    total = sum(weights)
    # hit_rate is a nanmean over images with non-empty masks; weighting chunks by size is close enough
    # for reporting and exact when every mask is non-empty (synthetic evidence mode).
    keys = rows[0].keys()
    return M.worst_substrate({k: sum(r[k] * w for r, w in zip(rows, weights)) / total for k in keys})


def posthoc_rows(model, batch: dict[str, Tensor], steps: int = 24, layers: list[str] | None = None,
                 integrated: bool = True, select: dict[str, Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Grad-CAM at the last conv layer and at the best layer, plus Integrated Gradients — the baseline
    at its best, never only a weak setting. The best layer is chosen on ``select`` (validation images:
    hit rate, or a short deletion curve when they have no masks) and then measured on ``batch``, so the
    reported row never picked its layer on the images it reports (no ``select``: no best-layer row)."""
    layers = layers or conv_layer_names(model)
    rows: dict[str, dict[str, float]] = {}
    last = layers[-1]
    rows[f"grad-cam[{last}]"] = attribution_metrics(model, lambda x, t: gradcam(model, x, t, last), batch, steps)
    if select is not None:
        best = best_gradcam_layer(model, select, layers)
        rows[f"grad-cam best[{best}]"] = rows[f"grad-cam[{last}]"] if best == last else attribution_metrics(
            model, lambda x, t: gradcam(model, x, t, best), batch, steps)
    if integrated:
        rows["integrated-gradients"] = attribution_metrics(
            model, lambda x, t: integrated_gradients(model, x, t), batch, steps)
    return rows


def best_gradcam_layer(model, select: dict[str, Tensor], layers: list[str]) -> str:
    """The conv layer whose Grad-CAM scores best on ``select``: hit rate with masks, else the lowest
    8-step deletion AUC (worst substrate) on 64 images. One forward + backward per 64 images gives every
    layer's map at once (:func:`gradcam_layers`, the same maps as Captum's). The last layer wins ties."""
    device = model.device
    if "mask" in select:
        maps: dict[str, list[Tensor]] = {layer: [] for layer in layers}
        for i in range(0, select["image"].shape[0], 64):
            chunk = gradcam_layers(model, select["image"][i:i + 64].to(device),
                                   select["label"][i:i + 64].to(device), layers)
            for layer in layers:
                maps[layer].append(chunk[layer].cpu())
        scores = {layer: M.hit_rate(torch.cat(maps[layer]), select["mask"]) for layer in layers}
    else:
        images, labels = select["image"][:64].to(device), select["label"][:64].to(device)
        chunk = gradcam_layers(model, images, labels, layers)
        activation = "sigmoid" if model.task == "multilabel" else "softmax"
        scores = {}
        for layer in layers:
            fa = M.faithfulness(model, images, chunk[layer], labels, steps=8, activation=activation)
            scores[layer] = -max(float(fa[f"deletion[{s}]"].mean()) for s in M.SUBSTRATES)
    return max(layers, key=lambda l: (scores[l], l == layers[-1]))


@contextmanager
def channels_last(*models):
    """Models' 4-D weights in channels_last for the duration (restored after). Why: the metric pass
    is ~150 forwards per image; oneDNN's CPU convolutions run ~1.6x faster with channels_last weights
    (the inputs follow the weights; a 1-channel input is the same in both layouts). Values agree up
    to float rounding."""
    models = [m for m in models if m is not None]
    for m in models:
        m.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in models:
            m.to(memory_format=torch.contiguous_format)


def explanation_report(model, datamodule, n_images: int = 256, steps: int = 24,
                       baseline=None, posthoc: bool = True) -> dict[str, dict[str, float]]:
    """Rows of metrics: the model's own explanation, plus post-hoc rows for `baseline` (or for the
    model itself when it is a black box)."""
    with channels_last(model, baseline):
        return _explanation_report(model, datamodule, n_images, steps, baseline, posthoc)


def _explanation_report(model, datamodule, n_images, steps, baseline, posthoc) -> dict[str, dict[str, float]]:
    model.eval()
    batch = report_images(datamodule, "test", n_images)
    rows: dict[str, dict[str, float]] = {}
    if model.explanation_kind != "post-hoc":
        name = f"{model.model_name} ({model.explanation_kind})"
        rows[name] = attribution_metrics(model, _explain_fn(model), batch, steps)
        # A family may list other maps of its own explanation (label -> explain kwargs; declared on the
        # base, {} by default), e.g. MedicalPatchNet's dense map; each gets its own row (not in the card).
        for label, kwargs in model.explanation_variants.items():
            rows[f"{model.model_name}[{label}] ({model.explanation_kind})"] = attribution_metrics(
                model, _explain_fn(model, **kwargs), batch, steps)
    reference = baseline if baseline is not None else (model if model.explanation_kind == "post-hoc" else None)
    if posthoc and reference is not None:
        reference.eval()
        select = report_images(datamodule, "val", n_images)  # the layer is chosen on val
        for k, v in posthoc_rows(reference, batch, steps, select=select).items():
            rows[f"{reference.model_name} {k}"] = v
    return rows


def report_images(datamodule, split: str, n_images: int = 256) -> dict[str, Tensor]:
    """The balanced images of a run's table: on "test" every explanation row is measured, on "val" a
    post-hoc layer is chosen."""
    return take_images(datamodule, split, n_images, balanced=True)


def same_network_gradcam_rows(network, batch: dict[str, Tensor], select: dict[str, Tensor],
                              steps: int = 24, prefix: str | None = None) -> dict[str, dict[str, float]]:
    """Grad-CAM (last layer, and the best layer chosen on ``select``) on a family's own network, measured
    on ``batch`` — the family's own map's test images (:func:`report_images`), so the two rows differ only
    in the explanation. No Integrated Gradients: the comparison is with best-layer Grad-CAM, and IG
    doubles the time. Rows ``<prefix> grad-cam[...]`` (prefix: the network's model_name)."""
    network.eval()
    prefix = network.model_name if prefix is None else prefix
    return {f"{prefix} {name}": row
            for name, row in posthoc_rows(network, batch, steps, integrated=False, select=select).items()}


def format_table(title: str, rows: dict[str, dict[str, float]]) -> str:
    """A plain-text table (rich renders it in the terminal; this string goes to logs and cards)."""
    columns = table_columns(rows)
    width = max([len(n) for n in rows] + [10])
    widths = [max(14, len(c)) for c in columns]  # e.g. deletion_auc[noise] is wider than a number
    lines = [title, f"{'':{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    for name, row in rows.items():
        lines.append(f"{name:{width}}  " + "  ".join(
            f"{row[c]:>{w}.4f}" if c in row else f"{'-':>{w}}" for c, w in zip(columns, widths)))
    return "\n".join(lines)


def evaluate(cfg) -> dict[str, dict[str, float]]:
    """Body of evaluate.py: load a model (and optional baseline), print and return the table."""
    import lightning as L

    from zoo import hub
    from zoo.cli import build, report

    L.seed_everything(cfg.seed, verbose=False)
    datamodule = build(cfg.data)
    model = hub.load(cfg.model_path)
    baseline = hub.load(cfg.baseline) if cfg.get("baseline") else None
    rows = {model.model_name: classification_metrics(model, datamodule)}
    if baseline is not None:
        rows[f"{baseline.model_name} (baseline)"] = classification_metrics(baseline, datamodule)
    if model.task == "multiclass" and cfg.get("explanations", True):
        rows.update(explanation_report(model, datamodule, cfg.n_images, cfg.steps, baseline=baseline))
    table = format_table(f"{cfg.model_path} on {datamodule.name} (test split)", rows)
    out = Path(cfg.paths.output_dir)
    written = write_results(rows, out, source=str(cfg.model_path), data=datamodule.name)
    page = _html_report(model, datamodule, rows, out, f"{cfg.model_path} on {datamodule.name}", cfg.model_path)
    report(f"{table}\nresults written to {written[0]} and {written[1].name}; report {page}"
           + ("" if not cfg.get("explanations", True) else " (explanations=false: accuracy/AUROC only, fast)"))
    return rows


def _html_report(model, datamodule, rows, out: Path, title: str, source) -> Path:
    """``<out>/report/index.html`` as a training run writes it: the table, the model's explanation figure
    of the first 8 test images (image models) and the saved model's card when it has one."""
    import matplotlib.pyplot as plt

    from zoo import hub
    from zoo.callbacks import explanation_figure
    from zoo.viz import save_figure

    figures = []
    if model.input_kind == "image":
        fig = explanation_figure(model, take_images(datamodule, "test", 8), model.class_names or datamodule.class_names)
        figures.append(save_figure(fig, out / "figures" / "test.png"))
        plt.close(fig)
    try:
        card_file = hub._resolve(source) / hub.CARD
    except FileNotFoundError:
        card_file = None
    card = card_file.read_text() if card_file is not None and card_file.is_file() else None
    return write_report(out, rows, title, figures=figures, card=card)


def write_results(rows: dict[str, dict[str, float]], folder: Path, **about: str | None) -> tuple[Path, Path]:
    """The table as results.yaml (rows of metrics, plus what was measured) and results.csv (one row a
    model/method, one column a metric)."""
    import csv

    import yaml

    from zoo import hub

    folder.mkdir(parents=True, exist_ok=True)
    yaml_path, csv_path = folder / "results.yaml", folder / "results.csv"
    yaml_path.write_text(yaml.safe_dump(hub.plain({**about, "rows": rows}), sort_keys=False))
    columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", *columns])
        writer.writerows([name, *(row.get(c, "") for c in columns)] for name, row in rows.items())
    return yaml_path, csv_path
