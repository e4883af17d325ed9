"""Patch-based families: MedicalPatchNet (`patchnet`) and BagNet (`bagnet`).

What can fail here: the decomposition identities (patch / location logits add up to the logits,
attribution maps average to the logit), patch independence, the receptive fields, the one-pass
dense map against the naive shift-averaging definition, error messages, learning on tiny data, and
the shipped checkpoints' accuracy.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.metrics.localization import hit_rate
from zoo.nets.patches import PatchCNN, place_map, splat_windows, to_patches

GEOM = dict(num_classes=3, in_channels=1, image_size=32)
# Seed of the learning test (data and init). Its thresholds sit far below what seeds 0, 1 and 2 give, so
# cross-machine numerical differences (a different seed in effect) cannot flip it (issue #13).
SEED = 0


def _model(name: str, **kw):
    torch.manual_seed(0)
    params = {**GEOM, **kw}
    return zoo.create_model(name, **params).eval()


def _images(n: int = 3, size: int = 32, channels: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


def _target_logit(expl) -> torch.Tensor:
    return expl.logits.gather(1, expl.target[:, None])[:, 0]


# ---------------------------------------------------------------------- shared helpers
def test_place_map_constructed_case():
    # Two centres on a 5-px axis at 1 and 3: pixels 0,1,2 → centre 0 (tie at 2 → lower), 3,4 → centre 1.
    values = torch.tensor([[[[1.0, 2.0]]]])  # (1,1,1,2): one row, two columns
    out = place_map(values, [2.0], [1.0, 3.0], (1, 5))
    # Cells of 3 and 2 px; scale = H·W/(h·w·|cell|) = 5/(2·3) and 5/(2·2).
    expected = torch.tensor([1 * 5 / 6] * 3 + [2 * 5 / 4] * 2).view(1, 1, 1, 5)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.mean(), values.mean())


def test_splat_windows_averages_covering_windows():
    # 1-D along width: 3 windows of size 2 at stride 1 on 4 px, values 0, 3, 6.
    values = torch.tensor([0.0, 3.0, 6.0]).view(1, 1, 1, 3)
    out = splat_windows(values, 2, 1, (2, 4))  # windows are 2×2 at rows 0..1
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 1.5, 4.5, 6.0]))


@pytest.mark.parametrize("stride", [1, 2])
def test_splat_windows_matches_brute_force(stride):
    """Stride 1 takes a box-filter path, other strides fold: both = mean over covering windows."""
    g = torch.Generator().manual_seed(0)
    P, h, w = 3, 4, 5
    values = torch.randn(2, 2, h, w, generator=g)
    H, W = (h - 1) * stride + P, (w - 1) * stride + P
    total, count = torch.zeros(2, 2, H, W), torch.zeros(H, W)
    for i in range(h):
        for j in range(w):
            total[:, :, i * stride:i * stride + P, j * stride:j * stride + P] += values[:, :, i:i + 1, j:j + 1]
            count[i * stride:i * stride + P, j * stride:j * stride + P] += 1
    torch.testing.assert_close(splat_windows(values, P, stride, (H, W)), total / count)


def test_to_patches_raster_order():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    p = to_patches(x, 2)  # (1,4,1,2,2)
    assert p.shape == (1, 4, 1, 2, 2)
    torch.testing.assert_close(p[0, 1, 0], torch.tensor([[2.0, 3.0], [6.0, 7.0]]))  # top-right patch


@pytest.mark.parametrize("patch", [2, 4, 7, 8, 14, 16, 28])
def test_patch_cnn_receptive_field_is_the_patch(patch):
    torch.manual_seed(0)
    net = PatchCNN(1, patch, widths=(8, 8, 8)).eval()
    assert net.receptive_field == patch
    assert net(torch.randn(2, 1, patch, patch)).shape[-2:] == (1, 1)
    # Dense evaluation: output (i,j) depends on exactly the window at (i,j), reaching its edges.
    size = patch + 5
    x = torch.randn(1, 1, size, size, requires_grad=True)
    out = net.dense(x)
    assert out.shape[-2:] == (size - patch + 1, size - patch + 1)
    out[0, :, 2, 3].sum().backward()
    rows, cols = (x.grad[0, 0].abs() > 0).nonzero(as_tuple=True)
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (2, 2 + patch - 1, 3, 3 + patch - 1)


@pytest.mark.parametrize("patch", [7, 8, 14])
def test_patch_cnn_dense_equals_per_window(patch):
    torch.manual_seed(0)
    net = PatchCNN(1, patch, widths=(8, 16, 16)).eval()
    x = torch.randn(2, 1, patch + 4, patch + 3)
    dense = net.dense(x)  # (2,D,5,4)
    windows = x.unfold(2, patch, 1).unfold(3, patch, 1)  # (2,1,5,4,P,P)
    per_window = net(windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, 1, patch, patch))  # (40,D,1,1)
    torch.testing.assert_close(dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1]), per_window.flatten(1),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- MedicalPatchNet
@pytest.mark.parametrize("size,patch", [(32, 8), (28, 7), (28, 8), (28, 14)])
def test_patchnet_patch_logits_decompose_the_logits(size, patch):
    model = _model("patchnet", image_size=size, patch_size=patch)
    x = _images(3, size)
    expl = model.explain(x)
    h = -(-size // patch)
    assert expl.patch_logits.shape == (3, 3, h, h)
    assert expl.contributions.shape == (3, 3, h * h)
    torch.testing.assert_close(expl.contributions.sum(-1), model(x), rtol=1e-5, atol=1e-5)
    # The attribution's pixel mean is the target logit (with padding too: border cells re-weighted).
    torch.testing.assert_close(expl.attribution.mean(dim=(1, 2, 3)), _target_logit(expl), rtol=1e-5, atol=1e-5)
    # The "scaled" map is the raw map times the global probability of the target.
    prob = expl.logits.softmax(1).gather(1, expl.target[:, None])[:, 0]
    torch.testing.assert_close(expl.extras["scaled_map"], expl.extras["raw_map"] * prob.view(-1, 1, 1, 1))
    # Default (patch_cnn): the attribution is the refined map, and every patch's pixels add up to
    # P² × its logit exactly, in the raw and the refined map alike (cells ∩ image, re-weighted).
    torch.testing.assert_close(expl.attribution, expl.extras["refined_map"])
    t = expl.target
    grid = expl.patch_logits[torch.arange(3), t][:, None]  # (3,1,h,h)
    for key in ("raw_map", "refined_map"):
        torch.testing.assert_close(expl.extras[key].mean(dim=(1, 2, 3)), _target_logit(expl), rtol=1e-5, atol=1e-5)
        if size % patch == 0:
            torch.testing.assert_close(F.avg_pool2d(expl.extras[key], patch), grid, rtol=1e-5, atol=1e-5)
    if size % patch == 0:  # no padding: the raw map is the plain nearest-upsampled patch map
        up = F.interpolate(grid, scale_factor=patch, mode="nearest")
        torch.testing.assert_close(expl.extras["raw_map"], up)
        # refined - raw is α × (the dense map minus its mean over each patch), 0 < α ≤ 1 per image ...
        d = expl.extras["dense_map"]
        centred = (d - F.interpolate(F.avg_pool2d(d, patch), scale_factor=patch, mode="nearest")).flatten(1)
        delta = (expl.extras["refined_map"] - up).flatten(1)
        alpha = (delta * centred).sum(1) / centred.square().sum(1)
        assert ((alpha > 0) & (alpha <= 1 + 1e-6)).all()
        torch.testing.assert_close(delta, alpha[:, None] * centred, rtol=1e-4, atol=1e-5)
        # ... small enough that pixels of a higher-logit patch always rank above those of a lower one.
        raw_v, ref_v = up.flatten(1), expl.extras["refined_map"].flatten(1)
        higher = raw_v[:, :, None] > raw_v[:, None, :] + 1e-4
        assert (ref_v[:, :, None] > ref_v[:, None, :])[higher].all()


def test_patchnet_patches_are_independent():
    model = _model("patchnet")
    x = _images(2)
    before = model.explain(x).patch_logits
    changed = x.clone()
    changed[:, :, 8:16, 16:24] = _images(2, 8, seed=7)  # patch (row 1, col 2) of the 4×4 grid
    after = model.explain(changed).patch_logits
    differs = (after - before).abs().amax(dim=(0, 1)) > 0  # (4,4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(differs, expected)


@pytest.mark.parametrize("padding", ["replicate", "none"])
def test_dense_map_equals_shift_averaging(padding):
    model = _model("patchnet", image_size=16, patch_size=4, dense_padding=padding)
    x = _images(2, 16)
    with torch.no_grad():
        dense, naive = model.dense_map(x), model.shift_averaged_map(x)
    assert dense.shape == (2, 3, 16, 16)
    torch.testing.assert_close(dense, naive, rtol=1e-4, atol=1e-5)


def test_dense_map_with_a_generic_backbone_unfolds_windows():
    # zoo_cnn pads inside each patch, so windows are evaluated one by one; at stride 1 it is still exact.
    model = _model("patchnet", image_size=16, patch_size=4, backbone="zoo_cnn", widths=[8, 8])
    x = _images(2, 16)
    with torch.no_grad():
        naive = model.shift_averaged_map(x)
        exact = model.dense_map(x, stride=1)
        coarse = model.dense_map(x)  # default stride 2 (≤ P/2, tiles the padded span)
    torch.testing.assert_close(exact, naive, rtol=1e-4, atol=1e-5)
    assert torch.corrcoef(torch.stack([coarse.flatten(), naive.flatten()]))[0, 1] > 0.9
    with pytest.raises(ValueError, match="dense stride 4 must divide 18×18"):
        model.dense_map(x, stride=4)


def test_patchnet_blank_penalty_is_the_class_spread_of_a_blank_patch():
    model = _model("patchnet", blank_weight=0.5)  # eval mode: batch-norm uses running statistics
    x, y = _images(3), torch.tensor([0, 1, 2])
    loss, logits, logs = model.loss({"image": x, "label": y})
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))
        blank = model._window_logits(torch.zeros(1, 1, 8, 8))[0]  # pad_value 0 = mid-grey
    torch.testing.assert_close(logs["blank_spread"], blank.var(unbiased=False))
    torch.testing.assert_close(loss, F.cross_entropy(logits, y) + 0.5 * blank.var(unbiased=False))


def test_patchnet_dense_attribution_and_figure(tmp_path):
    model = _model("patchnet", attribution_map="dense")
    x = _images(2)
    expl = model.explain(x)
    torch.testing.assert_close(expl.attribution, expl.extras["dense_map"])
    raw = model.explain(x, attribution_map="raw")
    torch.testing.assert_close(raw.attribution, raw.extras["raw_map"])
    assert set(model.explanation_variants) == {"raw", "refined"}
    assert set(_model("patchnet").explanation_variants) == {"raw", "dense"}  # auto = refined
    fig = expl.plot(tmp_path / "patch.png", masks=torch.zeros(2, 1, 32, 32))
    assert (tmp_path / "patch.png").stat().st_size > 0
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 5 * 2  # rows: input, raw, scaled, refined, dense; one column per image
    assert len(fig.axes) > len(panels)  # every map row states its scale in a colour bar


def test_patchnet_timm_backbone():
    model = _model("patchnet", backbone="resnet18", patch_size=16)
    x = _images(2)
    expl = model.explain(x)
    assert expl.patch_logits.shape == (2, 3, 2, 2) and "dense_map" not in expl.extras  # auto = raw here
    torch.testing.assert_close(expl.attribution, expl.extras["raw_map"])
    torch.testing.assert_close(expl.contributions.sum(-1), model(x), rtol=1e-4, atol=1e-5)


def test_patchnet_multilabel_uses_bce_on_mean_patch_logits():
    model = _model("patchnet", task="multilabel", num_classes=4)
    x = _images(3)
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]]).float()
    loss, logits, _ = model.loss({"image": x, "label": labels})
    torch.testing.assert_close(logits, model.patch_logits(x).mean(dim=(2, 3)))
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, labels))
    expl = model.explain(x, target=2)
    torch.testing.assert_close(expl.extras["probability"], torch.sigmoid(logits[:, 2]))


@pytest.mark.parametrize(("kw", "message"), [
    (dict(patch_size=40), r"patch_size must be in 2..image_size \(32\), got 40"),
    (dict(attribution_map="heat"), "attribution_map must be one of auto, raw, refined, dense, got 'heat'"),
    (dict(dense_padding="zeros"), "dense_padding must be replicate, reflect, constant or none, got 'zeros'"),
    (dict(dense_stride=9), r"dense_stride must be in 1..patch_size \(8\), got 9"),
])
def test_patchnet_bad_hparams(kw, message):
    with pytest.raises(ValueError, match=message):
        zoo.create_model("patchnet", **GEOM, **kw)


def _learn_squares(seed: int) -> dict[str, float]:
    """Class 1 = a bright 4×4 square in one of the 16 patches, class 0 = none; a patchnet trained on the
    64 images (full batch, Adam with a cosine decay to 0: batch-norm running statistics settle with the
    weights, so the eval-mode model is the trained one). Returns the eval-mode training accuracy and the
    fraction of class-1 images whose largest class-1 evidence (logit 1 - logit 0: softmax only sees
    differences) sits in the patch holding the square."""
    g = torch.Generator().manual_seed(seed)
    n, size = 64, 16
    x = torch.rand(n, 1, size, size, generator=g) * 0.1 - 0.8  # dark, slightly noisy background
    y = torch.arange(n) % 2
    where = torch.randint(0, 4, (n, 2), generator=g)
    for i in range(n):
        if y[i]:
            r, c = where[i] * 4
            x[i, :, r:r + 4, c:c + 4] = 0.8
    torch.manual_seed(seed)  # the initialisation
    model = zoo.create_model("patchnet", num_classes=2, image_size=size, patch_size=4, widths=[16, 16],
                             blank_weight=0.0)
    steps = 100
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss, _, _ = model.loss({"image": x, "label": y})
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    expl = model.explain(x, target=1)
    evidence = expl.patch_logits[:, 1] - expl.patch_logits[:, 0]  # (n,4,4)
    best = evidence.flatten(1).argmax(1)  # (n,) raster index in the 4×4 grid
    square = where[:, 0] * 4 + where[:, 1]
    return {"acc": float((expl.logits.argmax(1) == y).float().mean()),
            "localised": float((best == square)[y == 1].float().mean())}


def test_patchnet_learns_and_localises_on_tiny_data():
    """The model must learn the squares, and the square's patch must carry the largest class-1 evidence.
    Seeds 0/1/2 give accuracy 1.0 and localisation 1.0 (16 seeds: all 1.0); the thresholds leave a wide
    margin and stay far above chance."""
    got = _learn_squares(SEED)
    assert got["acc"] >= 0.85, f"training accuracy {got['acc']:.3f}; chance is 0.5"
    assert got["localised"] >= 0.75, f"square's patch has the top evidence in {got['localised']:.3f}; chance 1/16"


# ---------------------------------------------------------------------- BagNet
@pytest.mark.parametrize("rf", [5, 9, 17])
def test_bagnet_receptive_field(rf):
    model = _model("bagnet", receptive_field=rf, width=8)
    x = torch.randn(1, 1, 32, 32, requires_grad=True)
    out = model.logit_map(x)
    assert out.shape == (1, 3, 33 - rf, 33 - rf)
    i, j = 4, 9
    out[0, :, i, j].sum().backward()
    grad = x.grad[0, 0].abs()
    rows, cols = (grad > 0).nonzero(as_tuple=True)
    # Zero outside the field, nonzero reaching its edges.
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (i, i + rf - 1, j, j + rf - 1)


def test_bagnet_logit_map_decomposes_the_logits():
    model = _model("bagnet")
    x = _images(3)
    expl = model.explain(x)
    assert expl.patch_logits.shape == (3, 3, 24, 24)  # 32 - 9 + 1
    torch.testing.assert_close(expl.contributions.sum(-1), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expl.attribution.mean(dim=(1, 2, 3)), _target_logit(expl), rtol=1e-5, atol=1e-5)
    # Interior pixels are single-pixel cells: pixel (4+i, 4+j) carries location (i, j)'s logit × H·W/n.
    t = expl.target
    inner = expl.attribution[:, 0, 5:27, 5:27]
    torch.testing.assert_close(inner, expl.patch_logits[torch.arange(3), t][:, 1:-1, 1:-1] * (32 * 32 / 24**2))


def test_bagnet_changing_pixels_moves_only_locations_that_see_them():
    model = _model("bagnet", width=8)
    x = _images(1)
    changed = x.clone()
    changed[:, :, 20, 20] += 0.5
    diff = (model.logit_map(changed) - model.logit_map(x)).abs().amax(dim=(0, 1)) > 0  # (24,24)
    expected = torch.zeros(24, 24, dtype=torch.bool)
    expected[12:21, 12:21] = True  # locations i with i ≤ 20 ≤ i+8
    assert torch.equal(diff, expected)


@pytest.mark.parametrize(("kw", "message"), [
    (dict(receptive_field=8), "receptive_field must be an odd number ≥ 3, got 8"),
    (dict(receptive_field=33), "receptive_field 33 is larger than the 32 px images"),
])
def test_bagnet_bad_hparams(kw, message):
    with pytest.raises(ValueError, match=message):
        zoo.create_model("bagnet", **GEOM, **kw)


# ---------------------------------------------------------------------- shipped checkpoints
@pytest.mark.parametrize("name", ["patchnet-synthetic", "bagnet-synthetic"])
def test_pretrained_synthetic_checkpoint(name):
    if name not in zoo.list_pretrained():
        pytest.skip(f"{name} not in checkpoints/")
    from zoo.data import SyntheticDataModule

    model = zoo.load(name)
    dm = SyntheticDataModule(image_size=32, num_classes=4, n_train=64, n_val=64, n_test=400, seed=SEED)
    dm.setup("test")
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("test"), batch_size=400)))
    # Test sets of seeds 0/1/2: accuracy 0.975/0.975/0.980 (patchnet), 0.995/1.0/1.0 (bagnet); pointing
    # game 0.99/0.98/0.99 and 0.95/0.98/0.96; the raw patchnet map 0.56/0.54/0.64.
    with torch.no_grad():
        kw = {"dense": False, "attribution_map": "raw"} if name.startswith("patchnet") else {}  # cheap here
        expl = model.explain(batch["image"], batch["label"], **kw)
        n = 128  # localisation on the first 128 images: the patchnet default map needs the dense pass
        local = model.explain(batch["image"][:n], batch["label"][:n])
    acc = float((expl.logits.argmax(1) == batch["label"]).float().mean())
    assert acc >= 0.9, f"{name} test accuracy {acc:.3f}; chance is 0.25"
    torch.testing.assert_close(expl.contributions.sum(-1), expl.logits, rtol=1e-4, atol=1e-4)
    # The reported attribution localises (pointing game ≥ 0.8; chance ≈ 0.04, the mask's area share) and
    # still averages to the logit.
    hit = hit_rate(local.attribution, batch["mask"][:n])
    assert hit >= 0.8, f"{name} pointing game {hit:.3f}; chance ≈ 0.04"
    torch.testing.assert_close(local.attribution.mean(dim=(1, 2, 3)), _target_logit(local), rtol=1e-4, atol=1e-4)
    if name.startswith("patchnet"):  # the raw 8 px plateau cannot point inside 6–10 px objects reliably
        raw = hit_rate(local.extras["raw_map"], batch["mask"][:n])
        assert raw < 0.8 and hit > raw + 0.2, f"raw map pointing game {raw:.3f} vs the reported map {hit:.3f}"


def test_refine_orders_patches_by_logit_then_pixels_by_detail():
    """Constructed: two 2×2 patches with logits 1 and 2 and a detail larger than their gap. The refined
    map keeps every pixel of the logit-2 patch above the logit-1 patch, orders pixels inside a patch
    by the detail, and keeps every patch's mean (the exact decomposition)."""
    from zoo.models.patchnet import refine

    raw = torch.tensor([[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]).view(1, 1, 2, 4)
    detail = torch.tensor([[5.0, -5.0, -3.0, 1.0], [1.0, -1.0, 3.0, -1.0]]).view(1, 1, 2, 4)  # zero mean per patch
    out = refine(raw, detail)
    left, right = out[..., :2].flatten(), out[..., 2:].flatten()
    assert right.min() > left.max()
    assert left.argsort().tolist() == detail[..., :2].flatten().argsort().tolist()
    assert right.argsort().tolist() == detail[..., 2:].flatten().argsort().tolist()
    torch.testing.assert_close(F.avg_pool2d(out, 2), F.avg_pool2d(raw, 2))
    flat = refine(torch.ones(1, 1, 2, 2), torch.tensor([[0.5, -0.5], [0.2, -0.2]]).view(1, 1, 2, 2))
    torch.testing.assert_close(flat, 1 + torch.tensor([[0.5, -0.5], [0.2, -0.2]]).view(1, 1, 2, 2))  # one patch: α = 1
