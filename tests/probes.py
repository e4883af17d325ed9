"""Callbacks the tests put into real runs by config (``+callbacks.<name>._target_=probes.<Class>``):
importable by name because pytest puts tests/ on sys.path (the DDP test sets PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class InterruptAt(L.Callback):
    """Raise KeyboardInterrupt (what Ctrl+C raises) after batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise KeyboardInterrupt


class SaveRankWeights(L.Callback):
    """Each DDP rank saves its model's state_dict to ``<out>/rank<r>.pt`` when testing starts (after
    fit, so including a push at the end of fit)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_test_start(self, trainer, module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        torch.save({"state": state, "world_size": trainer.world_size}, self.out / f"rank{trainer.global_rank}.pt")
