"""One contract, checked for every registered model (timm-style): forward, explain, save/load, errors."""

from __future__ import annotations

import pytest
import torch

import zoo

GEOMETRY = dict(num_classes=3, in_channels=1, image_size=32)
MODELS = zoo.list_models()


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    torch.manual_seed(0)
    return zoo.create_model(request.param, **GEOMETRY).eval()


def test_registry_lists_baselines():
    assert {"cnn", "timm"} <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'nope'; available: .*cnn"):
        zoo.create_model("nope")


def test_forward_returns_plain_logits(model):
    x = model.example_input(2)
    logits = model(x)
    assert type(logits) is torch.Tensor and logits.shape == (2, GEOMETRY["num_classes"])
    assert torch.isfinite(logits).all()


def test_explain_fields(model):
    x = model.example_input(2)
    expl = model.explain(x)
    assert isinstance(expl, zoo.Explanation)
    assert expl.kind == model.explanation_kind
    torch.testing.assert_close(expl.logits, model(x), rtol=1e-4, atol=1e-4)
    assert expl.target.shape == (2,) and expl.target.dtype == torch.long
    torch.testing.assert_close(expl.target, expl.logits.argmax(1))
    if expl.kind != "node-context" and model.input_kind == "image":  # graph models have no pixel map
        assert expl.attribution is not None
        assert expl.attribution.shape == (2, 1, *x.shape[-2:])
        assert torch.isfinite(expl.attribution).all()
        assert expl.to_captum().shape == x.shape
        assert expl.to_quantus().shape == (2, 1, *x.shape[-2:])
    if expl.contributions is not None:  # additive families: the parts add up to the logits
        bias = 0 if expl.bias is None else expl.bias
        torch.testing.assert_close(expl.contributions.sum(-1) + bias, expl.logits, rtol=1e-4, atol=1e-4)
    # An explicit target is honoured.
    forced = model.explain(x, target=1)
    assert (forced.target == 1).all()


def test_save_load_round_trip(model, tmp_path):
    x = model.example_input(2)
    folder = zoo.save(model, tmp_path / "saved", metrics={"acc": 0.5})
    assert {"model.safetensors", "config.yaml", "card.md"} <= {p.name for p in folder.iterdir()}
    loaded = zoo.load(folder)
    assert not loaded.training
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_bad_inputs_give_clear_errors(model):
    if model.input_kind != "image":
        pytest.skip("graph models check their own inputs")
    good = model.example_input(2)
    with pytest.raises(ValueError, match="input channel"):
        model(good.repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match=r"expected 32×32 images, got 30×30"):
        model(good[..., :30, :30])
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad)
    with pytest.raises(ValueError, match=r"expected images \(B,C,H,W\)"):
        model(good[0])
    with pytest.raises(ValueError, match="target class out of range"):
        model.explain(good, target=7)


def test_load_unknown_name_lists_pretrained():
    with pytest.raises(FileNotFoundError, match="no pretrained model of that name"):
        zoo.load("no-such-model")


def test_labels_out_of_range_are_rejected():
    model = zoo.create_model("cnn", **GEOMETRY)
    batch = {"image": torch.zeros(2, 1, 32, 32), "label": torch.tensor([0, 5])}
    with pytest.raises(ValueError, match=r"label out of range: got labels in \[0, 5\], expected 0..2"):
        model.training_step(batch, 0)
