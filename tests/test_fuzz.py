"""Fuzz: ``explain()`` of every registered model on inputs of random shapes, dtypes and ranges either
works or raises one clear ValueError naming the problem (never a shape error deep inside a conv)."""

from __future__ import annotations

import pytest
import torch

import zoo

GEOMETRY = dict(num_classes=3, in_channels=1, image_size=32)
MODELS = zoo.list_models()


def cases(seed: int = 0, n: int = 12):
    """(name, input, valid) triples: a few hand-picked wrong inputs plus random draws around them."""
    g = torch.Generator().manual_seed(seed)
    good = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    fixed = [
        ("valid", good, True),
        ("valid single image", good[:1], True),
        ("0..255 scale", (good + 1) * 127.5, False),
        ("uint8", ((good + 1) * 127.5).to(torch.uint8), False),
        ("float64", good.double(), False),
        ("NaN", good.masked_fill(good > 0.9, float("nan")), False),
        ("+inf", good.masked_fill(good > 0.9, float("inf")), False),
        ("3 channels", good.expand(2, 3, 32, 32).contiguous(), False),
        ("28 px", good[..., :28, :28], False),
        ("no batch dim", good[0], False),
        ("empty batch", good[:0], False),
        ("5-d", good[None], False),
    ]
    rand = []
    for i in range(n):
        b = int(torch.randint(1, 4, (1,), generator=g))
        c = int(torch.randint(1, 4, (1,), generator=g))
        s = int(torch.tensor([16, 28, 32, 33])[torch.randint(0, 4, (1,), generator=g)])
        scale = float(torch.tensor([0.5, 1.0, 3.0, 255.0])[torch.randint(0, 4, (1,), generator=g)])
        x = (torch.rand(b, c, s, s, generator=g) * 2 - 1) * scale
        rand.append((f"random {b}×{c}×{s}² ×{scale:g}", x, c == 1 and s == 32 and scale <= 1.0))
    return fixed + rand


CASES = cases()


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    torch.manual_seed(0)
    return zoo.create_model(request.param, **GEOMETRY).eval()


def test_explain_works_or_raises_one_clear_value_error(model):
    ran = 0
    for name, x, valid in CASES:
        if model.input_kind != "image":  # graph models: any image tensor is the wrong input kind
            valid = False
        try:
            expl = model.explain(x)
        except ValueError as err:
            assert not valid, f"{model.model_name} rejected a valid input ({name}): {err}"
            message = str(err)
            assert message.startswith(f"{model.model_name}:") and "\n" not in message, (name, message)
        else:
            assert valid, f"{model.model_name} accepted an invalid input ({name})"
            assert torch.isfinite(expl.logits).all()
        ran += 1
    assert ran == len(CASES) == 24
