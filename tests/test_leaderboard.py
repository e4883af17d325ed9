"""benchmarks/leaderboard.py: tables from job folders (mean ± std over seeds, incomplete runs marked)
without running any training (``--report-only``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _job(out: Path, seed: int, acc: float, deletion: float) -> None:
    folder = out / "synthetic" / "cnn" / f"seed{seed}"
    folder.mkdir(parents=True)
    metrics = {"cnn/acc": acc, "cnn/auroc": 1.0, "cnn/test/loss": 0.1,
               "cnn grad-cam best[backbone.features.17]/deletion_auc": deletion,
               "cnn grad-cam best[backbone.features.17]/deletion_auc[grey]": deletion}
    (folder / "metrics.yaml").write_text(yaml.safe_dump(metrics))
    (folder / "job.yaml").write_text(yaml.safe_dump({"wall_s": 10, "started": 100 + 5 * seed, "ended": 110 + 5 * seed,
                                                     "commit": "abc1234"}))


def test_report_only_averages_seeds_and_lists_jobs_not_run(tmp_path):
    out = tmp_path / "jobs"
    _job(out, 0, 0.90, 0.20)
    _job(out, 1, 0.80, 0.30)
    md = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, "benchmarks/leaderboard.py", "--report-only", "--models", "cnn",
                           "--data", "synthetic", "--seeds", "0", "1", "2", "--out", str(tmp_path / "unused"), "--store", str(out),
                           "--results", str(md)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = md.read_text()
    assert "INCOMPLETE: 1 of 3 jobs not run yet" in text and "seed2" in text.split("## Jobs not run yet")[1]
    # the layer name differs between seeds, so rows are merged as "grad-cam best"; acc copied onto each row
    row = next(line for line in text.splitlines() if line.startswith("| cnn | cnn grad-cam best |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "2" and cells[3] == "0.850 ± 0.071"  # n seeds, acc mean ± sample std
    assert "0.250 ± 0.071" in cells and "commit(s) abc1234" in text
    assert "Wall time: 0.00 h" in text and "0.01 h summed over the 2 jobs" in text
    csv_head = md.with_suffix(".csv").read_text().splitlines()[0].split(",")
    assert csv_head[:4] == ["data", "model", "row", "n_seeds"] and "deletion_auc_mean" in csv_head
    # the README's block: the best-layer row (not the classification-only "cnn" row), n, acc, deletion
    block = _leaderboard().headline(md.with_suffix(".csv"))
    assert "| cnn | grad-cam best | 2 | 0.850 ± 0.071 | 1.000 ± 0.000 | 0.250 ± 0.071 |" in block
    assert "| cnn | cnn |" not in block


def test_readme_results_block_is_written_from_docs_results_csv():
    """The README's comparison numbers have one home: docs/results.csv, written by the leaderboard."""
    lb = _leaderboard()
    readme = (ROOT / "README.md").read_text()
    block = readme.split(lb.README_BEGIN, 1)[1].split(lb.README_END, 1)[0]
    assert block.strip() == lb.headline(ROOT / "docs" / "results.csv").strip()


def _leaderboard():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import leaderboard

    return leaderboard


def test_proto_head_and_gdvae_jobs_name_the_cnn_job_of_their_data_and_seed():
    leaderboard = _leaderboard()
    cmd = leaderboard.command("proto_head", "breastmnist", 2, ROOT / "logs" / "lb" / "breastmnist" / "proto_head" /
                              "seed2", [])
    assert "hydra.run.dir=logs/lb/breastmnist/proto_head/seed2" in cmd  # relative: runs from the repository
    assert "model.backbone_checkpoint=logs/lb/breastmnist/cnn/seed2/model" in cmd
    assert not any("backbone_checkpoint" in c for c in leaderboard.command("cnn", "breastmnist", 2, ROOT / "x", []))
    gdvae = leaderboard.command("gdvae", "breastmnist", 2, ROOT / "logs" / "lb" / "breastmnist" / "gdvae" / "seed2", [])
    assert "evaluate.baseline=logs/lb/breastmnist/cnn/seed2/model" in gdvae  # the independent judge
    assert leaderboard.FAMILIES[0] == "cnn"  # its cnn job runs first (data-major, families in order)


def test_a_family_recipe_replaces_its_defaults_only_on_its_data(tmp_path):
    """GdVAE on synthetic runs with the zoo's synthetic recipe (object decoder, FiLM, class term, recon σ at
    the data's pixel noise, prototype path), composed with the job's own overrides; on other data, and for
    other families, the library defaults."""
    from conftest import compose

    lb = _leaderboard()
    folder = ROOT / "logs" / "lb" / "synthetic" / "gdvae" / "seed1"
    cmd = lb.command("gdvae", "synthetic", 1, folder, [])
    assert "experiment=gdvae_synthetic" in cmd
    assert not any(c.startswith("experiment=") for c in lb.command("gdvae", "breastmnist", 1, folder, []))
    assert not any(c.startswith("experiment=") for c in lb.command("cnn", "synthetic", 1, folder, []))
    cfg = compose([c for c in cmd[2:] if not c.startswith("hydra.")], tmp_path)
    assert (cfg.model.decoder, cfg.model.decoder_film, cfg.model.consistency_class_weight) == ("object", True, 50)
    assert (cfg.model.recon_sigma, cfg.model.cf_method) == (0.2, "prototype")
    assert cfg.seed == 1 and cfg.data.num_classes == 4 and cfg.evaluate.baseline.endswith("cnn/seed1/model")


def test_busy_hours_is_the_union_of_job_intervals():
    """Two sessions: overlapping jobs count once, the gap between sessions not at all."""
    lb = _leaderboard()
    assert lb.busy_hours([(0, 3600), (1800, 5400), (100_000, 103_600)]) * 3600 == 5400 + 3600
    assert lb.busy_hours([(0, 7200), (600, 1200)]) == 2.0 and lb.busy_hours([]) == 0.0


def test_a_stored_job_is_skipped_and_a_rebuilt_cnn_must_match_its_stored_accuracy(tmp_path, monkeypatch):
    lb = _leaderboard()
    out, store = tmp_path / "jobs", tmp_path / "store"
    _job(store, 0, 0.90, 0.20)  # the cnn job of synthetic seed 0: stored metrics, no model folder
    ran: list[tuple] = []

    def fake_train(job, folder, to_store, extra, acc=0.90):
        ran.append(job)
        (folder / "model").mkdir(parents=True)
        (folder / "metrics.yaml").write_text(yaml.safe_dump({"cnn/acc": acc}))
        return None

    monkeypatch.setattr(lb, "train_job", fake_train)
    assert lb.run_job(("synthetic", "cnn", 0), out, store, [], "cnn") is None and ran == []  # stored: skipped
    # proto_head needs the cnn's weights, which a fresh checkout lacks: the cnn job is rebuilt first
    assert lb.run_job(("synthetic", "proto_head", 0), out, store, [], "ph") is None
    assert ran == [("synthetic", "cnn", 0), ("synthetic", "proto_head", 0)]
    assert lb.run_job(("synthetic", "gdvae", 0), out, store, [], "gd") is None and ran[-1][1] == "gdvae"  # built once
    monkeypatch.setattr(lb, "train_job", lambda *a: fake_train(*a, acc=0.85))
    _job(store, 1, 0.90, 0.20)
    failed = lb.run_job(("synthetic", "gdvae", 1), out, store, [], "gd1")
    assert failed is not None and "differs from the stored job" in failed
    # the message names every stored record to delete: the cnn job and the two that sit on it
    assert all(str(store / "synthetic" / m / "seed1") in failed for m in ("cnn", "proto_head", "gdvae"))
    assert "differs" in lb.run_job(("synthetic", "proto_head", 1), out, store, [], "ph1")  # still refused
