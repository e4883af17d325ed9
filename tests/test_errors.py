"""Bad input, one clear line: every config or checkpoint mistake a user makes on the command line ends
with exactly one ``error: …`` line naming the file or key and the problem, exit code 2, no traceback."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, compose

QUICK = ["trainer=fast", "callbacks=none", "logger=none", "evaluate.explanations=false",
         "evaluate.compare_baseline=false", "data.n_train=64", "data.n_val=32", "data.n_test=32"]


def _broken_model(tmp_path, case: str):
    """A copy of the shipped cnn-synthetic folder (or a checkpoint file) broken the way `case` says."""
    folder = tmp_path / case
    shutil.copytree(REPO / "checkpoints" / "cnn-synthetic", folder)
    config = folder / "config.yaml"
    if case == "tampered-config":
        config.write_text(config.read_text().replace("lr: 0.003", "lr: fast"))
    elif case == "broken-yaml":
        config.write_text("model: [cnn\n")
    elif case == "truncated-weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "pickle-ckpt":
        folder = tmp_path / "model.ckpt"  # pickles an object: torch's weights_only loader refuses it
        torch.save({"zoo_model": "cnn", "state_dict": {}, "args": argparse.Namespace(lr=1)}, folder)
    return folder, {"tampered-config": config, "broken-yaml": config,
                    "truncated-weights": folder / "model.safetensors", "pickle-ckpt": folder}[case]


def _cli(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("case", ["tampered-config", "broken-yaml", "truncated-weights", "pickle-ckpt"])
def test_broken_saved_model_is_one_line_naming_the_file(case, tmp_path):
    model_path, bad_file = _broken_model(tmp_path, case)
    line = _one_error_line(_cli("evaluate.py", f"model_path={model_path}", "explanations=false",
                                f"hydra.run.dir={tmp_path / 'run'}"))
    assert str(bad_file) in line
    expected = {"tampered-config": "hyperparameter lr must be float, got 'fast'", "broken-yaml": "not valid YAML",
                "truncated-weights": "unreadable safetensors file", "pickle-ckpt": "never unpickles code"}[case]
    assert expected in line
    assert "weights_only=False" not in line  # torch's own advice is the unsafe one


@pytest.mark.parametrize("override, expected", [
    ("model.lr=abc", "cnn: hyperparameter lr must be float, got 'abc' (str)"),
    ("+model.foo=1", "cnn: unknown hyperparameter 'foo'; it takes cam_layer, "),
    ("resume=true", "resume checkpoint not found: "),
])
def test_config_mistake_is_one_line(override, expected, tmp_path):
    line = _one_error_line(_cli("train.py", *QUICK, override, f"hydra.run.dir={tmp_path / 'run'}"))
    assert expected in line
    if override == "resume=true":
        assert str(tmp_path / "run" / "checkpoints" / "last.ckpt") in line


def test_publish_refuses_to_overwrite_a_shipped_checkpoint(tmp_path):
    shipped = tmp_path / "checkpoints" / "cnn-synthetic"
    shutil.copytree(REPO / "checkpoints" / "cnn-synthetic", shipped)
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    line = _one_error_line(_cli("train.py", *QUICK, "publish=cnn-synthetic", f"hydra.run.dir={tmp_path / 'run'}",
                                env={"ZOO_CHECKPOINTS": str(tmp_path / "checkpoints")}))
    assert f"publish: {shipped} already exists; pass publish_overwrite=true" in line
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before  # untouched
    assert not (tmp_path / "run" / "model").exists()  # refused before training


def test_publish_overwrite_replaces_and_new_names_publish(tmp_path, monkeypatch):
    from zoo.training import train

    monkeypatch.setenv("ZOO_CHECKPOINTS", str(tmp_path / "checkpoints"))
    train(compose([*QUICK, "publish=mine"], tmp_path / "a"))  # a new name publishes
    first = (tmp_path / "checkpoints" / "mine" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        train(compose([*QUICK, "publish=mine"], tmp_path / "b"))
    train(compose([*QUICK, "publish=mine", "publish_overwrite=true", "seed=1"], tmp_path / "c"))
    assert (tmp_path / "checkpoints" / "mine" / "model.safetensors").read_bytes() != first


def test_resume_auto_starts_fresh_then_continues(tmp_path):
    from zoo.training import train

    run = [*QUICK, "callbacks=default", "~callbacks.explanation_figures", "~callbacks.progress", "resume=auto"]
    train(compose(run, tmp_path))  # no checkpoint yet: a fresh run
    step = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    train(compose([*run, "trainer.max_epochs=2"], tmp_path))  # continues from it
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * step


def test_saved_files_have_normal_modes_and_train_log_holds_the_run(tmp_path):
    result = _cli("train.py", *QUICK, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "run" / "model").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    log = (tmp_path / "run" / "train.log").read_text()
    assert "results on synthetic (test split)" in log and "`Trainer.fit` stopped" in log  # zoo's and Lightning's


def test_evaluate_writes_its_table(tmp_path):
    result = _cli("evaluate.py", "model_path=cnn-synthetic", "explanations=false", "data.n_test=64",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "results.yaml").read_text())
    assert saved["source"] == "cnn-synthetic" and 0.5 < saved["rows"]["cnn"]["acc"] <= 1.0
    header = (tmp_path / "run" / "results.csv").read_text().splitlines()[0]
    assert header == "row,acc,auroc"
    page = (tmp_path / "run" / "report" / "index.html").read_text()  # the same report a training run writes
    assert "cnn-synthetic on synthetic" in page and "<table" in page and "data:image/png;base64," in page
    assert "Model card" in page and (tmp_path / "run" / "figures" / "test.png").stat().st_size > 5000


def test_inputs_outside_the_normalised_range_are_refused():
    import zoo

    model = zoo.load("cnn-synthetic")
    x = torch.rand(2, 1, 32, 32) * 255
    with pytest.raises(ValueError, match=r"expected images normalised to \[-1, 1\].*got values in \[0\.\d+, 25\d"):
        model(x)


@pytest.mark.slow
def test_a_non_editable_install_carries_the_shipped_checkpoints(tmp_path):
    """`pip install .` copies checkpoints/ in as package data: the installed zoo lists and loads them."""
    wheel_dir, target, source = tmp_path / "wheel", tmp_path / "site", tmp_path / "source"
    # a copy: building writes build/ into the source folder
    shutil.copytree(REPO, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "logs", "build", "*.egg-info", "__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheel_dir), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheel_dir.glob("zoo-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    code = ("import zoo, torch; from pathlib import Path; "
            f"assert Path(zoo.__file__).is_relative_to({str(target)!r}), zoo.__file__; "
            "names = zoo.list_pretrained(); assert 'protopnet-synthetic' in names and len(names) >= 10, names; "
            "m = zoo.load('protopnet-synthetic'); print(len(names), m(torch.zeros(1, 1, 32, 32)).shape)")
    env = {k: v for k, v in os.environ.items() if k != "ZOO_CHECKPOINTS"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**env, "PYTHONPATH": str(target)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "torch.Size([1, 4])" in run.stdout


def test_an_empty_checkpoint_folder_is_not_silent(tmp_path, monkeypatch):
    import zoo

    monkeypatch.setenv("ZOO_CHECKPOINTS", str(tmp_path))
    with pytest.warns(UserWarning, match=f"no pretrained models under {tmp_path} .set ZOO_CHECKPOINTS"):
        assert zoo.list_pretrained() == []
    with pytest.raises(FileNotFoundError, match="pretrained: none; ZOO_CHECKPOINTS sets that folder"):
        zoo.load("protopnet-synthetic")
