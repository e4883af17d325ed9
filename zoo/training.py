"""``train(cfg)``: the testable body behind the thin ``@hydra.main`` in train.py.

config → datamodule → model → Trainer.fit/test → explanation metrics (with the post-hoc baseline
measured in the same run) → ``zoo.save`` (safetensors + config + card) and figures in the run folder.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from zoo import evaluation, hub
from zoo.cli import build, report
from zoo.loggers import CSVLogger
from zoo.registry import create_model, model_class
from zoo.report_html import write_report

log = logging.getLogger("zoo")


def build_datamodule(cfg: DictConfig):
    """The datamodule of ``cfg.data``; a graph model (``input_kind == "graph"``) given an image dataset
    gets the kNN image graph over it, so ``model=xnode data=pneumoniamnist`` works as typed."""
    datamodule = build(cfg.data)
    name = (cfg.get("model") or {}).get("name")
    if name is None or model_class(name).input_kind != "graph" or datamodule.input_kind == "graph":
        return datamodule
    # The image datamodule becomes the graph's node source; recipe defaults match conf/data/graph_*.yaml.
    graph_defaults = {"encoder_epochs": 8}
    cache = Path(cfg.paths.log_dir) / "graph_cache" if cfg.get("paths") else None
    log.info("model %s explains graph nodes: building the kNN image graph over %s", name, datamodule.name)
    image_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
                    if k not in ("_target_", "flag", "root", "seed", "download", "num_workers")}
    # Built from its config target like every datamodule (training code never imports zoo.data).
    return build(OmegaConf.create({"_target_": "zoo.data.GraphDataModule"}), flag=datamodule.name,
                 images=datamodule, image_kwargs=image_kwargs, cache_dir=str(cache) if cache else None,
                 seed=int(cfg.get("seed", 0)), **graph_defaults)


class _Pairs(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


class _Reshuffled(Sampler[int]):
    """A fresh permutation every epoch from one seeded generator (the encoder's data order)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def fit_image_encoder(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      widths: Sequence[int] = (32, 64, 128), epochs: int = 5, lr: float = 3e-3,
                      batch_size: int = 128, seed: int = 0):
    """The zoo ``cnn`` fitted by a Lightning Trainer on (images (M,C,H,W) in [-1,1], labels (M,)) for a
    fixed number of epochs — no validation, no model selection (the graph's encoder sees the train
    split only). Initialised after ``torch.manual_seed(seed)``; cosine schedule, AdamW (the cnn's)."""
    torch.manual_seed(seed)
    encoder = create_model("cnn", num_classes=num_classes, in_channels=images.shape[1], image_size=images.shape[-1],
                           widths=list(widths), lr=lr)
    loader = DataLoader(_Pairs(images, labels), batch_size=batch_size, sampler=_Reshuffled(images.shape[0], seed))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(encoder, train_dataloaders=loader)
    return encoder.eval()


def prepare_graph(datamodule) -> None:
    """A graph datamodule whose graph is neither cached nor given an encoder gets its recipe's encoder
    (``encoder_*``), fitted here on its training nodes. The run's own random stream is left as it was
    (``fork_rng``), so a run's numbers do not depend on whether the graph was cached."""
    if datamodule.input_kind != "graph" or not datamodule.needs_encoder():
        return
    r = datamodule.recipe
    images, labels = datamodule.train_split()
    subsets = datamodule.encoder_subsets()  # per cross-fitting fold: the training nodes outside it
    log.info("fitting the graph's %d image encoder(s) (zoo cnn, %d epochs on %d training images)",
             len(subsets), r["encoder_epochs"], images.shape[0])
    started = time.perf_counter()
    with torch.random.fork_rng():  # same seed for every fit: one initialisation, so one feature basis
        encoders = [fit_image_encoder(images[m], labels[m], datamodule.num_classes, r["encoder_widths"],
                                      r["encoder_epochs"], r["encoder_lr"], r["encoder_batch_size"], r["seed"])
                    for m in subsets]
    datamodule.attach_encoder(encoders, seconds=time.perf_counter() - started)


def build_model(cfg: DictConfig, datamodule):
    """The model sized for the data: geometry and task always come from the datamodule."""
    # `model_kwargs`: sizes only the data knows (e.g. a graph's node-feature and context sizes).
    return build(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.in_channels,
                 image_size=datamodule.image_size, task=datamodule.task, class_names=list(datamodule.class_names),
                 **datamodule.model_kwargs)


DEFAULT_EPOCHS = 6  # a model without a schedule: the zoo's 28–64 px nets converge in ~6 epochs on CPU


def max_epochs(cfg: DictConfig, model) -> int:
    """``trainer.max_epochs``, or when it is null (the default) :data:`DEFAULT_EPOCHS`, extended to the
    model's schedule where that is longer (ProtoPNet's 2 + 4 + 2 epochs: a fixed 6 stopped it after the
    push and before its last-layer phase, test accuracy 0.55). Not shorter: an open-ended last phase
    (GdVAE's consistency) counts 0 in the schedule's length."""
    set_epochs = cfg.trainer.get("max_epochs")
    if set_epochs is not None:
        return int(set_epochs)
    schedule = getattr(model, "training_schedule", None)
    return max(DEFAULT_EPOCHS, schedule.total_epochs if schedule is not None else 0)


def build_trainer(cfg: DictConfig, run_dir: Path, with_callbacks: bool = True,
                  epochs: int | None = None) -> L.Trainer:
    """The configured Trainer; ``epochs`` (e.g. :func:`max_epochs` for the model) overrides
    ``trainer.max_epochs``, None keeps it (null → :data:`DEFAULT_EPOCHS`)."""
    epochs = max_epochs(cfg, None) if epochs is None else epochs
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None] if with_callbacks else []
    loggers = [build(c) for c in (cfg.get("logger") or {}).values() if c is not None] if with_callbacks else False
    return build(cfg.trainer, callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir), max_epochs=epochs)


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """``resume=true`` continues from <run>/checkpoints/last.ckpt (an error if missing), ``resume=auto``
    too when it exists, a path resumes from that checkpoint."""
    resume = cfg.get("resume")
    if not resume:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if resume in (True, "auto") else Path(resume)
    if resume == "auto" and not path.is_file():  # e.g. a preemptible job's first start
        return None
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint not found: {path} (resume=true continues the run in "
                                f"hydra.run.dir; resume=auto starts fresh when there is none)")
    return str(path)


def _continue_logs(trainer: L.Trainer, ckpt_path: str) -> None:
    """A resumed run continues the CSV history: keep the rows of the epochs the checkpoint holds."""
    epoch = int(torch.load(ckpt_path, map_location="cpu", weights_only=True)["epoch"])
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.resume_at(epoch + 1)


def _command() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return " ".join(["python train.py", *HydraConfig.get().overrides.task])
    except (ValueError, ImportError):
        return "python " + " ".join(sys.argv)


def train_baseline(cfg: DictConfig, datamodule, run_dir: Path, epochs: int | None = None):
    """The zoo's black-box CNN trained with the same data and trainer budget (``epochs``: the family's),
    for side-by-side rows."""
    baseline = create_model("cnn", num_classes=datamodule.num_classes, in_channels=datamodule.in_channels,
                            image_size=datamodule.image_size, task=datamodule.task)
    trainer = build_trainer(cfg, run_dir / "baseline", with_callbacks=False, epochs=epochs)
    trainer.fit(baseline, datamodule=datamodule)
    return baseline, trainer.test(baseline, datamodule=datamodule, verbose=False)[0]


def saved_baseline(name_or_path: str, datamodule):
    """``evaluate.baseline``: a saved black-box model (folder or pretrained name) as the run's baseline
    instead of training one, e.g. the leaderboard's ``cnn`` job of the same data and seed — the
    independent judge of GdVAE's counterfactuals. It must fit the data (classes, channels, size)."""
    baseline = hub.load(name_or_path)
    wanted = (datamodule.num_classes, datamodule.in_channels, datamodule.image_size)
    have = (baseline.num_classes, baseline.in_channels, baseline.image_size)
    if have != wanted:
        raise ValueError(f"evaluate.baseline={name_or_path}: made for {have[0]} classes, {have[1]} channel(s), "
                         f"{have[2]} px; the data has {wanted[0]}, {wanted[1]}, {wanted[2]} px")
    return baseline


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, test, measure and save one model. Returns the flat metrics dict (also in metrics.yaml)."""
    started = time.perf_counter()
    _route_lightning_logs()
    publish_to = _publish_target(cfg)  # before training: a refused publish must not cost a run
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    datamodule = build_datamodule(cfg)
    prepare_graph(datamodule)
    model = build_model(cfg, datamodule)
    epochs = max_epochs(cfg, model)
    trainer = build_trainer(cfg, run_dir, epochs=epochs)
    ckpt_path = _resume_path(cfg, run_dir)
    if ckpt_path is not None:
        _continue_logs(trainer, ckpt_path)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    results = {f"{k}": float(v) for k, v in trainer.test(model, datamodule=datamodule, verbose=False)[0].items()}

    rows: dict[str, dict[str, float]] = {model.model_name: {"acc": results.get("test/acc", float("nan")),
                                                           "auroc": results.get("test/auroc", float("nan"))}}
    baseline = None
    ev = cfg.get("evaluate") or {}
    image_model = model.input_kind == "image"
    if ev.get("baseline") and model.explanation_kind != "post-hoc" and image_model:
        baseline = saved_baseline(ev["baseline"], datamodule)  # trained elsewhere on the same data
        rows["cnn (black-box baseline)"] = evaluation.classification_metrics(baseline, datamodule)
    elif ev.get("compare_baseline", True) and model.explanation_kind != "post-hoc" and image_model:
        baseline, base_results = train_baseline(cfg, datamodule, run_dir, epochs)  # every DDP rank takes part
        rows["cnn (black-box baseline)"] = {"acc": base_results["test/acc"], "auroc": base_results["test/auroc"]}
    if not trainer.is_global_zero:  # DDP: one process measures, saves and prints
        return results
    if not image_model:  # graph data: the image CNN behind the graph, and the family's own graph metrics
        if ev.get("compare_baseline", True):
            rows.update(datamodule.reference_rows())
        if ev.get("explanations", True):
            rows.update(model.report_rows(datamodule))
    if ev.get("explanations", True) and model.task == "multiclass" and image_model:
        explanation_rows = evaluation.explanation_report(
            model, datamodule, n_images=ev.get("n_images", 256), steps=ev.get("steps", 24), baseline=baseline,
            posthoc=ev.get("posthoc", True))
        rows.update(explanation_rows)
        rows.update(model.image_report_rows(datamodule, baseline=baseline))  # the family's own rows, if any

    flat = {f"{name}/{metric}": value for name, row in rows.items() for metric, value in row.items()}
    flat["seconds"] = time.perf_counter() - started
    card = model.card_metrics(results, rows)  # what the model card records: an explicit return value
    saved = hub.save(model, run_dir / "model", metrics=card, command=_command(), data=datamodule.name)
    datamodule.export(saved)  # data a model needs besides its weights (e.g. a graph recipe)
    if publish_to is not None:  # e.g. publish=cnn-synthetic → checkpoints/cnn-synthetic/
        published = hub.save(model, publish_to, metrics=card, command=_command(), data=datamodule.name)
        datamodule.export(published)
    (run_dir / "metrics.yaml").write_text(yaml.safe_dump(hub.plain(flat), sort_keys=False))
    log_rows(trainer, rows)
    table = evaluation.format_table(f"results on {datamodule.name} (test split)", rows)
    report(table)
    write_report(run_dir, rows, f"{model.model_name} on {datamodule.name}")
    report(f"model saved to {saved} · figures in {run_dir / 'figures'} · {flat['seconds']:.0f} s"
           + ("" if not ev.get("explanations", True) else
              " (quick runs: evaluate.explanations=false skips the metric pass, trainer=fast shortens training)"))
    return flat


def log_rows(trainer: L.Trainer, rows: dict[str, dict[str, float]]) -> None:
    """The table's numbers to every configured logger as ``<row>/<metric>`` (test split), at the last
    step. Row names like "cnn Grad-CAM (best layer)" become TensorBoard-safe tags (no spaces/brackets)."""
    def tag(text: str) -> str:
        return "/".join(part.strip("_") for part in re.sub(r"[^A-Za-z0-9_./-]+", "_", text).split("/"))

    metrics = {tag(f"{name}/{metric}"): float(value) for name, row in rows.items() for metric, value in row.items()}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()


def _route_lightning_logs() -> None:
    """Lightning gives its loggers a console handler of their own and stops them propagating when it is
    imported before logging is configured (always, under Hydra), so its messages never reached train.log.
    Once the root logger has handlers (Hydra's console + train.log), hand Lightning's messages to them."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def _publish_target(cfg: DictConfig) -> Path | None:
    """``publish=<name>`` saves to checkpoints/<name>/; an existing folder is replaced only with
    ``publish_overwrite=true`` (every shipped version stays in git history, but not in the tree)."""
    if not cfg.get("publish"):
        return None
    target = hub.pretrained_root() / str(cfg.publish)
    if target.exists() and any(target.iterdir()) and not cfg.get("publish_overwrite", False):
        raise ValueError(f"publish: {target} already exists; pass publish_overwrite=true to replace it, "
                         f"or publish under another name")
    return target


def config_to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
