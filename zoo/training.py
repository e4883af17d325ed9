"""``train(cfg)``: the testable body behind the thin ``@hydra.main`` in train.py.

config → datamodule → model → Trainer.fit/test → explanation metrics (with the post-hoc baseline
measured in the same run) → ``zoo.save`` (safetensors + config + card) and figures in the run folder.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from omegaconf import DictConfig, OmegaConf

from zoo import evaluation, hub
from zoo.cli import build, report
from zoo.loggers import CSVLogger
from zoo.registry import create_model, model_class

log = logging.getLogger("zoo")


def build_datamodule(cfg: DictConfig):
    """The datamodule of ``cfg.data``; a graph model (``input_kind == "graph"``) given an image dataset
    gets the kNN image graph over it, so ``model=xnode_gcn data=pneumoniamnist`` works as typed."""
    datamodule = build(cfg.data)
    name = (cfg.get("model") or {}).get("name")
    if name is None or getattr(model_class(name), "input_kind", "image") != "graph":
        return datamodule
    from zoo.data import GraphDataModule

    if isinstance(datamodule, GraphDataModule):
        return datamodule
    # The image datamodule becomes the graph's node source; recipe defaults match conf/data/graph_*.yaml.
    graph_defaults = {"encoder_epochs": 8}
    cache = Path(cfg.paths.log_dir) / "graph_cache" if cfg.get("paths") else None
    log.info("model %s explains graph nodes: building the kNN image graph over %s", name, datamodule.name)
    image_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
                    if k not in ("_target_", "flag", "root", "seed", "download", "num_workers")}
    return GraphDataModule(flag=datamodule.name, images=datamodule, image_kwargs=image_kwargs,
                           cache_dir=str(cache) if cache else None,
                           seed=int(cfg.get("seed", 0)), **graph_defaults)


def build_model(cfg: DictConfig, datamodule):
    """The model sized for the data: geometry and task always come from the datamodule."""
    # `model_kwargs`: sizes only the data knows (e.g. a graph's node-feature and context sizes).
    return build(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.in_channels,
                 image_size=datamodule.image_size, task=datamodule.task, **getattr(datamodule, "model_kwargs", {}))


def build_trainer(cfg: DictConfig, run_dir: Path, with_callbacks: bool = True) -> L.Trainer:
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None] if with_callbacks else []
    loggers = [build(c) for c in (cfg.get("logger") or {}).values() if c is not None] if with_callbacks else False
    return build(cfg.trainer, callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir))


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
    import torch

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


def train_baseline(cfg: DictConfig, datamodule, run_dir: Path):
    """The zoo's black-box CNN trained with the same data and trainer budget, for side-by-side rows."""
    baseline = create_model("cnn", num_classes=datamodule.num_classes, in_channels=datamodule.in_channels,
                            image_size=datamodule.image_size, task=datamodule.task)
    trainer = build_trainer(cfg, run_dir / "baseline", with_callbacks=False)
    trainer.fit(baseline, datamodule=datamodule)
    return baseline, trainer.test(baseline, datamodule=datamodule, verbose=False)[0]


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
    model = build_model(cfg, datamodule)
    trainer = build_trainer(cfg, run_dir)
    ckpt_path = _resume_path(cfg, run_dir)
    if ckpt_path is not None:
        _continue_logs(trainer, ckpt_path)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    results = {f"{k}": float(v) for k, v in trainer.test(model, datamodule=datamodule, verbose=False)[0].items()}

    rows: dict[str, dict[str, float]] = {model.model_name: {"acc": results.get("test/acc", float("nan")),
                                                           "auroc": results.get("test/auroc", float("nan"))}}
    baseline = None
    ev = cfg.get("evaluate") or {}
    image_model = getattr(model, "input_kind", "image") == "image"
    if ev.get("compare_baseline", True) and model.explanation_kind != "post-hoc" and image_model:
        baseline, base_results = train_baseline(cfg, datamodule, run_dir)  # every DDP rank takes part
        rows["cnn (black-box baseline)"] = {"acc": base_results["test/acc"], "auroc": base_results["test/auroc"]}
    if not trainer.is_global_zero:  # DDP: one process measures, saves and prints
        return results
    if not image_model:  # graph data: the image CNN behind the graph, and the family's own graph metrics
        if ev.get("compare_baseline", True) and hasattr(datamodule, "reference_rows"):
            rows.update(datamodule.reference_rows())
        if ev.get("explanations", True) and hasattr(model, "report_rows"):
            rows.update(model.report_rows(datamodule))
    if ev.get("explanations", True) and model.task == "multiclass" and image_model:
        explanation_rows = evaluation.explanation_report(
            model, datamodule, n_images=ev.get("n_images", 256), steps=ev.get("steps", 24), baseline=baseline,
            posthoc=ev.get("posthoc", True))
        rows.update(explanation_rows)
        if hasattr(model, "image_report_rows"):  # optional family rows, e.g. GdVAE's counterfactual metrics
            rows.update(model.image_report_rows(datamodule, baseline=baseline))

    flat = {f"{name}/{metric}": value for name, row in rows.items() for metric, value in row.items()}
    flat["seconds"] = time.perf_counter() - started
    own = {"test_acc": results.get("test/acc"), "test_auroc": results.get("test/auroc")}
    for name, row in rows.items():
        if name.startswith(model.model_name + " ("):
            own.update({k: v for k, v in row.items()})
    saved = hub.save(model, run_dir / "model", metrics={k: v for k, v in own.items() if v is not None},
                     command=_command(), data=getattr(datamodule, "name", None))
    if hasattr(datamodule, "export"):  # data a model needs besides its weights (e.g. a graph recipe)
        datamodule.export(saved)
    if publish_to is not None:  # e.g. publish=cnn-synthetic → checkpoints/cnn-synthetic/
        published = hub.save(model, publish_to,
                             metrics={k: v for k, v in own.items() if v is not None},
                             command=_command(), data=getattr(datamodule, "name", None))
        if hasattr(datamodule, "export"):
            datamodule.export(published)
    (run_dir / "metrics.yaml").write_text(yaml.safe_dump(hub.plain(flat), sort_keys=False))
    table = evaluation.format_table(f"results on {getattr(datamodule, 'name', 'data')} (test split)", rows)
    report(table)
    report(f"model saved to {saved} · figures in {run_dir / 'figures'} · {flat['seconds']:.0f} s"
           + ("" if not ev.get("explanations", True) else
              " (quick runs: evaluate.explanations=false skips the metric pass, trainer=fast shortens training)"))
    return flat


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
