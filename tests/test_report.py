"""The per-run HTML report (rendered in headless Chromium), explanation metrics in the loggers, the
multirun summary table and the SLURM launcher config."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import CONF, REPO, compose
from zoo.report_html import write_report

TINY = ["trainer=fast", "data.n_train=128", "data.n_val=32", "data.n_test=32", "evaluate.n_images=8",
        "evaluate.steps=4", "evaluate.posthoc=false", "evaluate.compare_baseline=false", "callbacks=none"]
MAGENTA = (255, 0, 255)  # a colour no table, text or matplotlib default uses: finding it = the figure drew


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (CI installs it in .ci/run: apt-get install chromium)")
        pytest.skip("chromium not installed: apt-get install -y chromium (CI=true makes this a failure)")
    return found


def _render(page, tmp_path, dump_dom: bool = False) -> subprocess.CompletedProcess | np.ndarray:
    shot = tmp_path / "shot.png"
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,1600",
            "--dump-dom" if dump_dom else f"--screenshot={shot}", page.resolve().as_uri()]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    if dump_dom:
        return done
    assert shot.is_file(), f"chromium wrote no screenshot: {done.stderr[-2000:]}"
    return np.asarray(Image.open(shot).convert("RGB"))


@pytest.fixture()
def report(tmp_path):
    figures = tmp_path / "run" / "figures"
    figures.mkdir(parents=True)
    block = np.zeros((200, 300, 3), np.uint8)
    block[:] = MAGENTA
    Image.fromarray(block).save(figures / "test-epoch000.png")
    Image.fromarray(255 - block).save(figures / "val-epoch000.png")  # an older epoch of a series: left out
    Image.fromarray(255 - block).save(figures / "val-epoch002.png")
    (tmp_path / "run" / "model").mkdir()
    (tmp_path / "run" / "model" / "card.md").write_text("# cnn\n\n- data: synthetic\n\n<script>x</script>\n")
    rows = {"cnn": {"acc": 0.875, "auroc": 0.9}, "cnn grad-cam": {"hit_rate": 0.5, "deletion_auc": float("nan")}}
    return write_report(tmp_path / "run", rows, "cnn on synthetic")


def test_report_lists_table_figures_and_card(report):
    page = report.read_text()
    assert report.name == "index.html" and report.parent.name == "report"
    assert '<table id="metrics">' in page and "<td>0.8750</td>" in page and "<td>–</td>" in page  # nan → –
    assert "<th>hit_rate</th>" in page and page.index("<th>acc</th>") < page.index("<th>hit_rate</th>")
    assert page.count("<img ") == 2  # test figure + the latest val figure only
    assert "val-epoch002.png" in page and "val-epoch000.png" not in page
    assert "<h1>cnn</h1>" in page and "<script>" not in page  # card rendered; its raw HTML escaped
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched


def test_report_renders_in_headless_chromium(report, tmp_path):
    pixels = _render(report, tmp_path)
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 10, "blank screenshot"
    magenta = np.all(np.abs(pixels.astype(int) - MAGENTA) < 12, axis=-1)
    rows, cols = np.nonzero(magenta)
    assert magenta.sum() > 0.8 * 200 * 300, f"figure not drawn ({magenta.sum()} magenta pixels)"
    # The table sits above the figure: dark text pixels there, and table borders (grey lines).
    above = pixels[: rows.min()]
    assert (above.max(axis=-1) < 90).sum() > 500, "no table text above the figure"
    dom = _render(report, tmp_path, dump_dom=True).stdout
    assert "cnn grad-cam" in dom and 'id="metrics"' in dom


@pytest.mark.slow
def test_train_logs_explanation_metrics_and_writes_the_report(tmp_path):
    from zoo.training import train

    metrics = train(compose([*TINY, "logger=csv", "evaluate.posthoc=true"], tmp_path))
    logged = list(tmp_path.rglob("metrics.csv"))
    assert len(logged) == 1
    with open(logged[0]) as f:
        table = list(csv.DictReader(f))
    # The explanation metrics of the table reach the logger under TensorBoard-safe names:
    # "cnn grad-cam[backbone.features.17]/hit_rate" → "cnn_grad-cam_backbone.features.17/hit_rate".
    last = {k: v for row in table for k, v in row.items() if v not in ("", None)}
    assert float(last["cnn/acc"]) == pytest.approx(metrics["cnn/acc"])
    hit = "cnn grad-cam[backbone.features.17]/hit_rate"
    assert float(last["cnn_grad-cam_backbone.features.17/hit_rate"]) == pytest.approx(metrics[hit])
    assert sum(k.endswith("/deletion_auc") for k in last) >= 2  # last layer and best layer rows
    assert all(" " not in k and "[" not in k for k in table[0])
    page = (tmp_path / "report" / "index.html").read_text()
    assert '<table id="metrics">' in page and "Model card" in page


@pytest.mark.slow
def test_multirun_writes_one_summary_over_its_jobs(tmp_path):
    done = subprocess.run([sys.executable, "train.py", "-m", *TINY, "logger=none", "evaluate.explanations=false",
                           "seed=0,1", f"hydra.sweep.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert ["seed=0" in r["overrides"] and "seed=1" not in r["overrides"] for r in rows] == [True, False]
    for r, job in zip(rows, ("0", "1")):
        saved = yaml.safe_load((tmp_path / job / "metrics.yaml").read_text())
        assert float(r["cnn/acc"]) == pytest.approx(saved["cnn/acc"]) and r["status"] == "ok"
    assert "| job | overrides |" in (tmp_path / "summary.md").read_text()


def test_summary_marks_a_job_without_metrics(tmp_path):
    from zoo.hydra_callbacks import summarize

    for job, metrics in (("0", {"cnn/acc": 0.5, "cnn/hit_rate": 0.25, "cnn/other": 1.0}), ("1", None)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={job}"]))
        if metrics:
            (tmp_path / job / "metrics.yaml").write_text(yaml.safe_dump(metrics))
    rows = summarize(tmp_path)
    assert rows == [{"job": "0", "overrides": "seed=0", "cnn/acc": 0.5, "cnn/hit_rate": 0.25, "status": "ok"},
                    {"job": "1", "overrides": "seed=1", "status": "no metrics.yaml"}]


def test_slurm_launcher_composes_with_matching_lightning_settings(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from zoo.config import register_model_configs

    register_model_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain = hydra_compose("train", overrides=["hydra/launcher=submitit_slurm"], return_hydra_config=True)
        cfg = hydra_compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2",
                                                "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu",
                                                "trainer=ddp"], return_hydra_config=True)
    target = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert plain.hydra.launcher._target_ == target and cfg.hydra.launcher._target_ == target
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (2, 4, 4, "gpu")
    assert cfg.trainer.strategy.startswith("ddp") and cfg.trainer.devices == "auto"
    # trainer.num_nodes follows the launcher, resolved against the job's hydra config as inside a job.
    assert OmegaConf.to_container(cfg.trainer)["num_nodes"] == "${hydra:launcher.nodes}"
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    assert cfg.trainer.num_nodes == 2
    assert any(c._target_ == "zoo.hydra_callbacks.MultirunSummary" for c in cfg.hydra.callbacks.values())


def test_figures_name_classes_mark_true_and_pred_and_state_their_scale():
    import torch

    from zoo.explanation import Explanation
    from zoo.viz import class_name, plot_explanation

    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # predicted: 0, 1
    expl = Explanation(logits=logits, target=torch.tensor([0, 0]), kind="post-hoc",
                       attribution=torch.rand(2, 1, 8, 8), inputs=torch.zeros(2, 1, 8, 8))
    fig = plot_explanation(expl, class_names=["benign", "malignant"], labels=torch.tensor([0, 0]))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "true: benign · pred: benign\nexplained: benign (true/pred) p=0.88"
    assert titles[1].startswith("true: benign · pred: malignant\nexplained: benign (true) p=0.05")
    bars = [ax for ax in fig.axes if ax.get_ylabel()]  # the colour bar states its scale
    assert [ax.get_ylabel() for ax in bars] == ["attribution ÷ max"]
    unnamed = plot_explanation(expl)  # no names anywhere: "class k", never a bare "0"
    assert [ax.get_title() for ax in unnamed.axes][0].startswith("true: ? · pred: class 0")
    assert class_name(3) == "class 3" and class_name(1, ["a", "b"]) == "b"
