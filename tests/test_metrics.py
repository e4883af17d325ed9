"""Tests for zoo.metrics on constructed cases whose answer is known in advance."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.metrics import (
    argmax_location,
    auc,
    deletion_insertion,
    energy_in_mask,
    evalprotopnet_noise,
    explanation_metrics,
    explanation_stability,
    faithfulness,
    hit_rate,
    make_substrate,
    mask_iou,
    pointing_game,
    top_fraction_mask,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _square(B: int, H: int, W: int, r0: int, c0: int, size: int) -> torch.Tensor:
    m = torch.zeros(B, H, W)
    m[:, r0 : r0 + size, c0 : c0 + size] = 1.0
    return m


# --------------------------------------------------------------------------- localisation


@pytest.mark.parametrize("device", DEVICES)
def test_pointing_game_map_equal_mask_and_inverted(device):
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(5, 16, 16, generator=g) > 0.7).float()
    masks[0] = 0.0  # empty mask: excluded
    masks = masks.to(device)
    hits = pointing_game(masks, masks)
    assert hits.device.type == device
    assert torch.isnan(hits[0])
    assert torch.equal(hits[1:], torch.ones(4, device=device))
    assert hit_rate(masks, masks) == 1.0

    inverted = pointing_game(1.0 - masks, masks)
    assert torch.isnan(inverted[0])
    assert torch.equal(inverted[1:], torch.zeros(4, device=device))
    assert hit_rate(1.0 - masks, masks) == 0.0


def test_hit_rate_ignores_empty_and_all_empty_is_nan():
    attr = _square(3, 8, 8, 2, 2, 2)
    masks = _square(3, 8, 8, 2, 2, 2)
    masks[1] = 0.0
    masks[2] = _square(1, 8, 8, 5, 5, 2)[0]  # miss
    assert hit_rate(attr, masks) == pytest.approx(0.5)  # (1 + 0) / 2, image 1 excluded
    assert math.isnan(hit_rate(attr, torch.zeros(3, 8, 8)))


def test_plateau_resolves_to_block_centre_not_corner():
    # Map: 1 on a 4x4 block (rows/cols 4..7), 0 elsewhere (as after nearest upsampling).
    attr = _square(1, 16, 16, 4, 4, 4)
    gt = _square(1, 16, 16, 5, 5, 2)  # only the block's central 2x2 pixels
    loc = argmax_location(attr)
    assert loc.dtype == torch.long and loc.shape == (1, 2)
    assert tuple(loc[0].tolist()) in {(5, 5), (5, 6), (6, 5), (6, 6)}  # centre of the block
    assert pointing_game(attr, gt).item() == 1.0
    # The naive argmax lands on the block's top-left corner, outside the GT: the test above
    # would fail with it.
    flat = int(attr.view(1, -1).argmax(dim=1))
    naive = (flat // 16, flat % 16)
    assert naive == (4, 4)
    assert gt[0, naive[0], naive[1]] == 0


def test_argmax_location_unique_max_and_near_ties():
    g = torch.Generator().manual_seed(1)
    attr = torch.rand(4, 1, 9, 11, generator=g)
    loc = argmax_location(attr)
    flat = attr.view(4, -1).argmax(dim=1)
    assert torch.equal(loc, torch.stack([flat // 11, flat % 11], dim=1))
    # float noise below the relative tolerance still counts as one plateau
    block = _square(1, 12, 12, 0, 0, 4) * 3.0
    block[0, 0, 0] += 1e-7
    assert tuple(argmax_location(block)[0].tolist()) in {(1, 1), (1, 2), (2, 1), (2, 2)}


def test_argmax_location_picks_largest_component_and_stays_on_plateau():
    attr = _square(1, 16, 16, 0, 0, 2) + _square(1, 16, 16, 8, 8, 3)  # 2x2 and 3x3 plateaus
    assert argmax_location(attr)[0].tolist() == [9, 9]
    # Ring (hollow square): its centroid (7.5, 7.5) is off the plateau -> snapped onto it.
    ring = _square(1, 16, 16, 3, 3, 10) - _square(1, 16, 16, 4, 4, 8)
    r, c = argmax_location(ring)[0].tolist()
    assert ring[0, r, c] == 1.0


def test_shapes_b1hw_and_bhw_agree():
    g = torch.Generator().manual_seed(2)
    attr = torch.rand(3, 10, 10, generator=g)
    mask = (torch.rand(3, 10, 10, generator=g) > 0.5).float()
    assert torch.equal(argmax_location(attr), argmax_location(attr[:, None]))
    assert torch.equal(pointing_game(attr, mask), pointing_game(attr[:, None], mask[:, None].bool()))
    assert torch.allclose(energy_in_mask(attr, mask), energy_in_mask(attr[:, None], mask[:, None]))
    assert torch.equal(mask_iou(mask, mask.bool()), mask_iou(mask[:, None], mask))


def test_mask_iou_constructed():
    a = _square(1, 10, 10, 0, 0, 4).bool()  # rows 0..3, cols 0..3
    b = _square(1, 10, 10, 2, 0, 4).bool()  # rows 2..5: overlap 2x4 = 8, union 24
    assert mask_iou(a, b).item() == pytest.approx(8 / 24)
    assert mask_iou(a, a).item() == 1.0
    assert mask_iou(a, _square(1, 10, 10, 6, 6, 4)).item() == 0.0
    assert torch.isnan(mask_iou(torch.zeros(1, 5, 5), torch.zeros(1, 5, 5))).all()


def test_energy_in_mask():
    mask = _square(2, 8, 8, 0, 0, 4)
    attr = mask.clone()
    attr[1] = _square(1, 8, 8, 0, 2, 4)[0]  # half its mass inside the mask
    attr[1, 7, 7] = -5.0  # negative evidence is ignored
    e = energy_in_mask(attr, mask)
    assert e.tolist() == pytest.approx([1.0, 0.5])
    assert torch.isnan(energy_in_mask(attr, torch.zeros(2, 8, 8))).all()


# --------------------------------------------------------------------------- faithfulness

H = W = 12
REGION = _square(1, H, W, 2, 3, 4)[0].bool()  # (H,W) evidence region


class RegionModel(torch.nn.Module):
    """logits[:, 0] = 5 * mean of the pixels in REGION (all channels), logits[:, 1] = 0.

    Only REGION matters, so a map equal to REGION is the perfectly faithful explanation.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = REGION.to(x.device)
        z = 5.0 * (x * region).flatten(1).sum(1) / (x.shape[1] * region.sum())
        return torch.stack([z, torch.zeros_like(z)], dim=1)


class ConstantModel(torch.nn.Module):
    def __init__(self, k: int = 4):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], self.k, device=x.device)


def _region_images(B: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    # Bright evidence region on a dark background (in [-1, 1]): the blurred insertion start
    # mixes them, so its region mean is low and the class probability starts low.
    x = -0.5 - 0.5 * torch.rand(B, 3, H, W, generator=g)
    x[:, :, REGION] = 0.5 + 0.5 * torch.rand(B, 3, int(REGION.sum()), generator=g)
    return x.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_deletion_insertion_region_map_beats_random_map(device):
    model = RegionModel().eval()
    images = _region_images(4, device)
    good = REGION.float().expand(4, 1, H, W).to(device)
    rand = torch.rand(4, 1, H, W, generator=torch.Generator().manual_seed(4)).to(device)
    res_good = deletion_insertion(model, images, good, target=0, steps=16)
    res_rand = deletion_insertion(model, images, rand, target=0, steps=16)
    assert set(res_good) == {"deletion", "insertion", "deletion_curve", "insertion_curve", "fraction"}
    assert res_good["deletion"].shape == (4,) and res_good["deletion_curve"].shape == (4, 17)
    assert res_good["deletion"].device.type == device
    assert (res_good["deletion"] < res_rand["deletion"] - 0.1).all()
    assert (res_good["insertion"] > res_rand["insertion"] + 0.05).all()
    # Curve end points are the model on the untouched / fully replaced images.
    p_img = model(images).softmax(1)[:, 0]
    assert torch.allclose(res_good["deletion_curve"][:, 0], p_img)
    assert torch.allclose(res_good["insertion_curve"][:, -1], p_img)
    assert torch.allclose(res_good["deletion_curve"][:, -1], torch.full((4,), 0.5, device=device))


def test_deletion_insertion_constant_model_auc_equals_probability():
    images = torch.randn(3, 1, 8, 8)
    attr = torch.randn(3, 8, 8)
    res = deletion_insertion(ConstantModel(4), images, attr, target=torch.tensor([0, 1, 3]), steps=7)
    assert torch.allclose(res["deletion"], torch.full((3,), 0.25), atol=1e-6)
    assert torch.allclose(res["insertion"], torch.full((3,), 0.25), atol=1e-6)
    res = deletion_insertion(ConstantModel(4), images, attr, target=2, steps=5,
                             mode="deletion", activation="sigmoid")
    assert set(res) == {"deletion", "deletion_curve", "fraction"}
    assert torch.allclose(res["deletion"], torch.full((3,), 0.5), atol=1e-6)


def test_auc_trapezoid():
    curve = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert auc(curve).tolist() == pytest.approx([0.5, 0.25])


def test_deletion_chunking_shapes_and_determinism():
    model = RegionModel().eval()
    images = _region_images(3)
    attr = torch.zeros(3, 1, H, W)  # all ties: order must be deterministic (raster order)
    a = deletion_insertion(model, images, attr, target=0, steps=9, batch_size=1000)
    b = deletion_insertion(model, images, attr[:, 0], target=0, steps=9, batch_size=7)
    for key in ("deletion_curve", "insertion_curve"):
        assert torch.allclose(a[key], b[key], atol=1e-6)
    # target=None uses the model's prediction (class 0 here)
    c = deletion_insertion(model, images, attr, target=None, steps=9)
    assert torch.allclose(a["deletion"], c["deletion"])


class LinearModel(torch.nn.Module):
    """logit 0 = sum_p w_p x_p with weights that grow in raster order, logit 1 = 0: the order inside a
    plateau changes the curve, and the model is linear, so the expected image's logit is the expected
    logit (plateau ties = random-order mean, exactly in expectation)."""

    def __init__(self, n: int):
        super().__init__()
        self.w = torch.arange(1.0, n + 1.0)

    def forward(self, x):
        z = (x.flatten(1) * self.w).sum(1)
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def test_ties_plateau_switches_equal_scores_together_constructed():
    """4x4 map with two plateaus (8 pixels at 1, 8 at 0), 4 steps: at k=4 half of the top plateau has
    gone, so every one of its pixels is half-way to grey; at k=12 the bottom plateau is half-way."""
    model = LinearModel(16)
    images = torch.full((1, 1, 4, 4), 0.5)
    attr = torch.zeros(1, 4, 4)
    attr.view(-1)[torch.tensor([1, 3, 4, 6, 9, 11, 12, 14])] = 1.0  # a checkerboard: not a raster block
    top = attr.view(-1) == 1
    w = model.w
    res = faithfulness(model, images, attr, target=0, steps=4, deletion=["grey"], insertion=[],
                       ties="plateau", activation=None)
    expected = torch.tensor([
        0.5 * w.sum(), 0.5 * w.sum() - 0.25 * w[top].sum(), 0.5 * w[~top].sum(), 0.25 * w[~top].sum(), 0.0])
    assert torch.allclose(res["deletion_curve[grey]"][0], expected)
    raster = faithfulness(model, images, attr, target=0, steps=4, deletion=["grey"], insertion=[],
                          ties="raster", activation=None)
    assert not torch.allclose(raster["deletion_curve[grey]"], res["deletion_curve[grey]"])  # order mattered
    rand = faithfulness(model, images, attr, target=0, steps=4, deletion=["grey"], insertion=[], ties="random",
                        tie_draws=400, activation=None, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rand["deletion_curve[grey]"], res["deletion_curve[grey]"], rtol=0.05)  # its mean
    again = faithfulness(model, images, attr, target=0, steps=4, deletion=["grey"], insertion=[], ties="random",
                         tie_draws=400, activation=None, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rand["deletion_curve[grey]"], again["deletion_curve[grey]"])  # seeded
    # without ties the three agree (RISE exactly)
    distinct = torch.randperm(16, generator=torch.Generator().manual_seed(1)).float().view(1, 4, 4)
    curves = [faithfulness(model, images, distinct, 0, 4, ["grey"], [], ties=t, activation=None)[
        "deletion_curve[grey]"] for t in ("plateau", "raster", "random")]
    assert torch.allclose(curves[0], curves[1]) and torch.allclose(curves[0], curves[2])


def test_ties_all_equal_map_is_the_linear_fade():
    """A constant map (one plateau): step t moves every pixel t/S of the way — not the raster sweep."""
    model = RegionModel().eval()
    images = _region_images(2)
    res = faithfulness(model, images, torch.zeros(2, H, W), target=0, steps=4, deletion=["grey"], insertion=[],
                       activation=None)
    fade = torch.stack([model(images * (1 - t / 4))[:, 0] for t in range(5)], dim=1)
    assert torch.allclose(res["deletion_curve[grey]"], fade, atol=1e-6)


def test_substrates_each_measured_and_the_worst_is_the_headline():
    """grey / blur / noise are all evaluated in one pass; a model that calls grey "no evidence" (what a
    blank-patch penalty trains) scores a low grey deletion AUC but the headline takes the worst substrate."""
    model = RegionModel().eval()
    images = _region_images(3)
    attr = REGION.float().expand(3, H, W)
    res = faithfulness(model, images, attr, target=0, steps=8)
    for m in ("deletion", "insertion"):
        for s in ("grey", "blur", "noise"):
            assert res[f"{m}[{s}]"].shape == (3,) and res[f"{m}_curve[{s}]"].shape == (3, 9)
    # the single-substrate entry point is the same numbers
    one = deletion_insertion(model, images, attr, target=0, steps=8, substrate_deletion="blur",
                             substrate_insertion="noise")
    assert torch.allclose(one["deletion"], res["deletion[blur]"]) and torch.allclose(one["insertion"],
                                                                                   res["insertion[noise]"])
    assert torch.equal(deletion_insertion(model, images, attr, 0, 8, substrate_deletion="constant")["deletion"],
                       res["deletion[grey]"])  # "constant" is the old name of grey
    out = explanation_metrics(model, lambda x, t: attr, images, target=0, steps=8, stability=False)
    dels = {s: out[f"deletion_auc[{s}]"] for s in ("grey", "blur", "noise")}
    assert out["deletion_auc"] == max(dels.values()) and len(set(dels.values())) == 3
    with pytest.raises(ValueError, match="substrate must be"):
        faithfulness(model, images, attr, 0, 8, deletion=["black"])
    with pytest.raises(ValueError, match="ties must be"):
        faithfulness(model, images, attr, 0, 8, ties="first")


def test_noise_substrate_seeded_in_range_with_image_statistics():
    g = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, 32, 32, generator=g) * 0.6 - 0.8  # values in [-0.8, -0.2]
    a, b = make_substrate(images, "noise"), make_substrate(images, "noise")
    assert torch.equal(a, b) and not torch.equal(a, make_substrate(images, "noise", noise_seed=1))
    assert a.min() >= images.min() and a.max() <= images.max()  # stays in the image's range
    assert torch.allclose(a.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.03)
    assert (a.flatten(1) != images.flatten(1)).any(1).all()  # no structure of the image left


def test_gradcam_layers_equals_captum_gradcam_at_every_layer():
    import zoo
    from zoo.nets.backbones import conv_layer_names
    from zoo.nets.posthoc import gradcam, gradcam_layers

    torch.manual_seed(0)
    model = zoo.create_model("cnn", num_classes=3, in_channels=1, image_size=16, widths=[4, 8, 8]).eval()
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    t = torch.tensor([0, 1, 2, 1, 0])
    layers = conv_layer_names(model)
    maps = gradcam_layers(model, x, t, layers)
    for layer in layers:
        assert torch.allclose(maps[layer], gradcam(model, x, t, layer), rtol=1e-5, atol=1e-9)
    model.requires_grad_(False)  # a frozen model (SOP's backbone after its sop phase) is screened the same
    frozen = gradcam_layers(model, x, t, layers)
    assert all(torch.equal(frozen[layer], maps[layer]) for layer in layers)


# --------------------------------------------------------------------------- stability


def test_evalprotopnet_noise_clipped_and_reproducible():
    x = torch.zeros(4, 3, 16, 16)
    n1 = evalprotopnet_noise(x, generator=torch.Generator().manual_seed(0))
    n2 = evalprotopnet_noise(x, generator=torch.Generator().manual_seed(0))
    n3 = evalprotopnet_noise(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(n1, n2) and not torch.equal(n1, n3)
    assert n1.abs().max() <= 0.25
    assert (n1.abs() == 0.25).any()  # clipping is active (|eps| > 1.25 std happens often)
    assert 0.15 < n1.std() < 0.2  # clipped N(0, 0.2^2)


def test_stability_input_independent_map_is_perfectly_stable():
    fixed = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    fixed[..., 3:6, 3:6] = 2.0  # a plateau, too

    def explain(x, t):
        return fixed.expand(x.shape[0], 1, 16, 16)

    images = torch.randn(3, 3, 16, 16)
    res = explanation_stability(explain, images, target=0, n_repeats=2,
                                generator=torch.Generator().manual_seed(0))
    assert res["stability"] == 1.0
    assert torch.equal(res["argmax_unchanged"], torch.ones(3))
    assert torch.equal(res["map_iou"], torch.ones(3))
    assert torch.equal(res["argmax_shift_px"], torch.zeros(3))


def test_stability_input_dependent_map_is_unstable():
    g = torch.Generator().manual_seed(6)
    images = torch.randn(4, 3, 16, 16, generator=g) * 0.1  # noise images

    def explain(x, t):
        return x.abs().mean(1, keepdim=True)

    res = explanation_stability(explain, images, target=torch.zeros(4, dtype=torch.long),
                                generator=g, top_fraction=0.1)
    assert res["stability"] < 1.0
    assert (res["map_iou"] < 1.0).all()
    assert (res["argmax_shift"] <= 1.0).all()
    assert torch.allclose(res["argmax_shift"], res["argmax_shift_px"] / math.hypot(16, 16))


def test_top_fraction_mask_deterministic_under_ties():
    attr = torch.zeros(2, 10, 10)
    m = top_fraction_mask(attr, 0.1)
    assert m.sum(dim=(1, 2)).tolist() == [10, 10]
    assert torch.equal(m, top_fraction_mask(attr.clone(), 0.1))
    assert m[0].flatten()[:10].all()  # raster order among ties


def test_explanation_metrics_end_to_end():
    model = RegionModel().eval()
    images = _region_images(3)
    masks = REGION.float().expand(3, H, W)

    def explain(x, t):
        return (x.mean(1, keepdim=True) * REGION.float()).detach()

    out = explanation_metrics(model, explain, images, masks=masks, steps=8,
                              generator=torch.Generator().manual_seed(0))
    per_substrate = {f"{m}_auc[{s}]" for m in ("deletion", "insertion") for s in ("grey", "blur", "noise")}
    assert set(out) == {"hit_rate", "energy_in_mask", "deletion_auc", "insertion_auc",
                        "stability", "map_iou", "argmax_shift"} | per_substrate
    assert all(isinstance(v, float) for v in out.values())
    assert out["hit_rate"] == 1.0 and out["energy_in_mask"] == pytest.approx(1.0)
    assert 0.0 <= out["deletion_auc"] < out["insertion_auc"] <= 1.0
    out2 = explanation_metrics(model, explain, images, target=0, steps=8, stability=False)
    assert set(out2) == {"deletion_auc", "insertion_auc"} | per_substrate
    # the headline is the worst substrate: the highest deletion, the lowest insertion AUC
    assert out2["deletion_auc"] == max(out2[f"deletion_auc[{s}]"] for s in ("grey", "blur", "noise"))
    assert out2["insertion_auc"] == min(out2[f"insertion_auc[{s}]"] for s in ("grey", "blur", "noise"))


class _ListDataModule:
    """Minimal datamodule: one test loader over fixed labels (what take_images reads)."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels

    def setup(self, stage=None) -> None:
        pass

    def test_dataloader(self):
        n = len(self.labels)
        images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
        return [{"image": images[i:i + 4], "label": self.labels[i:i + 4]} for i in range(0, n, 4)]


def test_take_images_balanced_takes_equal_classes_in_split_order():
    """The explanation sample has ⌈n/K⌉ of every class (a deletion curve's all-grey tail then scores 1/K
    whichever class a model calls grey), topped up in split order where a class runs short."""
    from zoo.evaluation import take_images

    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 10)
    dm = _ListDataModule(labels)
    first = take_images(dm, "test", 9)
    assert first["label"].tolist() == [0] * 9  # the plain sample: whatever comes first
    out = take_images(dm, "test", 9, balanced=True)
    assert torch.bincount(out["label"]).tolist() == [3, 3, 3]
    assert out["image"].flatten().tolist() == [0, 1, 2, 10, 11, 12, 13, 14, 15]  # split order kept
    short = take_images(dm, "test", 12, balanced=True)  # class 1 has 3 < 4: topped up from the rest
    assert torch.bincount(short["label"]).tolist() == [5, 3, 4]
    assert short["image"].flatten().tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15, 16]


def test_format_table_column_order_is_fixed():
    """Known columns first (acc, auroc, hit_rate, …), the rest in the order rows first use them; a
    missing cell prints "-". (A set ordered the rest by string hash, different in every process.)"""
    from zoo.evaluation import format_table

    rows = {"model": {"zeta": 1.0, "acc": 0.5}, "baseline": {"alpha": 2.0, "auroc": 0.25, "zeta": 3.0}}
    lines = format_table("t", rows).splitlines()
    assert lines[0] == "t"
    assert lines[1].split() == ["acc", "auroc", "zeta", "alpha"]
    assert lines[2].split() == ["model", "0.5000", "-", "1.0000", "-"]
    assert lines[3].split() == ["baseline", "-", "0.2500", "3.0000", "2.0000"]


def test_posthoc_best_layer_is_chosen_on_val_and_never_reads_test_images(monkeypatch):
    """posthoc_rows screens the Grad-CAM layers on `select` (val) only: on the test batch it computes
    the last layer's and the chosen layer's maps, nothing else — and the choice follows val."""
    import zoo
    import zoo.evaluation as E
    from zoo.nets.backbones import conv_layer_names

    torch.manual_seed(0)
    model = zoo.create_model("cnn", num_classes=2, in_channels=1, image_size=16, widths=[4, 8, 8]).eval()
    g = torch.Generator().manual_seed(0)

    def batch(n):
        mask = torch.zeros(n, 16, 16)
        mask[:, 4:8, 4:8] = 1
        return {"image": torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, "label": torch.arange(n) % 2, "mask": mask}

    test, val = batch(8), batch(8)
    layers = conv_layer_names(model)
    seen: list[tuple[str, bool]] = []  # (layer, whether the call saw a test image)
    real, real_all = E.gradcam, E.gradcam_layers

    def reads_test(x):
        return bool(any(torch.equal(x[i], test["image"][j]) for i in range(len(x)) for j in range(8)))

    def spy(m, x, t, layer):
        seen.append((layer, reads_test(x)))
        return real(m, x, t, layer)

    def spy_all(m, x, t, names):
        seen.extend((layer, reads_test(x)) for layer in names)
        return real_all(m, x, t, names)

    monkeypatch.setattr(E, "gradcam", spy)
    monkeypatch.setattr(E, "gradcam_layers", spy_all)
    # the val "masks" favour one inner layer: make it the best on val by construction (the maps passed
    # to hit_rate are recognised by identity with that layer's Grad-CAM on val)
    favourite = layers[0]
    want = real(model, val["image"], val["label"], favourite)
    monkeypatch.setattr(E.M, "hit_rate", lambda maps, masks: 1.0 if masks is val["mask"]
                        and torch.allclose(maps, want, atol=1e-9) else 0.0)
    rows = E.posthoc_rows(model, test, steps=2, integrated=False, select=val)
    assert f"grad-cam best[{favourite}]" in rows
    on_test = {layer for layer, is_test in seen if is_test}
    assert on_test <= {layers[-1], favourite}  # no other layer ever saw a test image
    assert {layer for layer, is_test in seen if not is_test} >= set(layers)  # every layer screened on val
    # poisoned test images (NaN): the screening pass (every layer at once) never receives one
    screened: list[bool] = []
    monkeypatch.setattr(E, "gradcam_layers", lambda m, x, t, names: screened.append(bool(x.isnan().any()))
                        or real_all(m, x, t, names))
    monkeypatch.setattr(E, "attribution_metrics", lambda *a, **k: {})  # the measuring, not under test here
    poisoned = {**test, "image": torch.full_like(test["image"], float("nan"))}
    assert f"grad-cam best[{favourite}]" in E.posthoc_rows(model, poisoned, steps=2, integrated=False, select=val)
    assert screened and not any(screened)
    assert "grad-cam best" not in " ".join(E.posthoc_rows(model, test, steps=2, integrated=False))  # no val, no pick


def test_same_network_gradcam_is_measured_on_the_own_map_images(monkeypatch):
    """A family's Grad-CAM-on-itself rows (prototype networks, SOP's backbone) are measured on exactly the
    test images of the family's own map row and choose their layer on val images only."""
    import zoo
    import zoo.evaluation as E
    from zoo.data import create_datamodule

    dm = create_datamodule("synthetic", n_train=8, n_val=12, n_test=12, image_size=16)
    model = zoo.create_model("cnn", num_classes=dm.num_classes, in_channels=1, image_size=16, widths=[4, 8]).eval()
    measured: list[torch.Tensor] = []
    monkeypatch.setattr(E, "attribution_metrics", lambda m, fn, batch, steps: measured.append(batch["image"]) or {})
    screened: list[torch.Tensor] = []
    real_best = E.best_gradcam_layer
    monkeypatch.setattr(E, "best_gradcam_layer", lambda m, select, layers: screened.append(select["image"])
                        or real_best(m, select, layers))
    test, val = (E.report_images(dm, split, 8) for split in ("test", "val"))
    rows = E.same_network_gradcam_rows(model, test, val, prefix="own")
    assert set(rows) == {f"own grad-cam[{E.conv_layer_names(model)[-1]}]", *(r for r in rows if "best[" in r)}
    own_map_images = E.take_images(dm, "test", 8, balanced=True)["image"]
    assert measured and all(torch.equal(x, own_map_images) for x in measured)
    assert torch.equal(screened[0], E.take_images(dm, "val", 8, balanced=True)["image"])
