"""Prototype family: numerical identities of the explanation, push, schedule, probabilistic prototypes,
the frozen-backbone head, the EvalProtoPNet metrics and the figures."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.metrics.prototypes import box_half_size, consistency, part_hits, prototype_interpretability, stability
from zoo.models.prototypes.attribution import spread_over_cells, spread_within_cells
from zoo.models.prototypes.similarity import LOG_EPS, cosine_distances, l2_distances, similarity_from_distance
from zoo.models.prototypes.push import cell_box, find_duplicates, percentile_box, push_prototypes

GEOM = dict(num_classes=3, in_channels=1, image_size=32)
SMALL = dict(widths=(8, 16, 16), prototype_dim=8, prototypes_per_class=2)  # fast, still an 8×8 grid
SEED = 0  # of the learning test; its threshold sits far below what seeds 0, 1 and 2 give (issue #13)


def small(name: str = "protopnet", **kw):
    torch.manual_seed(0)
    args = {**GEOM, **SMALL, **kw}
    if name == "proto_head":
        args.setdefault("backbone_checkpoint", None)
    return zoo.create_model(name, **args).eval()


def images(n: int = 4, size: int = 32, seed: int = 0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_dataset(n: int = 24, num_classes: int = 3, seed: int = 0):
    x = images(n, seed=seed)
    y = torch.arange(n) % num_classes
    return [{"image": x[i], "label": y[i], "index": torch.tensor(100 + i)} for i in range(n)]


# ---------------------------------------------------------------------------- similarity layer
def test_l2_distances_match_brute_force():
    z, p = torch.randn(2, 5, 3, 4), torch.randn(7, 5)
    brute = ((z[:, None] - p[None, :, :, None, None]) ** 2).sum(2)  # (B,P,h,w)
    torch.testing.assert_close(l2_distances(z, p), brute, rtol=1e-5, atol=1e-5)
    cos = F.cosine_similarity(z[:, None], p[None, :, :, None, None], dim=2)
    torch.testing.assert_close(cosine_distances(z, p), 1 - cos, rtol=1e-5, atol=1e-5)


def test_log_similarity_values():
    d = torch.tensor([0.0, 1.0])
    expected = torch.tensor([math.log(1 / LOG_EPS), math.log(2 / (1 + LOG_EPS))])
    torch.testing.assert_close(similarity_from_distance(d, "log_l2"), expected)
    torch.testing.assert_close(similarity_from_distance(torch.tensor([0.25]), "cosine"), torch.tensor([0.75]))


def test_last_layer_init_and_l1_on_wrong_classes_only():
    m = small()
    W = m.last_layer.weight  # (K,P)
    P = m.num_prototypes
    own = F.one_hot(m.prototype_class, 3).T.bool()
    assert (W[own] == 1).all() and (W[~own] == -0.5).all()
    assert float(m.l1_wrong_class()) == pytest.approx(0.5 * P * 2)  # K−1 = 2 wrong classes per prototype
    with torch.no_grad():
        W[own] = 5.0  # own-class weights do not count
    assert float(m.l1_wrong_class()) == pytest.approx(0.5 * P * 2)


def test_cluster_and_separation_costs_on_a_constructed_case():
    m = small()  # 2 prototypes per class: 0,1 → class 0; 2,3 → class 1; 4,5 → class 2
    d_min = torch.tensor([[5.0, 1.0, 0.5, 9.0, 3.0, 2.0],
                          [4.0, 4.0, 7.0, 6.0, 0.2, 8.0]])
    clst, sep = m.prototype_loss(torch.tensor([0, 2]), d_min)
    assert float(clst) == pytest.approx((1.0 + 0.2) / 2)
    assert float(sep) == pytest.approx((0.5 + 4.0) / 2)


# ---------------------------------------------------------------------------- explanation
@pytest.mark.parametrize("name", ["protopnet", "proto_head"])
def test_contributions_and_exact_attribution_add_up_to_logits(name):
    m = small(name)
    x = images(3)
    expl = m.explain(x, target=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(expl.contributions.sum(-1) + expl.bias, m(x), rtol=1e-5, atol=1e-5)
    target_logit = expl.logits.gather(1, expl.target[:, None])[:, 0]
    torch.testing.assert_close(expl.attribution.sum((1, 2, 3)), target_logit, rtol=1e-5, atol=1e-5)
    # similarity view: Σ_j W[t,j] · upsampled s_j (same shape, not a decomposition)
    sim = m.explain(x, target=torch.tensor([0, 1, 2]), view="similarity").attribution
    assert sim.shape == expl.attribution.shape
    assert expl.prototype_maps.shape == (3, m.num_prototypes, 32, 32)
    assert expl.extras["top_prototypes"].shape == (3, 3)


def test_protopnet_on_a_timm_backbone_decomposes_too():
    m = zoo.create_model("protopnet", **GEOM, backbone="resnet18", prototype_dim=8, prototypes_per_class=1).eval()
    x = images(2)
    expl = m.explain(x)
    assert expl.extras["grid"] == (1, 1)  # resnet18 reduces 32 px by 32
    torch.testing.assert_close(expl.contributions.sum(-1), m(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expl.attribution.sum((1, 2, 3)), expl.logits.gather(1, expl.target[:, None])[:, 0],
                               rtol=1e-5, atol=1e-5)


def test_exact_attribution_sits_where_each_prototype_is_attained():
    m = small(prototypes_per_class=1)
    x = images(1)
    with torch.no_grad():
        parts = m._parts(m.features(x))
    where = parts["where"][0]  # (P,) flat 8×8 locations
    contrib = m.last_layer.weight[0] * parts["g"][0]  # (P,)
    cells = torch.zeros(64).index_add_(0, where, contrib).view(8, 8)
    for spread in ("similarity", "even"):
        # each 4×4 input cell carries exactly its feature cell's value
        attribution = m.explain(x, target=0, spread=spread).attribution
        pooled = attribution[0, 0].view(8, 4, 8, 4).sum((1, 3))
        torch.testing.assert_close(pooled, cells, rtol=1e-5, atol=1e-6)
    blocks = attribution[0, 0].view(8, 4, 8, 4).permute(0, 2, 1, 3).reshape(64, 16)
    assert torch.allclose(blocks, blocks[:, :1].expand(-1, 16))  # "even": constant on each cell
    with pytest.raises(ValueError, match="unknown spread 'gauss'"):
        m.explain(x, spread="gauss")


@pytest.mark.parametrize("h,H", [(8, 32), (7, 28), (3, 32), (8, 30), (1, 32)])
def test_spread_within_cells_follows_the_upsampled_similarity_inside_the_cell(h, H):
    g = torch.Generator().manual_seed(h * H)
    B, P = 2, 3
    sim = torch.rand(B, P, h, h, generator=g) - 0.2  # some negative values: clipped at 0
    sim[1, 2] = -1.0  # no positive similarity anywhere: even spread
    where = torch.randint(0, h * h, (B, P), generator=g)
    values = torch.randn(B, P, generator=g)
    out = spread_within_cells(values, where, sim, H, H)
    # brute force: the full bilinear map, restricted to the cell, clipped, normalised
    up = F.interpolate(sim, size=(H, H), mode="bilinear", align_corners=False)  # (B,P,H,H)
    rows = torch.arange(H) * h // H
    cell_of = (rows[:, None] * h + rows[None, :])  # (H,H) pixel → flat cell
    expected = torch.zeros(B, H, H)
    for b in range(B):
        for j in range(P):
            inside = (cell_of == where[b, j]).float()
            wgt = up[b, j].clamp_min(0) * inside
            wgt = wgt / wgt.sum() if wgt.sum() > 0 else inside / inside.sum()
            expected[b] += values[b, j] * wgt
    torch.testing.assert_close(out[:, 0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sum((1, 2, 3)), values.sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h,H", [(7, 28), (3, 32), (1, 32), (8, 30)])
def test_spread_over_cells_keeps_sums_for_any_grid(h, H):
    cells = torch.randn(2, h, h)
    out = spread_over_cells(cells, H, H)
    assert out.shape == (2, 1, H, H)
    torch.testing.assert_close(out.sum((1, 2, 3)), cells.sum((1, 2)), rtol=1e-5, atol=1e-5)


def test_explain_rejects_unknown_view_and_bad_hparams():
    m = small()
    with pytest.raises(ValueError, match="unknown view 'grad'"):
        m.explain(images(1), view="grad")
    with pytest.raises(ValueError, match="unknown similarity 'dot'"):
        zoo.create_model("protopnet", **GEOM, similarity="dot")
    with pytest.raises(ValueError, match="prototypes_per_class must be ≥ 1"):
        zoo.create_model("protopnet", **GEOM, prototypes_per_class=0)


# ---------------------------------------------------------------------------- push
def test_push_finds_the_nearest_patch_of_the_prototypes_class():
    # Features = the image itself (D=1 channel, 32×32 grid): distances are explicit. Values on a
    # 1/64 grid make ‖z‖² − 2⟨z,p⟩ + ‖p‖² exact in float32 (no round-off deciding near-ties), and
    # the many exact ties check the tie-break: smallest dataset position, then row-major location.
    data = tiny_dataset(12)
    for d in data:
        d["image"] = (d["image"] * 64).round() / 64
    x = torch.stack([d["image"] for d in data])
    y = torch.stack([d["label"] for d in data])
    protos = torch.tensor([[19.3 / 64], [-45 / 64], [61 / 64]])  # one per class; the first matches nothing exactly
    pclass = torch.tensor([0, 1, 2])
    res = push_prototypes(lambda im: im, protos, pclass, data, l2_distances, image_size=32, batch_size=5)
    for j in range(3):
        own = (y == j).nonzero().squeeze(1)
        d = (x[own, 0] - protos[j, 0]) ** 2  # (n,32,32)
        best = int(d.flatten().argmin())
        b, loc = best // 1024, best % 1024
        assert int(res.position[j]) == int(own[b]) and int(res.index[j]) == 100 + int(own[b])
        assert tuple(res.location[j].tolist()) == (loc // 32, loc % 32)
        assert float(res.prototypes[j, 0]) == float(x[own[b], 0].flatten()[loc])
        assert float(res.distance[j]) == pytest.approx(float(d.flatten().min()), abs=1e-6)  # ‖z‖²−2⟨z,p⟩+‖p‖² round-off
    assert res.duplicates == []
    prov = res.provenance(pclass)
    assert prov[1]["class"] == 1 and prov[1]["pushed"] and prov[1]["index"] == int(res.index[1])


def test_push_detects_duplicates_and_breaks_ties_by_position():
    data = tiny_dataset(6)
    for d in data:
        d["image"] = torch.zeros(1, 32, 32)  # every patch ties
    res = push_prototypes(lambda im: im, torch.tensor([[0.1], [0.2], [0.3]]), torch.tensor([0, 0, 1]), data,
                          l2_distances, image_size=32, batch_size=4, unique=False)  # the paper's naive push
    # ties → smallest position (0 for class 0, 1 for class 1), then smallest location (0, 0)
    assert res.position.tolist() == [0, 0, 1] and res.location.tolist() == [[0, 0]] * 3
    assert res.duplicates == [[0, 1]] and res.duplicate_images == [[0, 1]]
    # unique push: the second class-0 prototype takes the next image of its class (position 3)
    res = push_prototypes(lambda im: im, torch.tensor([[0.1], [0.2], [0.3]]), torch.tensor([0, 0, 1]), data,
                          l2_distances, image_size=32, batch_size=4)
    assert res.position.tolist() == [0, 3, 1] and res.duplicates == [] and res.duplicate_images == []
    assert find_duplicates(torch.tensor([3, 3, 4]), torch.tensor([5, 6, 5])) == []


@pytest.mark.parametrize("batch_size", [2, 5, 64])
def test_unique_push_never_reuses_an_image_of_a_class_and_takes_the_next_best(batch_size):
    # Class 0 images (positions 0, 2, 4, 6): image 2 holds the best patch of all three class-0
    # prototypes, so the naive push collapses them onto it. The unique push gives image 2 to the
    # nearest pair (prototype 1, distance 0), then each other prototype its best *free* image.
    data = []
    for i in range(8):
        img = torch.full((1, 4, 4), 5.0)
        data.append({"image": img, "label": torch.tensor(i % 2), "index": torch.tensor(100 + i)})
    data[2]["image"][0, 0, :3] = torch.tensor([0.1, 0.5, 0.9])  # one patch per prototype, all exact
    data[4]["image"][0, 1, 1] = 0.6
    data[6]["image"][0, 2, 2] = 1.0
    data[0]["image"][0, 3, 3] = 0.25
    protos, pclass = torch.tensor([[0.1], [0.5], [0.9], [3.0]]), torch.tensor([0, 0, 0, 1])
    naive = push_prototypes(lambda im: im, protos, pclass, data, l2_distances, image_size=4, batch_size=batch_size,
                            unique=False)
    assert naive.position[:3].tolist() == [2, 2, 2] and naive.duplicate_images == [[0, 1, 2]]
    res = push_prototypes(lambda im: im, protos, pclass, data, l2_distances, image_size=4, batch_size=batch_size)
    # all pairs at distance 0 lie on image 2; greedy by (distance, prototype): prototype 0 gets it
    assert int(res.position[0]) == 2 and res.location[0].tolist() == [0, 0]
    assert float(res.prototypes[0, 0]) == pytest.approx(0.1)
    # prototype 1 (0.5): free images 0 (0.25 → 0.0625), 4 (0.6 → 0.01), 6 (1.0 → 0.25): image 4
    assert int(res.position[1]) == 4 and float(res.prototypes[1, 0]) == pytest.approx(0.6)
    # prototype 2 (0.9): 6 (1.0 → 0.01) beats 0 (0.25 → 0.4225); image 4 is taken
    assert int(res.position[2]) == 6 and float(res.prototypes[2, 0]) == pytest.approx(1.0)
    assert res.duplicate_images == [] and res.duplicates == []
    assert res.index.tolist()[:3] == [102, 104, 106]


def test_receptive_field_of_known_conv_stacks():
    from torch import nn

    from zoo.models.prototypes.rf import receptive_field, rf_boxes
    from zoo.nets.backbones import SmallCNN

    # zoo CNN, two stages: conv3 conv3 pool2 conv3 conv3 → size 3+2+1+4+4 = 14, jump 2, cell 0 centred at 0.5
    rf = receptive_field(SmallCNN(1, (32, 64)))
    assert (rf.jump, rf.size, rf.start, rf.exact) == (2, 14, 0.5, True)
    assert rf_boxes(torch.tensor([[0, 0], [5, 15]]), rf, 32).tolist() == [[0, 0, 7, 7], [4, 24, 17, 31]]
    # ResNet stem: conv7/2 p3, maxpool3/2 p1 → size 11, jump 4, start 0 (the paper's arithmetic)
    stem = nn.Sequential(nn.Conv2d(1, 1, 7, 2, 3), nn.MaxPool2d(3, 2, 1))
    assert receptive_field(stem) == type(rf)(4, 11, 0.0, True)
    # brute force: the input pixels a feature cell depends on = its box (positive weights, avg pools)
    net = nn.Sequential(nn.Conv2d(1, 1, 5, 2, 1), nn.AvgPool2d(2), nn.Conv2d(1, 1, 3, 1, 2, dilation=2))
    for m in net:
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 1.0)
    rf = receptive_field(net)
    # 41 px: no strided layer drops an edge row (there the arithmetic, like the paper's, overshoots)
    x = torch.ones(1, 1, 41, 41, requires_grad=True)
    out = net(x)
    for r, c in [(0, 0), (3, 5), (out.shape[-2] - 1, out.shape[-1] - 1)]:
        (grad,) = torch.autograd.grad(out[0, 0, r, c], x, retain_graph=True)
        ys, xs = (grad[0, 0] != 0).nonzero(as_tuple=True)
        assert rf_boxes(torch.tensor([[r, c]]), rf, 41)[0].tolist() == [int(ys.min()), int(xs.min()),
                                                                         int(ys.max()), int(xs.max())]


@pytest.mark.parametrize("temperature", [None, 0.25, 3.0])
@pytest.mark.parametrize("h,H", [(8, 32), (16, 32), (7, 28)])
def test_receptive_field_spread_follows_the_similarity_inside_the_box_and_sums_exactly(h, H, temperature):
    from zoo.models.prototypes.rf import ReceptiveField, rf_boxes

    g = torch.Generator().manual_seed(h + H)
    B, P = 2, 3
    rf = ReceptiveField(jump=H // h, size=14, start=0.5)
    sim = torch.rand(B, P, h, h, generator=g) - 0.2
    sim[1, 2] = -1.0  # no positive similarity: even over the box
    where = torch.randint(0, h * h, (B, P), generator=g)
    values = torch.randn(B, P, generator=g)
    out = spread_within_cells(values, where, sim, H, H, rf=rf, temperature=temperature)
    up = F.interpolate(sim, size=(H, H), mode="bilinear", align_corners=False)
    expected = torch.zeros(B, H, H)
    for b in range(B):
        for j in range(P):
            y0, x0, y1, x1 = rf_boxes(torch.tensor([[int(where[b, j]) // h, int(where[b, j]) % h]]), rf, H)[0].tolist()
            inside = torch.zeros(H, H)
            inside[y0:y1 + 1, x0:x1 + 1] = 1
            if temperature is None:  # linear: the clipped upsampled map, even where it is ≤ 0 everywhere
                wgt = up[b, j].clamp_min(0) * inside
                wgt = wgt / wgt.sum() if wgt.sum() > 0 else inside / inside.sum()
            else:  # softmax of the upsampled map over the box (also where it is negative)
                wgt = torch.exp(up[b, j] / temperature) * inside
                wgt = wgt / wgt.sum()
            expected[b] += values[b, j] * wgt
    torch.testing.assert_close(out[:, 0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sum((1, 2, 3)), values.sum(1), rtol=1e-5, atol=1e-5)


def test_default_map_is_the_softmax_receptive_field_spread_and_temperature_is_checked():
    from zoo.models.prototypes.attribution import prototype_attribution

    m = small()
    x = images(2)
    with torch.no_grad():
        parts = m._parts(m.features(x))
    w_t = m.last_layer.weight[torch.tensor([0, 1])]
    expl = m.explain(x, target=torch.tensor([0, 1]))
    for spread, temperature in (("receptive_field", 0.25), ("receptive_field_linear", None)):
        expected = spread_within_cells(w_t * parts["g"], parts["where"], parts["s"], 32, 32, rf=m.receptive_field(),
                                       temperature=temperature)
        got = expl.attribution if spread == "receptive_field" else m.explain(x, torch.tensor([0, 1]), spread=spread).attribution
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        prototype_attribution(parts["s"], parts["g"], parts["where"], w_t, "exact", (32, 32), rf=m.receptive_field(),
                              temperature=0.0)


def test_push_leaves_prototypes_without_a_sample_of_their_class(caplog):
    data = [d for d in tiny_dataset(6) if int(d["label"]) != 2]
    with caplog.at_level(logging.WARNING, logger="zoo.prototypes"):
        res = push_prototypes(lambda im: im, torch.tensor([[0.1], [0.2], [0.3]]), torch.tensor([0, 1, 2]), data,
                              l2_distances, image_size=32)
    assert int(res.index[2]) == -1 and float(res.prototypes[2, 0]) == pytest.approx(0.3)
    assert "no training sample of their class for 1 prototype(s) [2]" in caplog.text


def test_model_push_makes_prototypes_real_patches_and_provenance_survives_save_load(tmp_path):
    m = small()
    data = tiny_dataset(12)
    res = m.push(data, batch_size=5)
    assert (m.push_index >= 0).all()
    for j in range(m.num_prototypes):
        src = data[int(res.position[j])]
        assert int(src["label"]) == int(m.prototype_class[j])
        with torch.no_grad():
            z = m.features(src["image"][None])  # (1,D,8,8)
        r, c = res.location[j].tolist()
        torch.testing.assert_close(m.prototypes[j], z[0, :, r, c], rtol=0, atol=1e-6)
        # the source image attains the maximal similarity log(1/ε) for this prototype at that cell
        g = m._parts(z)["g"][0, j]
        assert float(g) == pytest.approx(math.log(1 / LOG_EPS), rel=1e-3)
    y0, x0, y1, x1 = res.cell[0].tolist()
    assert (y1 - y0 + 1, x1 - x0 + 1) == (4, 4)  # reduction 4
    folder = zoo.save(m, tmp_path / "m")
    loaded = zoo.load(folder)
    assert loaded.provenance() == m.provenance()
    # provenance: stride cell and receptive-field box (conv arithmetic) of the same feature location
    from zoo.models.prototypes.rf import rf_boxes

    prov = m.provenance()[0]
    assert prov["rf_box"] == tuple(rf_boxes(res.location[:1], m.receptive_field(), 32)[0].tolist())
    assert prov["rf_box"] == tuple(res.rf_box[0].tolist())
    y0, x0, y1, x1 = prov["rf_box"]
    assert y0 <= prov["cell"][0] and prov["cell"][2] <= y1 and x0 <= prov["cell"][1] and prov["cell"][3] <= x1
    assert m.duplicate_image_groups() == []  # 12 images, 4 per class, 2 prototypes per class
    card = m.card_metrics({"test/acc": 1.0}, {})  # the model card reports the push's diversity and boxes
    assert card["duplicate_source_images"] == 0 and card["receptive_field_px"] == m.receptive_field().size
    assert f"p0{list(prov['rf_box'])}" in card["rf_boxes"]
    torch.testing.assert_close(loaded.push_images, m.push_images)
    expl = loaded.explain(images(2))
    assert expl.prototype_provenance[0]["index"] == int(res.index[0]) and "source_images" in expl.extras


def test_box_helpers():
    maps = torch.zeros(1, 10, 10)
    maps[0, 2:4, 5:9] = 1.0
    assert percentile_box(maps, 0.95).tolist() == [[2, 5, 3, 8]]
    maps[0, 8, 0] = 1.0  # a second, separate top region: boxed only without `connected`
    maps[0, 2, 5] = 2.0  # the peak is in the first region
    assert percentile_box(maps, 0.95).tolist() == [[2, 5, 3, 8]]
    assert percentile_box(maps, 0.95, connected=False).tolist() == [[2, 0, 8, 8]]
    assert cell_box(torch.tensor([[1, 2]]), (8, 8), 32).tolist() == [[4, 8, 7, 11]]
    assert cell_box(torch.tensor([[6, 6]]), (7, 7), 28).tolist() == [[24, 24, 27, 27]]


# ---------------------------------------------------------------------------- schedule as data
def test_phases_freeze_parts_and_keep_frozen_batchnorm_in_eval():
    m = small()
    m.train()
    m.enter_phase("warm")
    assert not any(p.requires_grad for p in m.backbone.parameters())
    assert m.prototypes.requires_grad and not m.last_layer.weight.requires_grad
    assert not m.backbone.training and m.add_on.training
    m.enter_phase("last_layer")
    assert m.last_layer.weight.requires_grad and not m.prototypes.requires_grad
    m.train()  # Lightning calls train() again: frozen parts must stay in eval
    assert not m.backbone.training and not m.add_on.training
    m.enter_phase("joint")
    assert all(p.requires_grad for p in m.backbone.parameters()) and m.backbone.training
    with pytest.raises(ValueError, match="unknown phase 'pretrain'"):
        m.enter_phase("pretrain")


def test_schedule_entries_override_loss_weights():
    m = small(schedule=[{"phase": "joint", "epochs": 2, "clst_weight": 0.0, "sep_weight": 0.0},
                        {"phase": "push"}, {"phase": "last_layer", "epochs": 1}])
    schedule = m.training_schedule
    assert schedule.phase_at(1).name == "joint" and schedule.actions_at(2) == ["push"]
    assert schedule.phase_at(2).name == "last_layer" and schedule.phase_at(9).name == "last_layer"
    m.apply_phase(schedule.phase_at(1))  # the phase in force mid-way carries its entry's overrides
    assert m.loss_weight("clst_weight") == 0.0 and m.loss_weight("l1_weight") == pytest.approx(1e-4)
    batch = {"image": images(4), "label": torch.tensor([0, 1, 2, 0])}
    loss, logits, logs = m.loss(batch)
    torch.testing.assert_close(loss, logs["ce"] + 1e-4 * logs["l1"])


def test_param_groups_use_the_per_part_learning_rates():
    m = small(lr=3e-3, backbone_lr=1e-4, last_layer_lr=2e-4)
    lrs = {g["name"]: g["lr"] for g in m.param_groups()}
    assert lrs == {"backbone": 1e-4, "add_on": 3e-3, "prototypes": 3e-3, "last_layer": 2e-4}
    n = sum(p.numel() for g in m.param_groups() for p in g["params"])
    assert n == sum(p.numel() for p in m.parameters())


def _fit_tiny_synthetic(seed: int) -> dict[str, float]:
    """Eval-mode training accuracy of a small ProtoPNet fitted (CE only, joint phase) to 96 synthetic images
    of 3 classes: 24 epochs of 3 batches, every part at lr 3e-3 (explicit: independent of the defaults),
    cosine-decayed to 0 so the batch-norm running statistics settle with the weights."""
    from zoo.data import make_synthetic

    n, batch, epochs = 96, 32, 24
    data = make_synthetic(n, num_classes=3, seed=1 + seed)
    x, y = data["images"] * 2 - 1, data["labels"]
    torch.manual_seed(seed)  # the initialisation
    m = zoo.create_model("protopnet", **GEOM, **SMALL, lr=3e-3, backbone_lr=3e-3, last_layer_lr=3e-3,
                         weight_decay=1e-4)
    m.train()
    m.enter_phase("joint", clst_weight=0.0, sep_weight=0.0)
    opt = torch.optim.AdamW(m.param_groups())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * (n // batch))
    for _ in range(epochs):
        for i in range(0, n, batch):
            loss, _, _ = m.loss({"image": x[i:i + batch], "label": y[i:i + batch]})
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    m.eval()
    with torch.no_grad():
        return {"acc": float((m(x).argmax(1) == y).float().mean())}


def test_protopnet_learns_tiny_synthetic_data():
    """Seeds 0/1/2 fit the images perfectly (1.0; 9 of seeds 0–9 give 1.0, the worst 0.93): the threshold
    leaves a wide margin for cross-machine differences and sits far above chance."""
    acc = _fit_tiny_synthetic(SEED)["acc"]
    assert acc >= 0.75, f"training accuracy {acc:.3f}; chance is 1/3"


# ---------------------------------------------------------------------------- probabilistic prototypes
def test_prob_protopnet_is_an_mc_predictive_with_exact_per_sample_decompositions():
    m = small("prob_protopnet", n_samples=4)
    x = images(3)
    expl = m.explain(x)
    sample_logits = expl.extras["sample_logits"]  # (S,B,K)
    assert sample_logits.shape == (4, 3, 3)
    torch.testing.assert_close(expl.extras["sample_contributions"].sum(-1), sample_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expl.logits.softmax(-1), sample_logits.softmax(-1).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(x), expl.logits, rtol=0, atol=0)  # deterministic: the stored ε
    # the mean exact map sums to the mean sampled target logit
    mean_t = sample_logits.gather(2, expl.target[None, :, None].expand(4, -1, 1))[..., 0].mean(0)
    torch.testing.assert_close(expl.attribution.sum((1, 2, 3)), mean_t, rtol=1e-5, atol=1e-5)
    u = expl.uncertainty
    assert set(u) == {"predictive_entropy", "mutual_information", "similarity_variance", "top_prototype_disagreement",
                      "distance_variance", "top_prototype_distance_variance", "class_distance_variance",
                      "contribution_variance", "class_prototype_mahalanobis", "prototype_mahalanobis",
                      "nearest_sample_distance"}
    assert all(v.shape == (3,) for v in u.values())
    assert (u["predictive_entropy"] <= math.log(3) + 1e-5).all() and (u["mutual_information"] >= 0).all()
    assert ((u["top_prototype_disagreement"] >= 0) & (u["top_prototype_disagreement"] < 1)).all()


def test_prob_protopnet_samples_in_training_and_kl_acts_on_sigma_only():
    m = small("prob_protopnet")
    batch = {"image": images(4), "label": torch.tensor([0, 1, 2, 0])}
    m.train()
    torch.manual_seed(1)
    a = m.loss(batch)[0]
    b = m.loss(batch)[0]
    assert not torch.equal(a, b)  # fresh reparameterised samples
    with torch.no_grad():
        m.log_std.fill_(math.log(m.hparams.prior_std))
    assert float(m.kl()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        m.log_std.fill_(-20.0)
    assert float(m.kl()) > 10  # collapsed σ is penalised
    assert any(p is m.log_std for p in m.prototype_parameters())  # σ trains with the prototypes


def test_uncertainty_is_zero_when_all_samples_agree():
    m = small("prob_protopnet", n_samples=3)
    with torch.no_grad():
        m.log_std.fill_(-30.0)  # σ ≈ 0: every sample is the mean
    u = m.explain(images(2)).uncertainty
    assert torch.allclose(u["mutual_information"], torch.zeros(2), atol=1e-6)
    assert torch.allclose(u["similarity_variance"], torch.zeros(2), atol=1e-8)
    assert (u["top_prototype_disagreement"] == 0).all()


# ---------------------------------------------------------------------------- prototype head
def test_proto_head_is_light_and_its_backbone_frozen():
    m = small("proto_head")
    assert m.head_parameters() <= 1_000_000
    assert not any(p.requires_grad for p in m.backbone.parameters())
    assert all(g["name"] != "backbone" for g in m.param_groups())
    m.train()
    m.enter_phase("joint")
    assert not m.backbone.training and m.add_on.training and m.last_layer.weight.requires_grad
    timm_head = zoo.create_model("proto_head", **GEOM, backbone="resnet18", backbone_checkpoint=None)
    assert timm_head.head_parameters() <= 1_000_000
    assert timm_head.explain(images(1)).attribution.shape == (1, 1, 32, 32)


def test_proto_head_loads_backbone_weights_from_a_zoo_checkpoint(tmp_path, caplog):
    cnn = zoo.create_model("cnn", **GEOM, widths=(8, 16, 16))
    folder = zoo.save(cnn, tmp_path / "cnn")
    head = zoo.create_model("proto_head", **GEOM, widths=(8, 16, 16), backbone_checkpoint=str(folder))
    for (k, a), (_, b) in zip(cnn.backbone.state_dict().items(), head.backbone.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="do not fit backbone='zoo_cnn'"):
        zoo.create_model("proto_head", **GEOM, widths=(8, 16, 32), backbone_checkpoint=str(folder))
    with pytest.raises(FileNotFoundError):  # a named backbone that is absent is an error, not a random backbone
        zoo.create_model("proto_head", **GEOM, backbone_checkpoint=str(tmp_path / "absent"))


# ---------------------------------------------------------------------------- EvalProtoPNet metrics
def _peak_maps(points, size=32):
    """(N,P,2) (row, col) → maps with a single maximum there."""
    N, P, _ = points.shape
    maps = torch.zeros(N, P, size, size)
    for i in range(N):
        for j in range(P):
            maps[i, j, points[i, j, 0], points[i, j, 1]] = 1.0
    return maps


def test_box_half_size_scales_36px_at_224():
    assert box_half_size(224) == 36.0 and box_half_size(32) == pytest.approx(36 * 32 / 224)


def test_part_hits_consistency_and_stability_on_constructed_maps():
    # 2 images of class 0, 1 keypoint each (x=col, y=row), 2 prototypes of class 0
    kp = torch.tensor([[[10.0, 12.0, 1.0]], [[20.0, 5.0, 1.0]]])
    labels, pclass = torch.tensor([0, 0]), torch.tensor([0, 0])
    # prototype 0 peaks on the keypoint in both images; prototype 1 hits it in one image only
    peaks = torch.tensor([[[12, 10], [12, 14]], [[5, 20], [30, 0]]])
    maps = _peak_maps(peaks)
    hits = part_hits(maps, kp)  # (N,P,K)
    assert hits[:, :, 0].tolist() == [[True, True], [True, False]]  # |14−10| = 4 ≤ 5.14
    c = consistency(hits, kp, labels, pclass)
    assert c["per_prototype"].tolist() == [1.0, 0.5] and c["consistency"] == 0.5
    assert stability(hits, hits, labels, pclass)["stability"] == 1.0
    moved = _peak_maps(torch.tensor([[[12, 10], [12, 30]], [[5, 20], [30, 0]]]))
    assert stability(hits, part_hits(moved, kp), labels, pclass)["stability"] == 0.75
    # invisible keypoints never count
    kp_hidden = kp.clone()
    kp_hidden[1, 0, 2] = 0
    assert consistency(part_hits(maps, kp_hidden), kp_hidden, labels, pclass)["per_prototype"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"keypoints must be \(N,K,3\)"):
        part_hits(maps, kp[:, :, :2])


def test_prototype_interpretability_of_input_independent_maps_is_perfectly_stable():
    maps = _peak_maps(torch.tensor([[[12, 10]]]).expand(3, 1, 2).contiguous())
    row = prototype_interpretability(lambda x: maps[: x.shape[0]], images(3), torch.tensor([0, 0, 1]),
                                     torch.tensor([0]), keypoints=torch.tensor([[[10.0, 12.0, 1.0]]]).expand(3, 1, 3))
    assert row == {"consistency": 1.0, "stability": 1.0, "argmax_stability": 1.0, "map_iou": 1.0}


# ---------------------------------------------------------------------------- figures
def test_figures_are_written(tmp_path):
    from zoo.viz.prototype import prototype_gallery

    m = small()
    with pytest.raises(ValueError, match="no pushed prototypes"):
        prototype_gallery(m)
    m.push(tiny_dataset(12))
    expl = m.explain(images(3))
    path = tmp_path / "local.png"
    fig = expl.plot(path, max_items=3, class_names=["a", "b", "c"])
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]  # the viz may add colour bars
    assert path.stat().st_size > 5000 and len(panels) == 3 * 5
    gallery = prototype_gallery(m, tmp_path / "gallery.png", class_names=["a", "b", "c"])
    panels = [ax for ax in gallery.axes if ax.get_label() != "<colorbar>"]
    assert (tmp_path / "gallery.png").stat().st_size > 5000 and len(panels) == 3 * 2


# ---------------------------------------------------------------------------- training machinery
def test_prob_protopnet_logged_test_accuracy_is_the_predictive_accuracy(tmp_path):
    """val/test metrics come from the S-sample predictive forward() returns, not from one random draw."""
    from conftest import compose
    from zoo.training import train

    run = tmp_path / "run"
    flat = train(compose(["model=prob_protopnet", "model.widths=[8,16]", "model.prototype_dim=8",
                          "model.prototypes_per_class=2", "model.n_samples=4", "trainer.max_epochs=2",
                          "model.schedule=[{phase:joint,epochs:2}]", "data.n_train=96", "data.n_val=32",
                          "data.n_test=64", "callbacks=none", "logger=none", "evaluate.explanations=false",
                          "evaluate.compare_baseline=false"], run))
    model = zoo.load(run / "model")
    from torch.utils.data import DataLoader

    from zoo.data import SyntheticDataModule

    dm = SyntheticDataModule(n_train=96, n_val=32, n_test=64)
    dm.setup()
    batch = next(iter(DataLoader(dm.dataset("test"), batch_size=64)))
    with torch.no_grad():
        acc = float((model(batch["image"]).argmax(1) == batch["label"]).float().mean())
    assert flat["prob_protopnet/acc"] == pytest.approx(acc, abs=1e-6)
    with torch.no_grad():  # and it is deterministic: the same number twice
        loss_a, logits_a, _ = model.loss(batch)
        loss_b, logits_b, _ = model.loss(batch)
    assert torch.equal(logits_a, logits_b) and torch.equal(logits_a, model(batch["image"]))


def test_multilabel_batch_with_an_all_negative_row_has_finite_loss_and_gradients():
    m = small(task="multilabel").train()
    labels = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float)  # row 1: no label
    loss, _, logs = m.loss({"image": images(4), "label": labels})
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logs["clst"]) and torch.isfinite(logs["sep"])
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # rows without own (row 1) / other-class (row 2) prototypes leave the means
    with torch.no_grad():
        d_min = m._parts(m.features(images(4)))["d_min"]
    own = (labels @ m.prototype_identity.T > 0)
    clst, sep = m.prototype_loss(labels, d_min)
    expected_clst = torch.stack([d_min[i][own[i]].min() for i in (0, 2, 3)]).mean()
    expected_sep = torch.stack([d_min[i][~own[i]].min() for i in (0, 1, 3)]).mean()
    torch.testing.assert_close(clst, expected_clst)
    torch.testing.assert_close(sep, expected_sep)
    none = torch.zeros(2, 3)  # no row has an own prototype: Clst is 0, not finfo.max
    assert float(m.prototype_loss(none, d_min[:2])[0]) == 0.0


@pytest.mark.parametrize("similarity", ["log_l2", "cosine"])
def test_distances_are_fp32_under_autocast(similarity):
    from zoo.models.prototypes.similarity import distances, similarity_from_distance

    g = torch.Generator().manual_seed(0)
    z = torch.rand(2, 16, 4, 4, generator=g) * 10
    p = z[0, :, 1, 2][None] + 1e-3 * torch.rand(3, 16, generator=g)  # near-exact matches: catastrophic cancellation
    exact = similarity_from_distance(distances(z, p, similarity), similarity)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = distances(z.bfloat16(), p, similarity)
        s = similarity_from_distance(d, similarity)
    assert d.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(s, similarity_from_distance(distances(z.bfloat16().float(), p, similarity), similarity))
    assert float((s - exact).abs().max()) < 0.5 * float(exact.abs().max())


def test_prototype_report_has_grad_cam_of_the_network_itself_with_its_layer_chosen_on_val():
    """image_report_rows adds Grad-CAM on the prototype network (last layer and best layer, chosen on
    val): the same logits explained post hoc, measured on the balanced test images of its own map's row."""
    import zoo.evaluation as E
    from zoo.nets.backbones import conv_layer_names

    m = small()
    g = torch.Generator().manual_seed(0)

    def split(n):
        mask = torch.zeros(n, 32, 32)
        mask[:, 8:16, 8:16] = 1
        return [{"image": torch.rand(n, 1, 32, 32, generator=g) * 2 - 1, "label": torch.arange(n) % 3, "mask": mask}]

    class Data:
        test, val = split(12), split(12)

        def setup(self, stage):
            pass

        def test_dataloader(self):
            return self.test

        def val_dataloader(self):
            return self.val

    rows = m.image_report_rows(Data(), n_images=12)
    layers = conv_layer_names(m)
    own = [k for k in rows if k.startswith("protopnet grad-cam")]
    assert f"protopnet grad-cam[{layers[-1]}]" in own and len(own) == 2
    best = next(k for k in own if "best[" in k)[len("protopnet grad-cam best["):-1]
    assert best in layers and "protopnet prototypes (EvalProtoPNet)" in rows
    batch = E.take_images(Data(), "test", 12, balanced=True)
    again = E.attribution_metrics(m, lambda x, t: E.gradcam(m, x, t, best), batch, 24)
    assert rows[f"protopnet grad-cam best[{best}]"] == pytest.approx(again)
