"""The Hydra app end to end: run folder contents, resume, determinism, clear errors, accuracy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

import zoo
from conftest import REPO, compose
from zoo.training import train

TINY = ["trainer=fast", "data.n_train=256", "data.n_val=64", "data.n_test=64", "evaluate.n_images=16",
        "evaluate.steps=4", "evaluate.posthoc=false", "callbacks=none", "logger=none"]


def test_train_writes_model_metrics_and_figures(tmp_path):
    cfg = compose([*TINY, "callbacks=default", "evaluate.posthoc=true", "~callbacks.progress"], tmp_path)
    metrics = train(cfg)
    assert 0.0 <= metrics["cnn/acc"] <= 1.0
    assert "cnn grad-cam[backbone.features.17]/hit_rate" in metrics
    assert any(k.startswith("cnn grad-cam best[") for k in metrics)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "figures").glob("test-*.png"))
    saved = yaml.safe_load((tmp_path / "metrics.yaml").read_text())
    assert saved["cnn/acc"] == pytest.approx(metrics["cnn/acc"])
    model = zoo.load(tmp_path / "model")
    # The Lightning checkpoint loads without unpickling code and gives the same network.
    from_ckpt = zoo.load(tmp_path / "checkpoints" / "last.ckpt")
    x = torch.zeros(2, 1, 32, 32)
    torch.testing.assert_close(model(x), from_ckpt(x))


def test_seeded_runs_are_reproducible(tmp_path):
    weights = []
    for run in ("a", "b"):
        train(compose([*TINY, "evaluate.explanations=false"], tmp_path / run))
        weights.append(zoo.load(tmp_path / run / "model").state_dict())
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], rtol=0, atol=0, msg=name)


def test_resume_continues_from_last_checkpoint(tmp_path):
    base = [*TINY, "callbacks=default", "~callbacks.explanation_figures", "~callbacks.progress",
            "evaluate.explanations=false"]
    train(compose(base, tmp_path))
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    # One batch per epoch from now on: resuming runs only epoch 2 (first + 1 steps); a restart would
    # run both epochs from scratch (2 steps).
    train(compose([*base, "resume=true", "trainer.max_epochs=2", "trainer.limit_train_batches=1"], tmp_path))
    second = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 4
    assert second["global_step"] == first["global_step"] + 1


def test_breastmnist_trains_offline(tmp_path, medmnist_dir):
    cfg = compose(["data=breastmnist", f"paths.data_dir={medmnist_dir}", *TINY[:1], "callbacks=none",
                   "logger=none", "evaluate.explanations=false", "evaluate.compare_baseline=false"], tmp_path)
    metrics = train(cfg)
    assert 0.0 <= metrics["cnn/acc"] <= 1.0


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_missing_data_root_is_one_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    result = _run_cli("data=breastmnist", f"paths.data_dir={missing}", f"hydra.run.dir={tmp_path / 'run'}",
                      env={"ZOO_DATA_DIR": ""})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert str(missing / "breastmnist.npz") in error_lines[0] and "ZOO_DATA_DIR" in error_lines[0]


def test_unknown_model_is_one_clear_error(tmp_path):
    result = _run_cli("model=cnn", "model.name=resnet9000", f"hydra.run.dir={tmp_path / 'run'}", "trainer=fast")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown model 'resnet9000'; available:" in result.stderr


@pytest.mark.slow
def test_default_command_reaches_target_accuracy(tmp_path):
    """`python train.py` with no arguments: the baseline reaches ≥ 95 % on synthetic (the README's claim).
    Seeds 0/1/2 give 0.998/0.995/0.997: the threshold allows 10× the worst error rate seen."""
    seed = 0  # conf/train.yaml's default; checked at 0, 1 and 2 (issue #13)
    metrics = train(compose(["evaluate.posthoc=false", "callbacks=none", "logger=none", f"seed={seed}"], tmp_path))
    assert metrics["cnn/acc"] >= 0.95, f"test accuracy {metrics['cnn/acc']:.3f}; 4 classes: chance is 0.25"


def test_saved_baseline_must_fit_the_data():
    """evaluate.baseline: a saved cnn made for other data is one clear error, not a shape crash later."""
    from types import SimpleNamespace

    from zoo.training import saved_baseline

    synthetic = SimpleNamespace(num_classes=4, in_channels=1, image_size=32)
    assert saved_baseline("cnn-synthetic", synthetic).num_classes == 4
    with pytest.raises(ValueError, match=r"evaluate.baseline=cnn-synthetic: made for 4 classes.*data has 2"):
        saved_baseline("cnn-synthetic", SimpleNamespace(num_classes=2, in_channels=1, image_size=28))
