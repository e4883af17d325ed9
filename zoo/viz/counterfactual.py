"""Figure of a counterfactual explanation (GdVAE): one strip per image and a row of class prototypes.

Strip: input | reconstruction | counterfactuals x_δ ordered from the explained class toward the
counterfactual class (δ = pairwise probability of the counterfactual class, so p(explained) = 1 − δ
goes .95 → .05) | the change map |x_0.5 − x̂| (the explanation's attribution).
Last row: the decoded class prototypes Dec(μ_k, e_k).
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from zoo.viz import class_name, colour_bar, panel_title, register_plotter, show_heatmap, show_image


@register_plotter("counterfactual")
def counterfactual_strips(expl, max_items: int = 8, class_names: list[str] | None = None, masks=None, labels=None,
                          **_: Any):
    if expl.counterfactuals is None or expl.inputs is None:
        raise ValueError("a counterfactual figure needs expl.counterfactuals and expl.inputs")
    n = min(max_items, len(expl))
    probs = expl.extras.get("cf_probs")
    order = probs.argsort().tolist() if probs is not None else list(range(expl.counterfactuals.shape[1]))
    recon = expl.extras.get("reconstruction")
    prototypes = expl.extras.get("prototypes")
    T = len(order)
    cols = 2 + T + (1 if expl.attribution is not None else 0)
    rows = n + (1 if prototypes is not None else 0)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 0.8, 1.8 * rows + 0.4), squeeze=False,
                             layout="constrained")
    name = (lambda k: class_name(k, class_names))
    for i in range(n):
        k = int(expl.counterfactual_targets[i])
        show_image(axes[i, 0], expl.inputs[i], panel_title(expl, i, class_names, labels))
        if masks is not None:
            axes[i, 0].contour(masks[i].squeeze().cpu().numpy(), levels=[0.5], colors="lime", linewidths=0.6)
        if recon is not None:
            show_image(axes[i, 1], recon[i], "reconstruction")
        else:
            axes[i, 1].set_axis_off()
        for j, t in enumerate(order):
            label = f"→ {name(k)}\np({name(k)})={float(probs[t]):.2f}" if probs is not None else f"→ {name(k)}"
            show_image(axes[i, 2 + j], expl.counterfactuals[i, t], label)
        if expl.attribution is not None:
            shown = show_heatmap(axes[i, -1], None, expl.attribution[i], "|x_0.5 − x̂|")
            if i == n - 1:
                colour_bar(fig, shown, axes[:n, -1].tolist(), "change ÷ max")
    if prototypes is not None:
        for j in range(cols):
            axes[n, j].set_axis_off()
        for k in range(min(prototypes.shape[0], cols)):
            show_image(axes[n, k], prototypes[k], f"prototype {name(k)}")
    fig.suptitle(f"counterfactuals ({expl.extras.get('method', 'closed form')} latent move)", fontsize=9)
    return fig
