"""The training machinery shared by every family: the schedule object, the epoch-keyed data order,
RNG checkpointing, config precedence, and the evaluate.py error path."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import REPO, compose
from zoo.base import rng_state, set_rng_state
from zoo.data.common import EpochShuffleSampler
from zoo.schedule import Schedule

PROTO = (("warm", "joint", "last_layer"), ("push",))


def test_schedule_says_which_phase_is_in_force_at_every_epoch():
    s = Schedule([{"phase": "joint", "epochs": 2, "clst_weight": 0.0}, {"phase": "joint", "epochs": 1},
                  {"phase": "push"}, {"phase": "last_layer", "epochs": 2}], *PROTO)
    names = [(p.name, p.index) for p in map(s.phase_at, range(7))]
    assert names == [("joint", 0)] * 2 + [("joint", 1)] + [("last_layer", 2)] * 4  # the last one goes on
    assert s.phase_at(1).overrides == {"clst_weight": 0.0} and s.phase_at(2).overrides == {}
    assert [s.actions_at(e) for e in range(5)] == [[], [], [], ["push"], []]
    assert s.total_epochs == 5
    assert list(s.epochs_since_action("push", 3)) == [0, 1, 2]  # the push at 3 has not run yet
    assert list(s.epochs_since_action("push", 5)) == [3, 4]
    assert Schedule(None, *PROTO).phase_at(0) is None


def test_open_ended_last_phase():
    s = Schedule([{"phase": "vae", "epochs": 3}, {"phase": "consistency"}], ("vae", "consistency"))
    assert [s.phase_at(e).name for e in (0, 2, 3, 50)] == ["vae", "vae", "consistency", "consistency"]


@pytest.mark.parametrize("entries, message", [
    ([{"phase": "pretrain", "epochs": 1}], r"entry 0: unknown phase 'pretrain'; expected one of \('warm'"),
    ([{"phase": "push", "epochs": 2}], "'push' is a one-off step and takes no 'epochs'"),
    ([{"phase": "joint", "epochs": 0}], "'epochs' must be an integer ≥ 1, got 0"),
    ([{"phase": "joint"}, {"phase": "last_layer", "epochs": 1}], "no phase may follow it"),
])
def test_schedule_errors_name_the_entry(entries, message):
    with pytest.raises(ValueError, match=message):
        Schedule(entries, *PROTO)


def test_a_model_validates_its_schedule_at_construction():
    import zoo

    with pytest.raises(ValueError, match="unknown phase 'warm'"):
        zoo.create_model("cnn", schedule=[{"phase": "warm", "epochs": 1}])


def test_epoch_shuffle_sampler_replays_a_seeded_shuffling_dataloader():
    """Epoch e's order is a function of (seed, e) — and the very order the DataLoader(shuffle=True,
    seeded generator) used before gave under Lightning (which reads len(loader) batches an epoch), so
    earlier runs keep their data order."""
    for n, batch_size in ((37, 8), (32, 8)):  # a partial last batch runs RandomSampler to its end, a full one not
        loader = DataLoader(list(range(n)), batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(5))
        before = [torch.cat(list(itertools.islice(loader, len(loader)))).tolist() for _ in range(4)]
        sampler = EpochShuffleSampler(n, seed=5, batch_size=batch_size)
        for epoch in (3, 0, 2, 1):  # any order: no state carried between epochs
            sampler.set_epoch(epoch)
            assert list(sampler) == before[epoch], (n, epoch)
        assert before[0] != before[1]
        sampler.set_epoch(1)
        assert list(sampler) == before[1] and list(sampler) == before[2]  # a pass without set_epoch: the next


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "c.pt")
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    got = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(got[0], expected[0]) and (got[1] == expected[1]).all() and got[2] == expected[2]


def test_an_experiment_overrides_the_entry_configs_own_values(tmp_path):
    """`_self_` comes first in train.yaml, so an experiment's seed and evaluate.* take effect."""
    exp = tmp_path / "conf" / "experiment"
    exp.mkdir(parents=True)
    (exp / "probe.yaml").write_text("# @package _global_\nseed: 7\nevaluate:\n  n_images: 32\n  posthoc: false\n"
                                    "trainer:\n  max_epochs: 2\n")
    cfg = compose([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=probe"], tmp_path / "run")
    assert cfg.seed == 7 and cfg.evaluate.n_images == 32 and cfg.evaluate.posthoc is False
    assert cfg.trainer.max_epochs == 2 and cfg.evaluate.steps == 24  # untouched keys keep their defaults
    assert compose(["seed=3"], tmp_path / "run").seed == 3  # the command line still wins


def test_evaluate_py_errors_like_train_py(tmp_path):
    result = subprocess.run([sys.executable, "evaluate.py", "model_path=cnn-synthetic", "data=breastmnist",
                             f"paths.data_dir={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "ZOO_DATA_DIR": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path / "nowhere" / "breastmnist.npz") in errors[0]


@pytest.mark.parametrize("model, expected", [("cnn", 6), ("protopnet", 8), ("gdvae", 6)])
def test_default_epochs_run_the_whole_schedule(model, expected, tmp_path):
    """trainer.max_epochs=null (the default) → 6 epochs, extended to a longer schedule (ProtoPNet's 8:
    a fixed 6 stopped it after the push, before the last layer was refit); an explicit value wins; the
    run's black-box baseline gets the same budget."""
    import zoo
    from zoo.training import build_trainer, max_epochs

    cfg = compose([f"model={model}"], tmp_path / "run")
    assert cfg.trainer.max_epochs is None
    built = zoo.create_model(model, num_classes=4, in_channels=1, image_size=32)
    assert max_epochs(cfg, built) == expected
    assert build_trainer(cfg, tmp_path / "run", with_callbacks=False, epochs=expected).max_epochs == expected
    assert max_epochs(compose([f"model={model}", "trainer.max_epochs=3"], tmp_path / "run"), built) == 3
    assert max_epochs(compose([f"model={model}", "trainer=fast"], tmp_path / "run"), built) == 1
