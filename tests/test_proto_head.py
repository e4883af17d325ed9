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


def test_teacher_is_an_ema_of_the_prototypes_never_a_gradient_target():
    m = head(teacher_momentum=0.9).train()
    m.set_trainable(m.phase_parts["joint"])
    assert not m.teacher_prototypes.requires_grad
    with torch.no_grad():  # a teacher that differs from the student, so the update is visible
        m.teacher_prototypes.add_(torch.randn_like(m.teacher_prototypes))
    teacher0 = m.teacher_prototypes.clone()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    loss, _, _ = m.loss(batch())
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert m.teacher_prototypes.grad is None and torch.equal(m.teacher_prototypes, teacher0)  # the step left it
    student = m.prototypes.detach().clone()
    assert not torch.allclose(student, teacher0)
    m.on_train_batch_end(None, batch(), 0)  # Lightning's hook after the optimiser step
    torch.testing.assert_close(m.teacher_prototypes, 0.9 * teacher0 + 0.1 * student)
    m.set_trainable(m.phase_parts["last_layer"])  # prototypes frozen: the teacher stays
    before = m.teacher_prototypes.clone()
    m.on_train_batch_end(None, batch(), 0)
    assert torch.equal(m.teacher_prototypes, before)
    with pytest.raises(ValueError, match="teacher_momentum"):
        head(teacher_momentum=1.0)


def test_assignment_targets_come_from_the_teacher():
    z = torch.randn(1, 4, 2, 2)
    student, teacher = torch.eye(4), torch.eye(4)[[1, 2, 3, 0]]
    cos, t_cos = patch_cosine(z, student), patch_cosine(z, teacher)
    _, assigned = assignment_loss(cos, 0.1, 0.04, t_cos)
    assert torch.equal(assigned, t_cos.argmax(-1))
    # the teacher's side carries no gradient: only the student's cosines move the loss
    zz = z.clone().requires_grad_(True)
    terms = protofm_terms(zz, student, torch.tensor([0, 0, 1, 1]), torch.zeros(2, 4), teacher_prototypes=teacher)
    g_with, = torch.autograd.grad(terms["assign"], zz)
    t_ref = (patch_cosine(z, teacher) / 0.04).softmax(-1)
    ref = -(t_ref * F.log_softmax(patch_cosine(zz, student) / 0.1, -1)).sum(-1).mean()
    g_ref, = torch.autograd.grad(ref, zz)
    torch.testing.assert_close(g_with, g_ref)


def tiny_dataset(n=13):
    x = batch(n)["image"]
    return [{"image": x[i], "label": torch.tensor(i % 3), "index": torch.tensor(100 + i)} for i in range(n)]


def test_nearest_patch_of_a_prototype_equal_to_a_training_patch_is_that_patch():
    from zoo.models.prototypes.proto_head import nearest_patches
    from zoo.models.prototypes.rf import receptive_field

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 8, 4, stride=4, bias=False)  # 32 px → 8×8 tokens that differ patch to patch
    data = tiny_dataset()
    with torch.no_grad():
        z = conv(torch.stack([d["image"] for d in data]))  # (13,8,8,8)
    protos = torch.randn(6, 8)
    protos[4] = z[7, :, 3, 5] * 2.5  # prototype 4 = training image 7's patch (3,5), up to scale (cosine)
    found = nearest_patches(conv, protos, data, receptive_field(conv), 32, k=3, batch_size=5)  # 3 chunks
    assert found.position[4, 0] == 7 and found.index[4, 0] == 107
    assert found.location[4, 0].tolist() == [3, 5]
    assert found.similarity[4, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert found.box[4, 0].tolist() == [12, 20, 15, 23] == found.cell[4, 0].tolist()  # 4×4 field = its cell
    # every prototype: the brute-force best cell per image, top 3 images, nearest first
    cos = patch_cosine(z, protos).max(dim=1).values  # (13,P)
    top = cos.T.topk(3, dim=1)
    torch.testing.assert_close(found.similarity, top.values)
    assert torch.equal(found.position, top.indices)
    # the model's own search: its features and receptive field
    m = head().eval()
    with torch.no_grad():
        m.prototypes[2] = m.features(data[5]["image"][None])[0, :, 6, 1]
    got = m.nearest_training_patches(data, k=2, batch_size=4)
    assert got.similarity.shape == (m.num_prototypes, 2)
    assert got.similarity[2, 0].item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="k must be"):
        nearest_patches(conv, protos, data, receptive_field(conv), 32, k=0)


def test_default_exact_map_stays_in_the_tokens_patches():
    m = head().eval()
    x = batch(3)["image"]
    e = m.explain(x, torch.tensor([0, 1, 2]))
    with torch.no_grad():
        where = m._parts(m.features(x))["where"]  # (B,P) flat locations on the 8×8 grid
    cells = torch.zeros(3, 64)
    cells.scatter_(1, where, 1.0)
    inside = cells.view(3, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3) > 0
    assert (e.attribution[~inside] == 0).all()  # nothing outside the attained tokens' own patches
    torch.testing.assert_close(e.attribution.sum((1, 2, 3)), e.logits.gather(1, e.target[:, None])[:, 0])
    rf_map = m.explain(x, torch.tensor([0, 1, 2]), spread="receptive_field").attribution
    assert (rf_map[~inside] != 0).any()  # the receptive-field spread (network.py's default) leaves them


def test_fit_draws_the_nearest_patch_figure(tmp_path):
    import lightning as L
    import matplotlib.image as mpimg

    from zoo.data import SyntheticDataModule

    dm = SyntheticDataModule(n_train=48, n_val=16, n_test=16, batch_size=16, num_classes=3, seed=0)
    m = head(schedule=[{"phase": "joint", "epochs": 1}], neighbours=3)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(m, datamodule=dm)
    png = tmp_path / "figures" / "prototype-neighbours.png"
    assert png.is_file()
    img = mpimg.imread(png)[..., :3]
    assert img.std() > 0.05 and (img < 0.5).mean() > 0.05  # drawn crops, not a blank page
