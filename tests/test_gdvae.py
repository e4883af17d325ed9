"""GdVAE: the Gaussian-discriminant identity, closed-form counterfactuals hitting their target
probability exactly, the explanation's fields and errors, learning on tiny data, the counterfactual
metrics on constructed cases, the gradient-search comparison point, and the figure."""

from __future__ import annotations

import math

import pytest
import torch

import zoo
from zoo.metrics import counterfactuals as CF
from zoo.models.gdvae import GdVAE, counterfactual_report, gradient_counterfactuals, pairwise_log_odds


def make(num_classes=5, **kw) -> GdVAE:
    torch.manual_seed(0)
    model = zoo.create_model("gdvae", num_classes=num_classes, in_channels=1, image_size=28, **kw).eval()
    with torch.no_grad():  # a non-trivial prior: unit-scale prototypes, unequal variances
        model.class_centres.copy_(torch.randn_like(model.class_centres))
        model.log_sigma.copy_(0.3 * torch.randn_like(model.log_sigma))
    return model


def test_logits_are_the_gaussian_posterior():
    """softmax(Wz + b) == p(y|z) computed from the class-conditional Gaussians N(μ_k, Σ) and p(k)."""
    model = make()
    z = torch.randn(7, model.hparams.latent_dim)
    sigma = model.log_sigma.exp()
    log_joint = torch.stack([torch.distributions.Normal(mu, sigma).log_prob(z).sum(1) for mu in model.class_means], 1)
    log_joint = log_joint + model.log_class_prior
    torch.testing.assert_close(model.latent_logits(z).softmax(1), log_joint.softmax(1), rtol=1e-5, atol=1e-6)
    x = model.example_input(3)
    torch.testing.assert_close(model(x), model.latent_logits(model.encode(x)[0]))


@pytest.mark.parametrize("method", ["minimal", "prototype"])
def test_counterfactual_latents_hit_the_pairwise_probability(method):
    model = make()
    z = torch.randn(6, model.hparams.latent_dim)
    source = model.latent_logits(z).argmax(1)
    target = (source + 2) % 5
    probs = [0.05, 0.3, 0.5, 0.9, 0.99]
    z_cf = model.counterfactual_latents(z, source, target, probs, method)  # (6,5,D)
    logits = model.latent_logits(z_cf)  # (6,5,K)
    at = lambda cls: logits.gather(2, cls.view(6, 1, 1).expand(6, 5, 1)).squeeze(2)  # noqa: E731 (6,T)
    pair = torch.sigmoid(at(target) - at(source))  # p_k / (p_c + p_k)
    torch.testing.assert_close(pair, torch.tensor(probs).expand(6, 5), rtol=0, atol=1e-4)
    full = logits.softmax(-1).gather(2, target.view(6, 1, 1).expand(6, 5, 1)).squeeze(2)  # (6,T)
    assert (full <= pair + 1e-6).all()  # K > 2: the other classes keep some mass
    weight, bias = model.classifier()
    w = weight[source] - weight[target]
    move = z_cf - z[:, None]
    if method == "minimal":  # parallel to w, with the minimal length |f* − f| / ‖w‖
        cos = torch.nn.functional.cosine_similarity(move[:, 3], w, dim=1).abs()
        torch.testing.assert_close(cos, torch.ones(6), rtol=0, atol=1e-4)
        f = (w * z).sum(1) + bias[source] - bias[target]
        expected = (pairwise_log_odds(0.9) - f).abs() / w.norm(dim=1)
        torch.testing.assert_close(move[:, 3].norm(dim=1), expected, rtol=1e-4, atol=1e-5)
    else:  # on the line toward the target prototype
        direction = model.class_means[target] - z
        direction[:, model.class_dims:] = 0  # only the class dims move toward μ_k
        cos = torch.nn.functional.cosine_similarity(move[:, 3], direction, dim=1).abs()
        torch.testing.assert_close(cos, torch.ones(6), rtol=0, atol=1e-4)


def test_style_dims_carry_no_class_information():
    """μ_k is shared (0) on the style dims, so the classifier ignores them and a counterfactual moves
    only the class dims: background and layout codes stay exactly where the encoder put them."""
    model = make()
    D, Dc = model.hparams.latent_dim, model.class_dims
    assert 1 <= Dc < D
    assert (model.class_means[:, Dc:] == 0).all()
    weight, _ = model.classifier()
    assert (weight[:, Dc:] == 0).all()
    z = torch.randn(5, D)
    source = model.latent_logits(z).argmax(1)
    for method in ("minimal", "prototype"):
        z_cf = model.counterfactual_latents(z, source, (source + 1) % 5, [0.2, 0.9], method)
        torch.testing.assert_close(z_cf[..., Dc:], z[:, None, Dc:].expand(5, 2, D - Dc))
        assert not torch.allclose(z_cf[..., :Dc], z[:, None, :Dc].expand(5, 2, Dc))
    with pytest.raises(ValueError, match="class_dims must be in"):
        zoo.create_model("gdvae", latent_dim=4, class_dims=5)


def test_consistency_term_trains_only_the_decoder():
    """The re-encoding of sampled counterfactuals must not train the encoder (it would collude with the
    decoder on a class code instead of real evidence): zero encoder gradient, non-zero decoder gradient."""
    model = make().train()
    z = torch.randn(8, model.hparams.latent_dim)
    y = torch.arange(8) % 5
    sum(model._consistency(z, y)).backward()  # both the latent L2 and the class KL
    enc = [p.grad for p in model.encoder.parameters()]
    assert all(g is None or g.abs().max() == 0 for g in enc)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.decoder.parameters())
    assert model.encoder.training  # its mode is restored


def test_film_decoder_starts_as_the_plain_decoder():
    """decoder_film=True adds class-conditioned scale/shift per stage, zero-initialised: at init it is the
    plain decoder, and once trained the class vector acts at every stage."""
    torch.manual_seed(0)
    model = zoo.create_model("gdvae", num_classes=3, in_channels=1, image_size=28, decoder_film=True).eval()
    z, y = torch.randn(2, model.hparams.latent_dim), torch.eye(3)[:2]
    with torch.no_grad():
        film = model.decoder.film
        with_film = model.decoder(z, y)
        model.decoder.film = None
        plain = model.decoder(z, y)
        model.decoder.film = film
        torch.testing.assert_close(with_film, plain)
        for lin in film:
            lin.weight.normal_(0, 0.5)
        assert not torch.allclose(model.decoder(z, y), plain)


def test_object_decoder_confines_the_class_to_the_glyph_window():
    """decoder="object": the class dims and the class vector reach only the glyph window centred on the
    two "where" dims (the encoder's attention centroid, in [-1, 1]); moving "where" by 4 px moves the
    glyph by exactly 4 px and leaves the background alone."""
    torch.manual_seed(0)
    model = zoo.create_model("gdvae", num_classes=3, in_channels=1, image_size=32, decoder="object",
                             glyph_fraction=0.375, decoder_film=True).eval()
    Dc = model.class_dims
    z, _ = model.encode(model.example_input(2))
    where = z[:, Dc:Dc + 2]
    assert (where.abs() <= 1).all()
    z[:, Dc:Dc + 2] = torch.tensor([-0.5, 0.25])  # glyph centre at pixel (x, y) = (8, 20)
    with torch.no_grad():
        moved = z.clone()
        moved[:, :Dc] += 3.0  # a counterfactual-like move of the class dims, and another class vector
        change = (model.decoder(moved, torch.eye(3)[[2, 2]]) - model.decoder(z, torch.eye(3)[[0, 0]])).abs()
        window = torch.zeros(32, 32, dtype=torch.bool)
        window[20 - 6:20 + 6, 8 - 6:8 + 6] = True  # 0.375 · 32 = 12 px
        assert change[:, 0, window].amax() > 1e-3
        assert change[:, 0, ~window].amax() < 1e-6
        shifted = z.clone()
        shifted[:, Dc] += 8 / 32  # +4 px in x
        dec = model.decoder
        glyph = lambda zz: torch.atanh(dec(zz, torch.eye(3)[[1, 1]]).clamp(-0.999999, 0.999999))  # noqa: E731
        bg = dec.background(z[:, Dc + 2:], z.new_zeros(2, 0), False)
        a, b = glyph(z) - bg, glyph(shifted) - bg  # the pasted glyph alone
        torch.testing.assert_close(b[..., 4:], a[..., :-4], rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="unknown decoder"):
        zoo.create_model("gdvae", decoder="layered")
    with pytest.raises(ValueError, match="glyph_fraction must be in"):
        zoo.create_model("gdvae", decoder="object", glyph_fraction=1.5)
    with pytest.raises(ValueError, match="no room"):
        zoo.create_model("gdvae", decoder="object", latent_dim=9, class_dims=8)


def test_binary_counterfactual_probability_is_the_softmax():
    model = make(num_classes=2)
    z = torch.randn(4, model.hparams.latent_dim)
    source = model.latent_logits(z).argmax(1)
    z_cf = model.counterfactual_latents(z, source, 1 - source, [0.2, 0.75])
    p = model.latent_logits(z_cf).softmax(-1).gather(2, (1 - source).view(4, 1, 1).expand(4, 2, 1)).squeeze(2)
    torch.testing.assert_close(p, torch.tensor([[0.2, 0.75]]).expand(4, 2), rtol=0, atol=1e-5)


def test_explain_fields_and_semantics():
    model = make()
    x = model.example_input(3)
    expl = model.explain(x)
    T = len(model.hparams.cf_probs)
    assert expl.kind == "counterfactual"
    assert expl.counterfactuals.shape == (3, T, 1, 28, 28)
    assert expl.counterfactual_latents.shape == (3, T, model.hparams.latent_dim)
    runner_up = expl.logits.topk(2, dim=1).indices[:, 1]
    assert torch.equal(expl.counterfactual_targets, runner_up)  # default: toward the runner-up
    assert expl.extras["prototypes"].shape == (5, 1, 28, 28)
    assert expl.extras["cf_probabilities"].shape == (3, T, 5)
    # The images are the decoded latents; the map is |x_0.5 − x̂| summed over channels.
    torch.testing.assert_close(expl.counterfactuals[:, 1], model.decode(expl.counterfactual_latents[:, 1]))
    boundary, recon = expl.extras["boundary_counterfactual"], expl.extras["reconstruction"]
    torch.testing.assert_close(expl.attribution, (boundary - recon).abs().sum(1, keepdim=True))
    literal = model.explain(x, attribution_reference="input")
    torch.testing.assert_close(literal.attribution, (boundary - x).abs().sum(1, keepdim=True))
    # The boundary counterfactual sits where the two classes tie.
    z_b = model.counterfactual_latents(expl.extras["latent"], expl.target, runner_up, [0.5])[:, 0]
    lb = model.latent_logits(z_b)
    torch.testing.assert_close(lb.gather(1, expl.target[:, None]), lb.gather(1, runner_up[:, None]), rtol=0, atol=1e-4)
    # Explicit targets are honoured.
    forced = model.explain(x, target=1, cf_target=3, probs=[0.9])
    assert (forced.target == 1).all() and (forced.counterfactual_targets == 3).all()
    assert forced.counterfactuals.shape[1] == 1


@pytest.mark.parametrize("decoder", ["plain", "object"])
def test_three_channel_64px_model_runs(decoder):
    torch.manual_seed(0)
    model = zoo.create_model("gdvae", num_classes=3, in_channels=3, image_size=64, decoder=decoder).eval()
    expl = model.explain(model.example_input(2))
    assert expl.counterfactuals.shape == (2, 5, 3, 64, 64) and expl.attribution.shape == (2, 1, 64, 64)


def test_clear_errors():
    model = make()
    x = model.example_input(2)
    with pytest.raises(ValueError, match="cf_target must differ"):
        model.explain(x, target=1, cf_target=1)
    with pytest.raises(ValueError, match="cf_target class out of range"):
        model.explain(x, cf_target=9)
    with pytest.raises(ValueError, match=r"strictly in \(0, 1\)"):
        model.explain(x, probs=[0.5, 1.0])
    with pytest.raises(ValueError, match="unknown counterfactual method"):
        model.explain(x, method="gradient")
    with pytest.raises(ValueError, match="task='multiclass'"):
        zoo.create_model("gdvae", num_classes=3, task="multilabel")
    with pytest.raises(ValueError, match="unknown cf_method"):
        zoo.create_model("gdvae", cf_method="nope")


SEED = 0  # of the learning test; its thresholds sit far below what seeds 0, 1 and 2 give (issue #13)


def _tiny_data(n=128, seed=0):
    """Two classes: a bright blob in the top-left vs bottom-right quadrant, on noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = -0.8 + 0.1 * torch.randn(n, 1, 28, 28, generator=g)
    x[y == 0, :, 4:12, 4:12] = 0.8
    x[y == 1, :, 16:24, 16:24] = 0.8
    mask = torch.zeros(n, 1, 28, 28)
    mask[y == 0, :, 4:12, 4:12] = 1
    mask[y == 1, :, 16:24, 16:24] = 1
    return x.clamp(-1, 1), y, mask


def _learn_tiny_data(seed: int) -> dict[str, float]:
    """A small GdVAE trained on the blobs (consistency term from the start); returns the eval-mode training
    accuracy, the validity of the δ = 0.99 counterfactuals and the share of the boundary change (the
    attribution) on the two blobs."""
    from torch.optim.swa_utils import update_bn

    x, y, mask = _tiny_data(seed=seed)
    g = torch.Generator().manual_seed(seed)  # batch draws
    torch.manual_seed(seed)  # the initialisation and the model's own sampling (z, counterfactual δ)
    model = zoo.create_model("gdvae", num_classes=2, in_channels=1, image_size=28, widths=[16, 32], latent_dim=4,
                             class_dims=2, schedule=[], ce_weight=20.0, consistency_weight=10.0)
    # 200 steps only: with the default momentum (0.1) the encoder's batch-norm running statistics lag the
    # weights, and both eval mode and the consistency term (it re-encodes with the running statistics)
    # see a stale encoder; measured, that alone flipped validity between 0 and 1 from seed to seed.
    for module in model.encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.5
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):  # the decoder needs ~150 steps of the consistency term to redraw the blob
        idx = torch.randint(0, x.shape[0], (32,), generator=g)
        loss, _, _ = model.loss({"image": x[idx], "label": y[idx]})
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # the statistics at the final weights, as GdVAE.on_train_end does under a Trainer
        update_bn([x], model.encoder)
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    out = model.counterfactuals(x, probs=(0.99,))
    valid = float(CF.validity(model(out["images"][:, 0]), out["target"]).mean())
    expl = model.explain(x, target=y)
    both = mask + mask.flip(-1).flip(-2)  # the own blob and the other class's blob
    return {"acc": acc, "validity": valid, "mass": float(CF.mass_in_mask(expl.attribution, both).mean())}


def test_learns_tiny_data_with_valid_counterfactuals():
    """Seeds 0/1/2: accuracy 1.0, validity 1.0 and 0.72/0.60/0.43 of the change on the blobs (seeds 0–5:
    validity 1.0, change on the blobs ≥ 0.32; they fill 0.16 of the image). Validity is per class all or
    nothing here (0.5 = one class's counterfactuals fail), so its threshold asks for both classes."""
    got = _learn_tiny_data(SEED)
    assert got["acc"] >= 0.9, f"training accuracy {got['acc']:.3f}; chance is 0.5"
    assert got["validity"] >= 0.75, f"validity {got['validity']:.3f}; a decoder that ignores the move gives 0"
    # The change at the boundary sits on the two blobs (where the evidence is), not on the noise.
    assert got["mass"] >= 0.25, f"change on the blobs {got['mass']:.3f}; 0.16 if spread evenly"


def test_counterfactual_metrics_on_constructed_cases():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    torch.testing.assert_close(CF.validity(logits, torch.tensor([0, 1, 1])), torch.tensor([1.0, 1.0, 0.0]))
    a, b = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    b[0, 0, 0, 0] = 1.0
    torch.testing.assert_close(CF.proximity_l1(b, a), torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(CF.latent_consistency(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)), torch.tensor([5.0]))
    change = torch.tensor([[[[1.0, 3.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    mask = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    got = CF.mass_in_mask(change, mask)
    assert got[0] == 0.75 and math.isnan(got[1])  # all-zero map: nothing to score
    with pytest.raises(ValueError, match="non-negative"):
        CF.mass_in_mask(-change, mask)
    shape = torch.zeros(2, 1, 8, 8)
    shape[0, 0, 2, 3] = shape[0, 0, 4, 5] = 1  # two pixels: box rows 2..4, cols 3..5
    box = CF.bounding_box_mask(shape, pad=1)
    expected = torch.zeros(8, 8)
    expected[1:6, 2:7] = 1
    torch.testing.assert_close(box[0, 0], expected)
    assert box[1].sum() == 0  # empty mask, empty box
    ref = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    torch.testing.assert_close(CF.nearest_neighbour_distance(torch.full((1, 1, 2, 2), 0.75), ref), torch.tensor([0.25]))
    conf = CF.classifier_confidence(lambda im: torch.tensor([[0.0, math.log(3.0)]]).expand(im.shape[0], 2),
                                    torch.zeros(2, 1, 2, 2), torch.tensor([1, 0]))
    torch.testing.assert_close(conf, torch.tensor([0.75, 0.25]))


class _ConstantJudge(torch.nn.Module):
    """A zoo-cnn-shaped judge (backbone → global average pool → head) that calls every image class 0
    and whose pooled feature is the image's mean pixel value."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Identity()
        self.head = torch.nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([1.0, 0.0]))

    def forward(self, x):
        return self.head(self.backbone(x).mean(dim=(2, 3)))


def test_independent_judge_decides_validity_and_realism():
    """Validity by a judge that always answers class 0 is 1 for CFs toward class 0 and 0 toward class 1,
    whatever the GdVAE's own encoder reads back; the realism distance is the judge's feature distance."""
    model = make(num_classes=2)
    torch.manual_seed(1)
    x = torch.rand(16, 1, 28, 28) * 2 - 1
    y = torch.arange(16) % 2
    with torch.no_grad():  # shift the class prior so that the model predicts both classes on x
        gap = model(x)[:, 1] - model(x)[:, 0]
        model.log_class_prior[1] -= gap.median() + 1e-4
    ref = {"image": model.example_input(40), "label": torch.arange(40) % 2}
    judge = _ConstantJudge()
    rows = counterfactual_report(model, {"image": x, "label": y}, ref, judge=judge, gradient_images=0,
                                 methods=("minimal",))
    row = rows["gdvae (counterfactuals)"]
    pred = model(x).argmax(1)
    assert 0 < int(pred.sum()) < 16  # both classes predicted, so both targets occur
    assert row["cf_validity_judge"] == pytest.approx(float((pred == 1).float().mean()))  # target 0 ⇔ pred 1
    assert row["cf_validity_judge_worst"] == 0.0
    # Realism: nearest training image of the target class in the judge's feature space (the mean pixel).
    cf = model.counterfactuals(x, cf_target=None, probs=(0.9,), method="minimal")
    feat = cf["images"][:, 0].mean(dim=(1, 2, 3))
    ref_feat = ref["image"].mean(dim=(1, 2, 3))
    want = torch.stack([(feat[i] - ref_feat[ref["label"] == cf["target"][i]]).abs().min() for i in range(16)])
    assert row["cf_judge_nn_dist"] == pytest.approx(float(want.mean()), rel=1e-4)
    real = torch.stack([(x[i].mean() - ref_feat[ref["label"] == pred[i]]).abs().min() for i in range(16)])
    assert row["real_judge_nn_dist"] == pytest.approx(float(real.mean()), rel=1e-4)
    assert row["cf_judge_nn_ratio"] == pytest.approx(row["cf_judge_nn_dist"] / row["real_judge_nn_dist"])
    assert "cf_validity_judge" not in counterfactual_report(model, {"image": x}, ref, gradient_images=0,
                                                            methods=("minimal",))["gdvae (counterfactuals)"]
    with pytest.raises(ValueError, match="reference set is empty"):
        CF.nearest_neighbour_distance(x, x[:0])


def test_gradient_search_reaches_the_same_probability():
    model = make()
    x = model.example_input(4)
    closed = model.counterfactuals(x, probs=(0.9,))
    out = gradient_counterfactuals(model, x, closed["source"], closed["target"], prob=0.9, objective="latent",
                                   steps=300, lr=0.1)
    logits = model.latent_logits(out["latents"])
    rows = torch.arange(4)
    pair = torch.sigmoid(logits[rows, closed["target"]] - logits[rows, closed["source"]])
    assert (pair >= 0.9).all() and (out["steps"] > 0).all()
    with pytest.raises(ValueError, match="objective"):
        gradient_counterfactuals(model, x, closed["source"], closed["target"], objective="pixels")


def test_figure_has_strips_and_prototypes(tmp_path):
    model = make(num_classes=3)
    x = model.example_input(2)
    expl = model.explain(x)
    fig = expl.plot(tmp_path / "cf.png", class_names=["a", "b", "c"])
    # 2 strips + 1 prototype row, each 2 + T + 1 panels (a colour bar, if drawn, adds one axis).
    panels = 3 * (2 + len(model.hparams.cf_probs) + 1)
    assert panels <= len(fig.axes) <= panels + 1
    assert (tmp_path / "cf.png").stat().st_size > 0
