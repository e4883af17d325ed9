"""ProtoFM head: the objective's terms, their gradients, constructed cases, and a frozen backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.models.prototypes.protofm_losses import (alignment_loss, assignment_loss, contrastive_loss, patch_cosine,
                                                  protofm_terms)

GEOM = dict(num_classes=3, in_channels=1, image_size=32)
SMALL = dict(widths=(8, 16, 16), prototype_dim=8, prototypes_per_class=2)


def head(**kw):
    torch.manual_seed(0)
    return zoo.create_model("proto_head", **GEOM, **SMALL, **kw)


def batch(n=6):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 1, 32, 32, generator=g) * 2 - 1, "label": torch.arange(n) % 3}


def test_no_silent_default_backbone_checkpoint():
    import inspect
    from zoo.models.prototypes.proto_head import ProtoHead
    assert inspect.signature(ProtoHead).parameters["backbone_checkpoint"].default is None


def test_loss_has_the_protofm_terms_and_their_gradients_reach_the_right_parameters():
    m = head().train()
    loss, logits, logs = m.loss(batch())
    assert {"ce", "assign", "align", "contrast", "sparsity"} <= set(logs)
    assert "clst" not in logs and "sep" not in logs  # not ProtoPNet's objective
    z = m.features(batch()["image"])
    terms = protofm_terms(z, m.prototypes, m.prototype_class, m.last_layer.weight)
    reach = {"assign": ("add_on", "prototypes"), "align": ("add_on", "prototypes"), "contrast": ("prototypes",),
             "sparsity": ("last_layer",)}
    for name, parts in reach.items():
        m.zero_grad(set_to_none=True)
        terms[name].backward(retain_graph=True)
        got = {n.split(".")[0] for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert got == set(parts), (name, got)


def test_constructed_cases():
    protos = torch.eye(4)  # orthogonal prototypes, two classes
    cls = torch.tensor([0, 0, 1, 1])
    assert contrastive_loss(protos, cls).item() == 0.0
    assert contrastive_loss(torch.ones(4, 4), cls).item() == pytest.approx(1.0)
    z = (3 * torch.eye(4)[torch.tensor([0, 2, 3, 1])]).T.reshape(1, 4, 2, 2)  # each patch = a prototype's direction
    cos = patch_cosine(z, protos)
    _, assigned = assignment_loss(cos, 0.1, 0.04)
    assert assigned.flatten().tolist() == [0, 2, 3, 1]
    assert alignment_loss(cos, assigned).item() == pytest.approx(0.0, abs=1e-6)
    # the student's CE against a sharper detached teacher ≥ the teacher's entropy, equal when τ's coincide
    a, _ = assignment_loss(cos, 0.1, 0.04)
    t = (cos / 0.04).softmax(-1)
    assert a.item() >= -(t * t.clamp_min(1e-12).log()).sum(-1).mean().item()
    with pytest.raises(ValueError, match="teacher_temp < student_temp"):
        assignment_loss(cos, 0.1, 0.1)


def test_backbone_never_trains():
    m = head().train()
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
    for phase in ("joint", "last_layer"):
        m.set_trainable(m.phase_parts[phase])
        loss, _, _ = m.loss(batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not any(p.requires_grad for p in m.backbone.parameters())
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(before[k], v), k
