"""The Lightning base every zoo model inherits: input checks, shared steps, metrics, optimiser,
training schedule as data.

A family writes ``compute_logits(x)`` and ``explain(x, target)`` (and, if it has extra loss terms,
``loss(batch)``); everything else lives here once.
"""

from __future__ import annotations

import inspect
import random
from typing import Any, Mapping, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from zoo.explanation import Explanation
from zoo.metrics.targets import class_targets
from zoo.schedule import Phase, Schedule

TASKS = ("multiclass", "multilabel")
# Inputs live in [-1, 1]; perturbations around them (EvalProtoPNet's ±0.25 noise, path integrals) stay
# inside ±2, while a 0..255 image or an ImageNet-standardised one (up to ≈ 2.6) does not.
INPUT_LIMIT = 2.0


class SelfExplainingModule(L.LightningModule):
    """Base of every registered model.

    Contract:
      * ``forward(x) -> logits (B,K)``: a plain tensor, so Captum / Quantus / PyG tools work.
      * ``explain(x, target=None) -> Explanation``: the model's own explanation.
      * hyperparameters are plain values (saved by ``save_hyperparameters``) so that checkpoints load
        with ``torch.load(weights_only=True)`` and ``zoo.load`` rebuilds the model from config.yaml.
    """

    model_name: str = "?"  # set by @register_model
    # Hyperparameters the data decides (train.py passes them from the datamodule): no config default.
    data_hparams: tuple[str, ...] = ("num_classes", "in_channels", "image_size", "task", "class_names")
    phases: tuple[str, ...] = ()  # phase names the ``schedule`` hyperparameter may use (zoo.schedule)
    actions: tuple[str, ...] = ()  # one-off steps it may place between phases (e.g. "push")
    explanation_kind: str = "post-hoc"  # the Explanation.kind this family returns
    input_kind: str = "image"  # "image" (B,C,H,W) or "graph" (families that explain nodes)

    def __init__(
        self,
        num_classes: int = 4,
        in_channels: int = 1,
        image_size: int = 32,
        task: str = "multiclass",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: str = "adamw",
        scheduler: str = "cosine",  # "cosine" over trainer.max_epochs, or "none"
        schedule: Sequence[dict] | None = None,  # training phases as data (zoo.schedule.Schedule)
        class_names: list[str] | None = None,  # from the datamodule: kept in config.yaml for figures/cards
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be ≥ 2, got {num_classes}")
        # Collects the init arguments of the whole class chain (the family's too).
        self.save_hyperparameters()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.num_classes, self.in_channels, self.image_size, self.task = num_classes, in_channels, image_size, task
        self.class_names: list[str] | None = None if class_names is None else [str(c) for c in class_names]
        self.metrics = torch.nn.ModuleDict({split: self._make_metrics() for split in ("train_", "val_", "test_")})
        # Built (and validated) once: the hyperparameter does not change, and GdVAE asks every step.
        self._schedule = Schedule(schedule, self.phases, self.actions)
        self._resumed_rng: dict[str, Any] | None = None

    @classmethod
    def init_parameters(cls) -> dict[str, inspect.Parameter]:
        """The named parameters of the ``__init__`` chain, the subclass's entry winning."""
        params: dict[str, inspect.Parameter] = {}
        for klass in cls.__mro__:
            if not issubclass(klass, SelfExplainingModule):
                break
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for param in inspect.signature(init).parameters.values():
                if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and param.name != "self":
                    params.setdefault(param.name, param)
        return params

    @classmethod
    def default_hparams(cls) -> dict[str, Any]:
        """Every hyperparameter default of the ``__init__`` chain, less the ``data_hparams``: what
        ``create_model(name)`` uses, read from the signatures alone."""
        return {name: p.default for name, p in cls.init_parameters().items()
                if p.default is not inspect.Parameter.empty and name not in cls.data_hparams}

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        """One clear ValueError for an unknown hyperparameter or a value of the wrong kind (a config typo
        such as ``model.lr=abc``), instead of a TypeError deep inside the optimiser. Kinds come from the
        signature's annotations (``float`` accepts ints; unknown annotations are not checked)."""
        params = cls.init_parameters()
        for name, value in hparams.items():
            if name not in params:
                raise ValueError(f"{cls.model_name}: unknown hyperparameter {name!r}; it takes "
                                 f"{', '.join(sorted(params))}")
            kinds = _annotation_kinds(params[name].annotation)
            if kinds is not None and not (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)):
                raise ValueError(f"{cls.model_name}: hyperparameter {name} must be {params[name].annotation}, "
                                 f"got {value!r} ({type(value).__name__})")

    # ------------------------------------------------------------------ contract
    def compute_logits(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,K)
        raise NotImplementedError

    def explain(self, x: Tensor, target: Tensor | int | None = None) -> Explanation:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        self.validate_input(x)
        return self.compute_logits(x)

    def example_input(self, batch_size: int = 2) -> Tensor:
        """A valid random input (used by the contract test; graph families override)."""
        return torch.randn(batch_size, self.in_channels, self.image_size, self.image_size, device=self.device).clamp(-1, 1)

    # ------------------------------------------------------------------ input checks
    def validate_input(self, x: Tensor) -> None:
        """One clear error naming the problem, instead of a shape error deep inside a conv."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.model_name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{self.model_name}: expected images (B,C,H,W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.model_name}: expected {self.in_channels} input channel(s), got {x.shape[1]} "
                f"(shape {tuple(x.shape)})"
            )
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.model_name}: expected {self.image_size}×{self.image_size} images, "
                f"got {x.shape[-2]}×{x.shape[-1]}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{self.model_name}: empty batch (shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise ValueError(f"{self.model_name}: expected float images normalised to [-1, 1], got dtype {x.dtype} "
                             "(uint8 images: zoo.data.normalize(x / 255))")
        if x.dtype != self.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"{self.model_name}: expected {self.dtype} images (the model's dtype), got {x.dtype}; "
                             "use x.to(model.dtype)")
        lo, hi = torch.aminmax(x.detach())  # one pass; NaN and ±inf propagate into lo/hi
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError(f"{self.model_name}: input contains NaN or infinite values")
        if lo < -INPUT_LIMIT or hi > INPUT_LIMIT:
            raise ValueError(f"{self.model_name}: expected images normalised to [-1, 1] (zoo.data.normalize), got "
                             f"values in [{float(lo):.4g}, {float(hi):.4g}] — scaled 0..255 or ImageNet-standardised?")

    def validate_labels(self, y: Tensor) -> None:
        if self.task == "multiclass" and y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"{self.model_name}: label out of range: got labels in [{int(y.min())}, {int(y.max())}], "
                f"expected 0..{self.num_classes - 1}"
            )

    def resolve_target(self, logits: Tensor, target: Tensor | int | None) -> Tensor:
        """Explained class per image: predicted class if None; an int is broadcast to the batch."""
        if target is None:
            return logits.argmax(dim=1)
        return class_targets(target, logits.shape[0], logits.device, self.num_classes,
                             f"{self.model_name}: target class")

    # ------------------------------------------------------------------ loss and steps
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(loss, logits, extra logs). Families with extra terms override and call ``task_loss``."""
        logits = self(batch["image"])
        return self.task_loss(logits, batch["label"]), logits, {}

    def task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        return F.cross_entropy(logits, labels)

    def probabilities(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits) if self.task == "multilabel" else logits.softmax(dim=1)

    def _make_metrics(self) -> torchmetrics.MetricCollection:
        if self.task == "multilabel":
            kw = dict(task="multilabel", num_labels=self.num_classes)
        else:
            kw = dict(task="multiclass", num_classes=self.num_classes)
        return torchmetrics.MetricCollection({"acc": torchmetrics.Accuracy(**kw), "auroc": torchmetrics.AUROC(**kw)})

    def _shared_step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        self.validate_labels(batch["label"])
        loss, logits, logs = self.loss(batch)
        metrics = self.metrics[split + "_"]
        labels = batch["label"].long() if self.task == "multilabel" else batch["label"]
        metrics.update(self.probabilities(logits.detach()), labels)
        bs = logits.shape[0]
        # val/test are logged per epoch: under DDP their means are taken over every rank's batches.
        sync = split != "train"
        self.log(f"{split}/loss", loss, prog_bar=split != "test", batch_size=bs, sync_dist=sync)
        for name, value in logs.items():
            self.log(f"{split}/{name}", value, batch_size=bs, sync_dist=sync)
        return loss

    def _log_epoch_metrics(self, split: str) -> None:
        metrics = self.metrics[split + "_"]
        if metrics[next(iter(metrics.keys()))].update_count == 0:
            return
        for name, value in metrics.compute().items():
            self.log(f"{split}/{name}", value, prog_bar=name == "acc", sync_dist=True)
        metrics.reset()

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def on_train_epoch_end(self):
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self):
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self):
        self._log_epoch_metrics("test")

    # ------------------------------------------------------------------ training schedule as data
    @property
    def training_schedule(self) -> Schedule:
        """The ``schedule`` hyperparameter as a :class:`~zoo.schedule.Schedule` over this family's
        ``phases`` and ``actions`` (validated at construction)."""
        return self._schedule

    def apply_phase(self, phase: Phase | None) -> None:
        """Hook: make ``phase`` the one in force — which parts train, its loss overrides. Called at every
        epoch start with the phase in force then (so it must be idempotent), and with None (no phase:
        every part trains) before fit, so that DDP sees every parameter that any phase trains."""

    def run_action(self, name: str) -> None:
        """Hook: run the one-off step ``name`` (e.g. prototype push) the schedule places here."""
        raise NotImplementedError(f"{self.model_name} declares action {name!r} but does not implement it")

    def enter_phase(self, name: str, **overrides: Any) -> None:
        """Put the model in phase ``name`` (with loss ``overrides``) or run action ``name`` by hand, for
        a training loop of one's own; under a Trainer the schedule does this at every epoch start."""
        if name in self.actions:
            self.run_action(name)
        elif name in self.phases:
            self.apply_phase(Phase(name, 0, 0, None, overrides))
        else:
            raise ValueError(f"{self.model_name}: unknown phase {name!r}; expected one of {self.phases + self.actions}")

    def setup(self, stage: str) -> None:
        # DDP registers only the parameters that require grad when it wraps the model (after this hook):
        # a part frozen then (e.g. by a phase re-applied from a checkpoint) would never be all-reduced
        # once a later phase trains it. Phases freeze parts at epoch start instead, after the wrap.
        if stage == "fit":
            self.apply_phase(None)

    def on_train_epoch_start(self) -> None:
        if self._resumed_rng is not None:  # first epoch after a resume: continue the interrupted RNG stream
            set_rng_state(self._resumed_rng)
            self._resumed_rng = None
        schedule = self.training_schedule
        for action in schedule.actions_at(self.current_epoch):
            self.run_action(action)
        self.apply_phase(schedule.phase_at(self.current_epoch))

    # ------------------------------------------------------------------ optimiser
    def param_groups(self) -> list[dict]:
        """Parameter groups for the optimiser; families override to give parts their own lr."""
        return [{"params": [p for p in self.parameters()]}]

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.param_groups()
        opt_name = hp.get("optimizer", "adamw")
        if opt_name == "adamw":
            opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        elif opt_name == "adam":
            opt = torch.optim.Adam(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        elif opt_name == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {opt_name!r}; expected adamw, adam or sgd")
        if hp.get("scheduler", "cosine") == "none" or self.trainer is None or not self.trainer.max_epochs:
            return opt
        if hp.scheduler != "cosine":
            raise ValueError(f"unknown scheduler {hp.scheduler!r}; expected cosine or none")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The registry name travels with the Lightning checkpoint so `zoo.load` can rebuild the class;
        # the recipe and the RNG streams so that a resumed run continues exactly (weights_only-safe).
        checkpoint["zoo_model"] = self.model_name
        checkpoint["zoo_schedule"] = self.training_schedule.entries
        checkpoint["zoo_rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("zoo_schedule")
        if saved is not None and saved != self.training_schedule.entries:
            raise ValueError(f"{self.model_name}: the checkpoint was trained with schedule {saved}, but this "
                             f"model's is {self.training_schedule.entries}; resume with the same model.schedule")
        self._resumed_rng = checkpoint.get("zoo_rng")

    # ------------------------------------------------------------------ optional family hooks
    # zoo.training and zoo.evaluation call these on every model (never probing for them); the defaults
    # add nothing. A family overrides the ones it has, with its rows computed in its own report.py.
    # Extra rows of the explanation-metrics table: label -> keyword arguments of ``explain`` (e.g.
    # MedicalPatchNet's dense map). Each gets a row of its own; these rows do not enter the model card.
    explanation_variants: dict[str, dict] = {}

    def report_rows(self, datamodule) -> dict[str, dict[str, float]]:
        """Rows of the family's own metrics on non-image data (X-Node's graph metrics), after testing."""
        return {}

    def image_report_rows(self, datamodule, baseline=None, n_images: int = 256) -> dict[str, dict[str, float]]:
        """Rows of the family's own metrics on image data, after the explanation metrics; ``baseline`` is
        the black-box CNN trained in the same run (or None)."""
        return {}

    def card_metrics(self, results: Mapping[str, float], rows: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """What the model card records, as an explicit return value: the test accuracy / AUROC of
        ``results`` (the Trainer's test metrics) and every column of this model's own rows, the ones
        named ``"<model_name> (<what>)"`` (its explanation, its family report), in table order."""
        card = {"test_acc": results.get("test/acc"), "test_auroc": results.get("test/auroc")}
        for name, row in rows.items():
            if name.startswith(self.model_name + " ("):
                card.update(row)
        return {k: v for k, v in card.items() if v is not None}


_KINDS: dict[str, tuple[type, ...]] = {
    "float": (int, float), "int": (int,), "bool": (bool,), "str": (str,), "None": (type(None),),
    "dict": (dict, Mapping), "Mapping": (dict, Mapping), "list": (list, tuple), "tuple": (list, tuple),
    "Sequence": (list, tuple),
}


def _annotation_kinds(annotation: Any) -> tuple[type, ...] | None:
    """The Python types a signature annotation such as ``"str | float"`` or ``"Sequence[int] | None"``
    admits; None when it says nothing checkable (no annotation, Any, a class of its own)."""
    if not isinstance(annotation, str):
        return None
    kinds: list[type] = []
    for part in annotation.split("|"):
        base = part.strip().split("[", 1)[0]
        if base not in _KINDS:
            return None
        kinds.extend(_KINDS[base])
    return tuple(kinds)


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), NumPy and Python RNG states as tensors and plain values, so that a
    checkpoint holding them still loads with ``torch.load(weights_only=True)`` (NumPy's own state is a
    tuple holding an ndarray, which that loader refuses)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
