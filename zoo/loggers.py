"""Loggers that keep a resumed run's history.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when its folder is reused, so ``resume=true``
lost every epoch before the interruption. :class:`CSVLogger` is Lightning's, except that after
:meth:`CSVLogger.resume_at` it keeps the rows of the epochs the checkpoint holds and drops the rest
(rows of an epoch cut short, or of the interrupted run's test pass), so the file reads as the log of
one uninterrupted run.
"""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _HistoryWriter(ExperimentWriter):
    """ExperimentWriter that starts from the rows of epochs < ``keep_before_epoch`` of an existing file."""

    def __init__(self, log_dir: str, keep_before_epoch: int) -> None:
        self.keep_before_epoch = keep_before_epoch
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by the parent's __init__ instead of deleting the file
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            header, rows = list(reader.fieldnames or []), list(reader)
        kept = [row for row in rows if row.get("epoch") not in (None, "") and
                int(float(row["epoch"])) < self.keep_before_epoch]
        self.metrics_keys = sorted(header)
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger that continues ``metrics.csv`` on resume (see the module docstring)."""

    _resume_epoch: int | None = None

    def resume_at(self, epoch: int) -> None:
        """Training continues at ``epoch``: keep the logged rows of the epochs before it."""
        if self._experiment is not None:
            raise RuntimeError("resume_at must be called before the logger writes anything")
        self._resume_epoch = int(epoch)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            if self._resume_epoch is None:
                return super().experiment
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(self.log_dir, self._resume_epoch)
        return self._experiment
