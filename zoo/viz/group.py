"""Figure of a group explanation (Sum-of-Parts): the input with its top groups outlined.

One row per image: the input (ground-truth evidence outlined in lime when given, the top groups
outlined in their colours), the attribution map (red = for the explained class, blue = against),
then one panel per top group — the input seen through that group's mask, titled with the group's
contribution α·c·z to the explained logit and its selector weight α. Groups are ranked by
|contribution|; the contributions of *all* groups add up to the logit shown in the row's title.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from zoo.viz import SIGNED, colour_bar, panel_title, register_plotter, show_image, show_signed_map, to_display

COLOURS = ("#e41a1c", "#377eb8", "#ff7f00", "#984ea3", "#a65628", "#f781bf")


@register_plotter("group")
def plot_group(expl, max_items: int = 8, class_names: list[str] | None = None, masks=None, top_groups: int = 4,
               labels=None, **_: Any):
    if expl.inputs is None or expl.group_masks is None or expl.contributions is None:
        raise ValueError("a group explanation needs inputs, group_masks and contributions to be drawn")
    n = min(max_items, len(expl))
    G = min(top_groups, expl.group_masks.shape[1])
    fig, axes = plt.subplots(n, 2 + G, figsize=(2.0 * (2 + G) + 0.8, 2.1 * n + 0.4), squeeze=False, layout="constrained")
    for i in range(n):
        t = int(expl.target[i])
        contrib = expl.contributions[i, t].detach().cpu()  # (M,) sums to the logit
        order = contrib.abs().argsort(descending=True)[:G]
        show_image(axes[i, 0], expl.inputs[i], panel_title(expl, i, class_names, labels)
                   + f", logit {float(expl.logits[i, t]):.2f}")
        if masks is not None:
            axes[i, 0].contour(masks[i].squeeze().cpu().numpy(), levels=[0.5], colors="lime", linewidths=0.8)
        for rank, m in enumerate(order.tolist()):
            axes[i, 0].contour(expl.group_masks[i, m].cpu().numpy(), levels=[0.5],
                               colors=COLOURS[rank % len(COLOURS)], linewidths=0.9)
        shown = show_signed_map(axes[i, 1], expl.inputs[i], expl.attribution[i],
                                title="Σ groups" if i == 0 else None)
        image = to_display(expl.inputs[i])
        for rank, m in enumerate(order.tolist()):
            ax = axes[i, 2 + rank]
            group = expl.group_masks[i, m].cpu().numpy()
            ax.imshow(np.where(group > 0.5, image, 0.15 * image) if image.ndim == 2 else
                      np.where(group[..., None] > 0.5, image, 0.15 * image), cmap="gray", vmin=0, vmax=1)
            ax.contour(group, levels=[0.5], colors=COLOURS[rank % len(COLOURS)], linewidths=0.9)
            ax.set_axis_off()
            alpha = float(expl.group_weights[i, m, t]) if expl.group_weights is not None else float("nan")
            ax.set_title(f"group {m}: {float(contrib[m]):+.2f}\n(α={alpha:.2f})", fontsize=7)
        for rank in range(len(order), G):
            axes[i, 2 + rank].set_axis_off()
    colour_bar(fig, shown, axes[:, 1].tolist(), "logit " + SIGNED)
    fig.suptitle("Sum-of-Parts: top groups and their contributions to the explained logit", fontsize=9)
    return fig
