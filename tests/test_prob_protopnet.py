"""Prob-PSENN's explanatory uncertainty: the per-prototype distance variance rises away from the prototypes."""

from __future__ import annotations

import torch

import zoo

GEOM = dict(num_classes=3, in_channels=1, image_size=32)
SMALL = dict(widths=(8, 16, 16), prototype_dim=8, prototypes_per_class=2, n_samples=8)


def test_distance_variance_is_the_sample_variance_and_rises_away_from_the_prototypes():
    torch.manual_seed(0)
    m = zoo.create_model("prob_protopnet", **GEOM, **SMALL).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():  # every prototype mean on a feature cell of image 0: image 0 is "in distribution"
        z = m.features(x[:1]).flatten(2)[0].T  # (hw, D)
        m.prototypes.copy_(z[torch.arange(m.num_prototypes) * 7 % z.shape[0]])
    near = m.explain(x, maps=False).uncertainty
    with torch.no_grad():
        d_s = torch.stack([p["d_min"] for p in m._sample_parts(x)])
    assert {"distance_variance", "top_prototype_distance_variance", "similarity_variance"} <= set(near)
    torch.testing.assert_close(near["distance_variance"], d_s.var(0).mean(1))
    with torch.no_grad():  # the same inputs, now far from every prototype (features live in (0,1)^D)
        m.prototypes.add_(3.0)
    far = m.explain(x, maps=False).uncertainty
    assert (far["distance_variance"] > 10 * near["distance_variance"]).all()
    assert (far["top_prototype_distance_variance"] > near["top_prototype_distance_variance"]).all()
    assert (far["similarity_variance"] < near["similarity_variance"]).all()  # why the old signal ran the wrong way
