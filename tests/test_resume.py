"""Exact resume: a run interrupted (by max_epochs in the middle of a phase, or by Ctrl+C in the middle
of an epoch) and resumed with ``resume=true`` ends with the weights and the metrics.csv history of an
uninterrupted run of the same seed — bit for bit on CPU."""

from __future__ import annotations

import signal

import pytest
import torch

import zoo
from conftest import compose
from zoo.training import train

TINY = ["data.n_train=96", "data.n_val=32", "data.n_test=32", "data.batch_size=32", "callbacks=default",
        "~callbacks.explanation_figures", "~callbacks.progress", "evaluate.explanations=false",
        "evaluate.compare_baseline=false", "trainer.log_every_n_steps=1"]
PROTO = ["model.widths=[8,16]", "model.prototype_dim=8", "model.prototypes_per_class=2", "model.push_batch_size=32"]
JOINT_PUSH_LAST = "model.schedule=[{phase:joint,epochs:2,clst_weight:0.0,sep_weight:0.0},{phase:push},{phase:last_layer,epochs:2}]"

# family → (overrides, epochs of the full run, where the first run stops: after that many epochs
# (max_epochs), or Ctrl+C at (epoch, batch) for a learning rate that follows max_epochs (cosine)).
FAMILIES = {
    "protopnet": (["model=protopnet", *PROTO, JOINT_PUSH_LAST], 4, 3),  # stops in last_layer, after the push
    "prob_protopnet": (["model=prob_protopnet", *PROTO, "model.n_samples=2", JOINT_PUSH_LAST], 4, 1),  # mid-joint
    "proto_head": (["model=proto_head", "model.widths=[8,16]", "model.backbone_checkpoint=null", "model.prototype_dim=8",
                    "model.prototypes_per_class=2", "model.push_batch_size=32",
                    "model.schedule=[{phase:joint,epochs:2},{phase:push},{phase:last_layer,epochs:2}]"], 4, 1),
    "sop": (["model=sop", "model.widths=[8,16,16]", "model.num_groups=2", "model.attn_dim=8",
             "model.schedule=[{phase:backbone,epochs:2},{phase:sop,epochs:2}]"], 4, 3),  # stops in sop, backbone frozen
    # with figures every epoch: drawing them consumes RNG, and the resumed run must continue after that
    "gdvae": (["+callbacks.explanation_figures._target_=zoo.callbacks.ExplanationFigures",
               "+callbacks.explanation_figures.every_n_epochs=1", "+callbacks.explanation_figures.n_images=2",
               "model=gdvae", "model.widths=[8,16,16]", "model.latent_dim=8", "model.class_dims=4",
               "model.schedule=[{phase:vae,epochs:1},{phase:consistency}]"], 3, (2, 1)),  # in consistency
}


def _weights(run) -> dict[str, torch.Tensor]:
    return zoo.load(run / "model").state_dict()


def _assert_same_run(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name}: max |Δ| {float((wa[name].float() - wb[name].float()).abs().max())}"
    csv_a, csv_b = (run / "csv" / "metrics.csv" for run in (a, b))
    assert csv_b.read_text() == csv_a.read_text(), "metrics.csv of the resumed run differs from the uninterrupted one"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_resume_mid_phase_equals_an_uninterrupted_run(family, tmp_path):
    overrides, epochs, stop = FAMILIES[family]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(compose([*TINY, *overrides, f"trainer.max_epochs={epochs}"], full))
    if isinstance(stop, int):
        train(compose([*TINY, *overrides, f"trainer.max_epochs={stop}"], resumed))
    else:
        _interrupted_run([*TINY, *overrides, f"trainer.max_epochs={epochs}"], resumed, *stop)
    train(compose([*TINY, *overrides, f"trainer.max_epochs={epochs}", "resume=true"], resumed))
    _assert_same_run(full, resumed)


def _interrupted_run(overrides: list[str], run, epoch: int, batch: int) -> None:
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown on KeyboardInterrupt
            train(compose([*overrides, "+callbacks.interrupt._target_=probes.InterruptAt",
                           f"+callbacks.interrupt.epoch={epoch}", f"+callbacks.interrupt.batch={batch}"], run))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT from then on


def test_cnn_resumed_after_ctrl_c_mid_epoch_equals_an_uninterrupted_run(tmp_path):
    base = [*TINY, "model=cnn", "model.widths=[8,16,16]", "trainer.max_epochs=3"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(compose(base, full))
    _interrupted_run(base, resumed, epoch=1, batch=1)
    train(compose([*base, "resume=true"], resumed))
    _assert_same_run(full, resumed)


def test_resume_refuses_another_schedule(tmp_path):
    overrides = ["model=protopnet", *PROTO]
    train(compose([*TINY, *overrides, "trainer.max_epochs=1",
                   "model.schedule=[{phase:joint,epochs:1},{phase:push},{phase:last_layer,epochs:1}]"], tmp_path))
    with pytest.raises(ValueError, match="trained with schedule .* resume with the same model.schedule"):
        train(compose([*TINY, *overrides, "trainer.max_epochs=2", "resume=true",
                       "model.schedule=[{phase:joint,epochs:2}]"], tmp_path))


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume checkpoint not found: .*last.ckpt"):
        train(compose([*TINY, "resume=true"], tmp_path))
