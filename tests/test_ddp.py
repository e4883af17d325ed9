"""`python train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2`: two gloo processes train every
scheduled family across a phase switch (and a push for the prototype family) plus one unscheduled model;
both ranks must end with the same weights, and only rank 0 prints the table and saves the model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

DATA = ["data.n_train=96", "data.n_val=32", "data.n_test=31",  # odd: a padding sampler would repeat one
        "data.batch_size=16", "trainer.max_epochs=2"]
PROTO = ["model.widths=[8,16]", "model.prototype_dim=8", "model.prototypes_per_class=2", "model.push_batch_size=32"]
FAMILIES = {
    "protopnet": ["model=protopnet", *PROTO, "model.schedule=[{phase:joint,epochs:1},{phase:push},{phase:last_layer,epochs:1}]"],
    "prob_protopnet": ["model=prob_protopnet", *PROTO, "model.n_samples=2",
                       "model.schedule=[{phase:warm,epochs:1},{phase:joint,epochs:1}]"],
    "proto_head": ["model=proto_head", *PROTO, "model.backbone_checkpoint=null",
                   "model.schedule=[{phase:joint,epochs:1},{phase:push},{phase:last_layer,epochs:1}]"],
    "sop": ["model=sop", "model.widths=[8,16,16]", "model.num_groups=2", "model.attn_dim=8",
            "model.schedule=[{phase:backbone,epochs:1},{phase:sop,epochs:1}]"],
    "cnn": ["model=cnn", "model.widths=[8,16,16]"],  # no schedule
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_process_cpu_ddp_trains_identically_on_both_ranks(family, tmp_path):
    out = tmp_path / "weights"
    cmd = [sys.executable, "train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *DATA,
           *FAMILIES[family], "evaluate.explanations=false", "evaluate.compare_baseline=false", "logger=csv",
           "callbacks=none", "+callbacks.weights._target_=probes.SaveRankWeights", f"+callbacks.weights.out={out}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), f"{family}: {name} differs between the ranks"
    assert result.stdout.count("results on synthetic (test split)") == 1  # rank 0 alone prints and saves
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    # Test metrics read each test image exactly once across the ranks: they equal the saved model's own.
    import yaml

    import zoo
    from zoo.data import SyntheticDataModule

    model = zoo.load(tmp_path / "run" / "model")
    dm = SyntheticDataModule(n_train=96, n_val=32, n_test=31, seed=0)
    x, y = (torch.stack([item[k] for item in dm.dataset("test")]) for k in ("image", "label"))
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    metrics = yaml.safe_load((tmp_path / "run" / "metrics.yaml").read_text())
    assert metrics[f"{model.model_name}/acc"] == pytest.approx(acc, abs=1e-6)
    if family == "protopnet":  # the push ran (and, identical on both ranks, projected onto training patches)
        assert bool((ranks[0]["state"]["push_index"] >= 0).all())
