"""Prob-PSENN's explanatory uncertainty: per-prototype signals rise away from the prototypes, are the
sample statistics they claim to be, and are deterministic under a seed; the default schedule runs whole."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

import zoo
from zoo.models.prototypes.prob_protopnet import standardised_distances

GEOM = dict(num_classes=3, in_channels=1, image_size=32)
SMALL = dict(widths=(8, 16, 16), prototype_dim=8, prototypes_per_class=2, n_samples=8)


def model(**kw):
    torch.manual_seed(0)
    return zoo.create_model("prob_protopnet", **GEOM, **{**SMALL, **kw}).eval()


def inputs(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def put_prototypes_on(m, x: torch.Tensor) -> None:
    """Every prototype mean on a feature cell of image 0: image 0 is "at the prototype means"."""
    with torch.no_grad():
        z = m.features(x[:1]).flatten(2)[0].T  # (hw, D)
        m.prototypes.copy_(z[torch.arange(m.num_prototypes) * 7 % z.shape[0]])


def test_distance_variance_is_the_sample_variance_and_rises_away_from_the_prototypes():
    m, x = model(), inputs()
    put_prototypes_on(m, x)
    near = m.explain(x, maps=False).uncertainty
    with torch.no_grad():
        d_s = torch.stack([p["d_min"] for p in m._sample_parts(m.features(x))])
    torch.testing.assert_close(near["distance_variance"], d_s.var(0).mean(1))
    torch.testing.assert_close(near["nearest_sample_distance"], d_s.amin(dim=(0, 2)))
    with torch.no_grad():  # the same inputs, now far from every prototype (features live in (0,1)^D)
        m.prototypes.add_(3.0)
    far = m.explain(x, maps=False).uncertainty
    assert (far["distance_variance"] > 10 * near["distance_variance"]).all()
    assert (far["top_prototype_distance_variance"] > near["top_prototype_distance_variance"]).all()
    assert (far["similarity_variance"] < near["similarity_variance"]).all()  # why the old signal ran the wrong way


def test_class_signals_rise_when_the_explained_class_prototypes_are_far_and_ignore_the_others():
    m, x = model(), inputs(1)
    put_prototypes_on(m, x)
    own = m.prototype_class == 0
    keys = ("class_distance_variance", "class_prototype_mahalanobis")
    near = m.explain(x, target=0, maps=False).uncertainty
    with torch.no_grad():  # another class's prototypes moved away: the class-0 explanation's signals stay
        m.prototypes[m.prototype_class == 1] += 3.0
    other = m.explain(x, target=0, maps=False).uncertainty
    for k in keys:
        torch.testing.assert_close(other[k], near[k])
    with torch.no_grad():  # now the explained class's own prototypes are far from every cell of the input
        m.prototypes[own] += 3.0
    far = m.explain(x, target=0, maps=False).uncertainty
    for k in keys:
        assert (far[k] > 10 * near[k]).all(), k
    with torch.no_grad():  # the identity: mean over the class-0 prototypes of Var_s d_j
        d_s = torch.stack([p["d_min"] for p in m._sample_parts(m.features(x))])
    torch.testing.assert_close(far["class_distance_variance"], d_s.var(0)[:, own].mean(1))


def test_standardised_distances_are_the_diagonal_mahalanobis_distance_to_the_nearest_cell():
    g = torch.Generator().manual_seed(0)
    z, mu = torch.rand(2, 5, 3, 4, generator=g), torch.rand(6, 5, generator=g)
    sd = torch.rand(6, 5, generator=g) * 0.2 + 0.05
    cells = z.flatten(2).transpose(1, 2)  # (B,hw,D)
    brute = (((cells[:, None] - mu[None, :, None]) / sd[None, :, None]) ** 2).mean(-1).amin(-1)  # (B,P)
    torch.testing.assert_close(standardised_distances(z, mu, sd), brute, rtol=1e-4, atol=1e-4)


def test_uncertainty_signals_are_deterministic_under_the_sample_seed():
    x = inputs(3)
    a, b = model().explain(x, maps=False).uncertainty, model().explain(x, maps=False).uncertainty
    c = model(sample_seed=1).explain(x, maps=False).uncertainty
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["class_distance_variance"], c["class_distance_variance"])  # ε comes from the seed


def test_default_schedule_fits_the_default_trainer():
    """Cut short by trainer.max_epochs, the end-of-fit push leaves the last layer un-refit (test acc 0.53);
    the default budget (max_epochs null) runs the whole schedule, and 6 epochs are the whole of it."""
    from zoo.training import DEFAULT_EPOCHS, max_epochs

    trainer = yaml.safe_load((Path(__file__).parents[1] / "conf/trainer/default.yaml").read_text())
    assert trainer["max_epochs"] is None
    built = model()
    assert built.training_schedule.total_epochs == DEFAULT_EPOCHS
    assert max_epochs(OmegaConf.create({"trainer": trainer}), built) == DEFAULT_EPOCHS
