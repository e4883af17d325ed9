"""Lightning callbacks shared by every family."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from zoo.viz import plot_explanation, save_figure


def _class_names(module, datamodule) -> list[str] | None:
    """The model's own class names (saved with it) when set, else the datamodule's; None → "class k"."""
    return getattr(module, "class_names", None) or getattr(datamodule, "class_names", None)


def explanation_figure(module, batch: dict[str, torch.Tensor], class_names: list[str] | None, max_items: int = 8):
    """The model's own explanation figure of an image batch (masks and labels drawn when present).
    Needs autograd for post-hoc and some families' explanations: call it outside inference mode."""
    images = batch["image"].to(module.device)
    target = batch["label"].to(module.device) if batch["label"].ndim == 1 else None
    expl = module.explain(images, target).detach()
    return plot_explanation(expl, class_names=class_names, masks=batch.get("mask"), labels=target, max_items=max_items)


class ExplanationFigures(L.Callback):
    """Save the model's own explanation figure for a fixed batch every `every_n_epochs` and at test.

    PNGs go to ``<run dir>/figures/``; with a TensorBoard logger the figure is also logged there.
    """

    def __init__(self, every_n_epochs: int = 5, n_images: int = 8, dirname: str = "figures") -> None:
        self.every_n_epochs, self.n_images, self.dirname = every_n_epochs, n_images, dirname
        self.saved: list[Path] = []

    def _batch(self, trainer: L.Trainer, stage: str) -> dict[str, torch.Tensor] | None:
        dm = trainer.datamodule
        if dm is None:
            return None
        loader = dm.test_dataloader() if stage == "test" else dm.val_dataloader()
        batch = next(iter(loader))
        return {k: v[: self.n_images] for k, v in batch.items()}

    def _draw(self, trainer: L.Trainer, module, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        was_training = module.training
        module.eval()
        # Test hooks run under inference_mode; post-hoc and some families' explanations need autograd,
        # so even the batch must be loaded outside it.
        try:
            with torch.inference_mode(False), torch.enable_grad():
                if module.input_kind != "image":  # graphs: the first nodes of the split
                    fig = self._graph_figure(trainer, module, stage)
                    if fig is None:
                        return
                else:
                    batch = self._batch(trainer, stage)
                    if batch is None:
                        return
                    fig = explanation_figure(module, batch, _class_names(module, trainer.datamodule), self.n_images)
        finally:
            module.train(was_training)
        tag = f"{stage}-epoch{trainer.current_epoch:03d}"
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(f"explanations/{stage}", fig, global_step=trainer.global_step, close=False)
        root = Path(trainer.default_root_dir)
        self.saved.append(save_figure(fig, root / self.dirname / f"{tag}.png"))
        plt.close(fig)

    def _graph_figure(self, trainer: L.Trainer, module, stage: str):
        """Node explanations of the split's first nodes (whole-graph batches cannot be sliced)."""
        dm = trainer.datamodule
        if dm is None or module.explanation_kind == "post-hoc":
            return None
        batch = next(iter(dm.test_dataloader() if stage == "test" else dm.val_dataloader()))
        graph = batch["graph"].to(module.device)
        nodes = batch["mask"].nonzero().squeeze(1)[: min(self.n_images, 4)]
        expl = module.explain(graph, nodes=nodes).detach()
        labels = batch["label"][: len(nodes)]  # the split's labels, in mask order: those of `nodes`
        return plot_explanation(expl, class_names=_class_names(module, dm), labels=labels, max_items=len(nodes))

    def on_train_epoch_end(self, trainer: L.Trainer, module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._draw(trainer, module, "val")

    def on_test_end(self, trainer: L.Trainer, module) -> None:
        self._draw(trainer, module, "test")
