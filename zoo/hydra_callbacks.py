"""Hydra callbacks (registered in conf/train.yaml under ``hydra.callbacks``).

:class:`MultirunSummary`: after ``python train.py -m …`` finishes, one table over its jobs —
``<sweep dir>/summary.csv`` and ``summary.md``, one row per job: the job number, its overrides (from
the job's ``.hydra/overrides.yaml``) and the key numbers of its ``metrics.yaml`` (test split). A job
that failed or wrote no metrics keeps its row, marked ``status: no metrics.yaml``, so a sweep's gaps
show instead of silently shrinking the table.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("zoo")


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (those with Hydra's ``.hydra/overrides.yaml``), in job-number order."""
    dirs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    return sorted(dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def _keep(key: str, keys: tuple[str, ...]) -> bool:
    return key == "seconds" or key.rpartition("/")[2] in keys


def summarize(sweep_dir: str | Path, keys: tuple[str, ...] = ("acc", "auroc", "hit_rate", "deletion_auc",
                                                              "insertion_auc", "map_iou")) -> list[dict[str, Any]]:
    """Write ``summary.csv`` and ``summary.md`` in ``sweep_dir``; returns the rows. ``keys``: the metric
    names kept from each job's flat metrics (``<row>/<metric>``; every row's, so the baseline's too)."""
    sweep_dir = Path(sweep_dir)
    rows: list[dict[str, Any]] = []
    for job in _job_dirs(sweep_dir):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        row: dict[str, Any] = {"job": job.name, "overrides": " ".join(overrides)}
        metrics_file = job / "metrics.yaml"
        if metrics_file.is_file():
            metrics = yaml.safe_load(metrics_file.read_text()) or {}
            row.update({k: v for k, v in metrics.items() if _keep(k, keys)})
            row["status"] = "ok"
        else:
            row["status"] = "no metrics.yaml"
        rows.append(row)
    columns = list(dict.fromkeys(k for r in rows for k in r))  # first use order: job, overrides, metrics …
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    (sweep_dir / "summary.md").write_text(f"# multirun summary: {sweep_dir}\n\nNumbers on the test split, "
                                          f"one row per job.\n\n" + "\n".join(lines) + "\n")
    return rows


class MultirunSummary(Callback):
    """Writes the sweep's summary table when a multirun ends (see the module docstring)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():  # e.g. a launcher that ran the jobs elsewhere
            log.warning("multirun summary: sweep dir %s not found, no summary written", sweep_dir)
            return
        rows = summarize(sweep_dir)
        log.info("multirun summary of %d job(s): %s", len(rows), sweep_dir / "summary.md")
