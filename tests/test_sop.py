"""Sum-of-Parts (`sop`) and its additive comparison model (`patch_additive`).

What can fail here: sparsemax against hand-computed projections and its Jacobian, the exact
decomposition (group contributions add up to the logits, the attribution map sums to the target
logit), the binary masks and their size k·N, the non-overlapping index map, the cost (M + 1 backbone
forwards per explained batch), chunking invariance, the straight-through estimator (same forward,
gradients reach the generator), the training phases (freezing, BatchNorm kept in eval, the loss of
each phase), loading a zoo backbone checkpoint, the group metrics on constructed cases (purity,
true IoU ≠ coverage), the figure, patch independence of the additive model, errors, learning.
"""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.metrics import groups as G
from zoo.models.sop import sparsemax

GEOM = dict(num_classes=3, in_channels=1, image_size=32)
SEED = 0  # of the learning test; its thresholds sit far below what seeds 0, 1 and 2 give (issue #13)


def _sop(**kw):
    torch.manual_seed(0)
    return zoo.create_model("sop", **{**GEOM, **kw}).eval()


def _images(n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g) * 2 - 1


# ---------------------------------------------------------------------- sparsemax
def test_sparsemax_hand_computed_cases():
    z = torch.tensor([[1.2, 1.0, 0.1], [1.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    expected = torch.tensor([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(sparsemax(z), expected)
    # Any dim; rows are on the simplex.
    out = sparsemax(torch.randn(4, 7, 5), dim=1)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(1), torch.ones(4, 5))


def test_sparsemax_jacobian_is_exact():
    z = torch.tensor([[0.3, 0.1, -0.4, 0.25]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sparsemax(t), (z,))
    # Analytic Jacobian on the support S: I - 1/|S|, zero elsewhere.
    jac = torch.autograd.functional.jacobian(lambda t: sparsemax(t)[0], z)[:, 0]
    support = sparsemax(z)[0] > 0
    s = support.sum()
    expected = torch.zeros(4, 4, dtype=torch.float64)
    idx = support.nonzero().squeeze(1)
    expected[idx[:, None], idx[None, :]] = -1.0 / float(s)
    expected[idx, idx] += 1.0
    torch.testing.assert_close(jac, expected)


# ---------------------------------------------------------------------- the decomposition
def test_contributions_add_up_and_map_sums_to_logit():
    model = _sop()
    x = _images(4)
    expl = model.explain(x)
    torch.testing.assert_close(expl.contributions.sum(-1) + expl.bias, expl.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expl.logits, model(x), rtol=1e-5, atol=1e-5)
    target_logit = expl.logits.gather(1, expl.target[:, None])[:, 0]
    torch.testing.assert_close(expl.attribution.sum(dim=(1, 2, 3)), target_logit, rtol=1e-4, atol=1e-4)
    # contributions are α·c·z, from the returned parts
    alpha, c, z = expl.group_weights, expl.extras["group_scales"], expl.extras["group_logits"]
    torch.testing.assert_close(expl.contributions, (alpha * c[..., None] * z).transpose(1, 2))
    torch.testing.assert_close(alpha.sum(1), torch.ones(4, 3))  # one distribution over groups per class


def test_group_masks_binary_sized_and_index_map_consistent():
    model = _sop(num_groups=5, group_fraction=0.25)
    expl = model.explain(_images(3))
    masks = expl.group_masks
    assert masks.shape == (3, 5, 32, 32)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    # 0.25 · 64 cells = 16 cells of 4×4 px per group
    torch.testing.assert_close(masks.sum(dim=(2, 3)), torch.full((3, 5), 16.0 * 16))
    index = expl.extras["group_index"]
    covered = masks.bool().any(1)
    assert ((index == -1) == ~covered).all()
    picked = masks.gather(1, index.clamp(min=0)[:, None])[:, 0]
    assert (picked[covered] == 1).all()  # each pixel's group covers it
    # and it is the covering group with the largest contribution to the target
    c_t = expl.contributions[torch.arange(3), expl.target]  # (B,M)
    best = torch.where(masks.bool(), c_t[..., None, None], torch.tensor(-torch.inf)).amax(1)
    torch.testing.assert_close(c_t.gather(1, index.clamp(min=0).flatten(1)).view_as(best)[covered], best[covered])


def test_masked_input_is_what_each_group_sees():
    # z_m must be the backbone's logits on x ⊙ g_m (+ fill outside): recompute one group by hand.
    model = _sop(num_groups=3)
    x = _images(2)
    expl = model.explain(x)
    g = expl.group_masks[1, 2]
    fill = x[1].mean()
    masked = x[1] * g + (1 - g) * fill
    torch.testing.assert_close(model.backbone_logits(masked[None])[0], expl.extras["group_logits"][1, 2],
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- cost and chunking
def test_explain_costs_m_plus_one_backbone_forwards():
    model = _sop(num_groups=6, chunk_size=5)
    seen = []
    handle = model.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    model.explain(_images(4))
    handle.remove()
    assert sum(seen) == (6 + 1) * 4  # images through the backbone: the clean batch + one per group
    assert max(seen) <= 5  # chunked (the clean batch of 4 is one call)


def test_chunking_does_not_change_the_result():
    x = _images(3)
    a = _sop(chunk_size=512).explain(x)
    b = _sop(chunk_size=2).explain(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.contributions, b.contributions, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- training
def test_straight_through_keeps_forward_and_trains_the_generator():
    x, y = _images(4), torch.tensor([0, 1, 2, 0])
    outs = {}
    for st in (True, False):
        model = _sop(straight_through=st).train()
        model.enter_phase("sop")
        loss, logits, _ = model.loss({"image": x, "label": y})
        loss.backward()
        outs[st] = (logits.detach(), model.gen_key.weight.grad, model.row_score.weight.grad, model.backbone)
        assert all(p.grad is None for p in model.backbone.parameters())  # frozen in the sop phase
        assert model.sel_query.weight.grad.abs().sum() > 0
    torch.testing.assert_close(outs[True][0], outs[False][0])  # ST changes gradients only
    assert outs[True][2].abs().sum() > 0 and outs[False][2].abs().sum() > 0  # the scorer learns through c_m
    # the key projection gets a gradient through the masks only with straight-through (c_m reaches it too,
    # so compare magnitudes: ST adds a term)
    assert not torch.allclose(outs[True][1], outs[False][1])


def test_phases_freeze_and_keep_batchnorm_in_eval():
    model = _sop().train()
    model.enter_phase("backbone")
    assert all(p.requires_grad for p in model.backbone.parameters()) and model.backbone.training
    x, y = _images(4), torch.tensor([0, 1, 2, 0])
    loss, logits, logs = model.loss({"image": x, "label": y})
    torch.testing.assert_close(logits, model.backbone_logits(x))  # backbone phase: the plain classifier
    assert float(logs["phase"]) == 0
    model.enter_phase("sop")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert not model.backbone.training and model.gen_query.training  # BN statistics frozen
    ft = _sop(finetune_backbone=True).train()
    ft.enter_phase("sop")
    assert all(p.requires_grad for p in ft.backbone.parameters()) and ft.backbone.training
    with pytest.raises(ValueError, match="unknown phase 'push'; expected one of \\('backbone', 'sop'\\)"):
        _sop(schedule=[{"phase": "push", "epochs": 1}])


def test_phase_for_epoch_and_per_phase_cosine():
    model = _sop(schedule=[{"phase": "backbone", "epochs": 2}, {"phase": "sop", "epochs": 3}])
    assert [model.training_schedule.phase_at(e).name for e in range(7)] == ["backbone"] * 2 + ["sop"] * 5
    def backbone_f(e):
        return model.phase_lr_factor(e, "backbone")

    def sop_f(e):
        return model.phase_lr_factor(e, "sop")

    assert backbone_f(0) == 1.0 and sop_f(2) == 1.0  # each phase starts its own cycle at full lr
    assert backbone_f(2) == pytest.approx(model.hparams.backbone_lr_scale)  # backbone lr scaled in sop
    assert sop_f(3) == pytest.approx(0.75)  # cosine within the 3-epoch sop phase


def test_backbone_init_from_a_saved_zoo_cnn(tmp_path):
    torch.manual_seed(3)
    cnn = zoo.create_model("cnn", **GEOM)
    folder = zoo.save(cnn, tmp_path / "cnn")
    model = _sop(backbone_init=str(folder))
    model.load_backbone(str(folder))
    for a, b in zip(model.backbone.state_dict().values(), cnn.backbone.state_dict().values()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(model.backbone_logits(_images(2)), cnn.eval()(_images(2)))
    mismatch = zoo.save(zoo.create_model("cnn", **GEOM, widths=(8, 16, 32)), tmp_path / "small")
    with pytest.raises(ValueError, match="does not match this SOP's backbone"):
        model.load_backbone(str(mismatch))
    with pytest.raises(FileNotFoundError, match="no saved model"):
        model.load_backbone(str(tmp_path / "missing"))


def test_bad_hyperparameters_give_clear_errors():
    with pytest.raises(ValueError, match=r"num_groups \(80\) exceeds the number of patch tokens \(64"):
        _sop(num_groups=80)
    with pytest.raises(ValueError, match="group_fraction"):
        _sop(group_fraction=1.5)
    with pytest.raises(ValueError, match="patch_size must divide image_size"):
        _sop(patch_size=5)
    with pytest.raises(ValueError, match="mask_fill"):
        _sop(mask_fill="zeros")


def test_patch_size_sets_the_token_grid():
    model = _sop(patch_size=8, num_groups=4, group_fraction=0.25)
    expl = model.explain(_images(2))
    assert model.grid == (4, 4)
    torch.testing.assert_close(expl.group_masks.sum(dim=(2, 3)), torch.full((2, 4), 4.0 * 64))


@pytest.mark.slow
def test_timm_vit_backbone_keeps_the_decomposition():
    model = _sop(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "patch_size": 4},
                 num_groups=4)
    expl = model.explain(_images(2))
    assert model.grid == (8, 8)
    torch.testing.assert_close(expl.contributions.sum(-1), expl.logits, rtol=1e-4, atol=1e-4)


def _learn_tiny_synthetic(seed: int) -> dict[str, float]:
    """SOP (5 backbone epochs, 1 SOP epoch) on 1024 synthetic images of 4 classes without distractors:
    the test accuracy of the SOP and of its backbone's own classifier. (With the default 2 distractors
    per image the 5-epoch backbone reached only 0.86 at seed 1: too close to any useful threshold.)"""
    import lightning as L

    from zoo.data import SyntheticDataModule

    L.seed_everything(seed, verbose=False)
    dm = SyntheticDataModule(n_train=1024, n_val=64, n_test=256, batch_size=64, distractors=0, seed=seed)
    model = zoo.create_model("sop", num_classes=4, in_channels=1, image_size=32, num_groups=4, lr=3e-3,
                             schedule=[{"phase": "backbone", "epochs": 5}, {"phase": "sop", "epochs": 1}])
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        backbone_acc = (model.eval().backbone_logits(batch["image"]).argmax(1) == batch["label"]).float().mean()
    return {"acc": float(acc), "backbone_acc": float(backbone_acc)}


@pytest.mark.slow
def test_sop_learns_on_tiny_synthetic_data():
    """Seeds 0/1/2: SOP test accuracy 0.94/0.91/0.96, backbone 0.95/0.92/1.0; the thresholds leave a wide
    margin for cross-machine differences and sit far above chance (0.25)."""
    got = _learn_tiny_synthetic(SEED)
    acc, backbone_acc = got["acc"], got["backbone_acc"]
    assert backbone_acc >= 0.7, f"the backbone phase did not learn ({backbone_acc:.2f}); chance is 0.25"
    assert acc >= 0.7, f"SOP test accuracy {acc:.2f} (backbone {backbone_acc:.2f}); chance is 0.25"


# ---------------------------------------------------------------------- group metrics
def test_purity_and_true_iou_on_constructed_masks():
    evidence = torch.zeros(1, 1, 4, 4)
    evidence[..., :2, :2] = 1  # 4 evidence pixels
    groups = torch.zeros(1, 3, 4, 4)
    groups[0, 0, :2, :2] = 1  # exactly the evidence
    groups[0, 1, :2, :] = 1  # the evidence + 4 other pixels
    groups[0, 2] = 1  # the whole image
    torch.testing.assert_close(G.group_purity(groups, evidence), torch.tensor([[1.0, 0.5, 0.25]]))
    torch.testing.assert_close(G.group_iou(groups, evidence), torch.tensor([[1.0, 0.5, 0.25]]))
    # coverage (the anchor's "IoU") would call the whole image perfect; true IoU does not
    torch.testing.assert_close(G.group_coverage(groups, evidence), torch.tensor([[1.0, 1.0, 1.0]]))
    half = torch.zeros(1, 1, 4, 4)
    half[0, 0, 0, :2] = 1  # half of the evidence, nothing else
    assert float(G.group_purity(half, evidence)) == 1.0 and float(G.group_iou(half, evidence)) == 0.5
    report = G.group_report(groups, torch.tensor([[0.1, 2.0, -1.0]]), evidence)
    assert report["purity_top"] == 0.5 and report["iou_best"] == 1.0
    assert report["purity_weighted"] == pytest.approx((0.1 * 1.0 + 2.0 * 0.5) / 2.1)
    empty = torch.zeros(1, 1, 4, 4)
    assert torch.isnan(G.group_purity(groups, empty)).all() and torch.isnan(G.group_iou(groups, empty)).all()
    with pytest.raises(ValueError, match="does not match group masks"):
        G.group_purity(groups, torch.zeros(2, 1, 4, 4))


# ---------------------------------------------------------------------- figure
def test_group_figure_titles_carry_the_contributions():
    model = _sop(num_groups=4)
    expl = model.explain(_images(2))
    fig = expl.plot(max_items=2, top_groups=3)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    titles = [ax.get_title() for ax in panels]
    assert len(panels) == 2 * (2 + 3) and len(fig.axes) > len(panels)  # + the stated-scale colour bar
    c = expl.contributions[0, int(expl.target[0])]
    top = int(c.abs().argmax())
    assert f"group {top}: {float(c[top]):+.2f}" in titles[2]
    import matplotlib.pyplot as plt

    plt.close(fig)


# ---------------------------------------------------------------------- the additive comparison model
def test_patch_additive_is_additive_and_patches_are_independent():
    torch.manual_seed(0)
    model = zoo.create_model("patch_additive", **GEOM).eval()
    x = _images(2)
    expl = model.explain(x)
    torch.testing.assert_close(expl.contributions.sum(-1) + expl.bias, expl.logits, rtol=1e-5, atol=1e-5)
    y = x.clone()
    y[:, :, :8, :8] = -1  # change the top-left patch only
    changed = model.explain(y).patch_logits - expl.patch_logits  # (B,K,4,4)
    assert changed[:, :, 0, 0].abs().max() > 0
    changed[:, :, 0, 0] = 0
    assert changed.abs().max() == 0  # no other patch moves
    with pytest.raises(ValueError, match="patch_size must be ≥ 4 and divide image_size"):
        zoo.create_model("patch_additive", **GEOM, patch_size=6)
    # default: a 4×4 grid at any size divisible by 4 (28 px MedMNIST → 7 px patches)
    medmnist = zoo.create_model("patch_additive", **{**GEOM, "image_size": 28}).eval()
    expl = medmnist.explain(torch.rand(2, GEOM["in_channels"], 28, 28) * 2 - 1)
    assert medmnist.patch_size == 7 and expl.patch_logits.shape[-2:] == (4, 4)
    torch.testing.assert_close(expl.contributions.sum(-1) + expl.bias, expl.logits, rtol=1e-5, atol=1e-5)


def test_both_attribution_maps_sum_to_the_logit_and_cells_mode_is_cell_aligned():
    x = _images(3)
    model = _sop(mask_resolution="cells")
    area, att = model.explain(x), model.explain(x, attribution_map="attention")
    logit = area.logits.gather(1, area.target[:, None])[:, 0]
    for expl in (area, att):
        torch.testing.assert_close(expl.attribution.sum(dim=(1, 2, 3)), logit, rtol=1e-4, atol=1e-4)
    # attention map: zero outside the union of the groups, different from the even spread
    assert (att.attribution[:, 0][~area.group_masks.bool().any(1)] == 0).all()
    assert not torch.allclose(area.attribution, att.attribution)
    # cells mode: masks are unions of whole 4×4 cells
    blocks = area.group_masks.unfold(2, 4, 4).unfold(3, 4, 4)  # (B,M,8,8,4,4)
    assert ((blocks.amin((-1, -2)) == blocks.amax((-1, -2)))).all()
    with pytest.raises(ValueError, match="attribution_map must be 'area' or 'attention'"):
        model.explain(x, attribution_map="gradcam")
    with pytest.raises(ValueError, match="mask_resolution must be 'cells' or 'pixels'"):
        _sop(mask_resolution="subpixel")


# ---------------------------------------------------------------------- the published checkpoint
def test_published_sop_synthetic_checkpoint_is_accurate_and_exact():
    from zoo.data import SyntheticDataModule

    if "sop-synthetic" not in zoo.list_pretrained():
        pytest.skip("checkpoints/sop-synthetic not published")
    model = zoo.load("sop-synthetic")
    # Test sets of seeds 123/124/125: accuracy 0.99/0.99/1.0, top-group purity 0.36/0.35/0.34 (chance ≈ 0.04,
    # the evidence's area share).
    dm = SyntheticDataModule(n_train=64, n_val=64, n_test=128, batch_size=128, seed=123 + SEED)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    expl = model.explain(batch["image"])
    torch.testing.assert_close(expl.contributions.sum(-1) + expl.bias, expl.logits, rtol=1e-5, atol=1e-5)
    acc = (expl.logits.argmax(1) == batch["label"]).float().mean()
    assert acc >= 0.9, f"sop-synthetic accuracy {acc:.3f} on fresh synthetic images; chance is 0.25"
    # its groups sit on the evidence: the top group of most images overlaps the ground truth
    top = expl.contributions[torch.arange(128), expl.target].argmax(1)
    purity = G.group_purity(expl.group_masks, batch["mask"]).gather(1, top[:, None])
    assert float(torch.nanmean(purity)) > 0.2
