"""Figure of X-Node explanations (kind "node-context"): one row per explained node with

  its image | its neighbours as thumbnails, framed by training label (grey: no training label)
  | its context cues (standardised value) and the change in p(explained class) when each cue is
  removed | the offline text, wrapped.
"""

from __future__ import annotations

import textwrap
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from zoo.viz import class_name, panel_title, register_plotter

MAX_NEIGHBOURS = 8


def _thumb(ax, image: torch.Tensor | None, colour: str, title: str | None = None) -> None:
    if image is not None:
        img = image.detach().cpu().float() / (255.0 if image.dtype == torch.uint8 else 1.0)
        arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        ax.imshow(arr, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(2.5)
    if title:
        ax.set_title(title, fontsize=7)


@register_plotter("node-context")
def plot_node_context(expl, max_items: int = 4, class_names: list[str] | None = None, masks=None, labels=None,
                      **_: Any):
    ex = expl.extras
    names = class_names or ex.get("class_names") or [class_name(k) for k in range(expl.logits.shape[1])]
    cmap = plt.get_cmap("tab10")
    n = min(max_items, len(expl))
    cols = 1 + MAX_NEIGHBOURS // 2
    # Constrained layout makes room for the cue names and the thumbnail titles (they were clipped/overlapping).
    fig = plt.figure(figsize=(16, 3.0 * n + 0.4), layout="constrained")
    outer = fig.add_gridspec(n, 3, width_ratios=[cols * 0.9, 3.0, 4.2])
    for r in range(n):
        t = int(expl.target[r])
        node = int(ex["nodes"][r])
        grid = outer[r, 0].subgridspec(2, cols)
        ax = fig.add_subplot(grid[:, 0])
        img = ex["images"][r] if "images" in ex else None
        _thumb(ax, img, cmap(t), f"node {node}\n" + panel_title(expl, r, names, labels).replace(" · ", "\n", 1).replace(" p=", "\np="))
        nbrs, labels = ex["neighbours"][r], ex["neighbour_train_labels"][r]
        nb_images = ex.get("neighbour_images", [None] * len(expl))[r]
        for j in range(min(MAX_NEIGHBOURS, len(nbrs))):
            ax = fig.add_subplot(grid[j // (cols - 1), 1 + j % (cols - 1)])
            lab = int(labels[j])
            _thumb(ax, None if nb_images is None else nb_images[j], cmap(lab) if lab >= 0 else "0.6",
                   names[lab] if lab >= 0 else "no label")
        # Context bars: standardised cue value and Δp when the cue is removed.
        ax = fig.add_subplot(outer[r, 1])
        cues = ex["context_names"]
        y = np.arange(len(cues))
        ax.barh(y + 0.2, expl.node_context[r].cpu().numpy(), height=0.4, color="0.6", label="cue (z)")
        ax.barh(y - 0.2, ex["context_ablation"][r].cpu().numpy(), height=0.4, color="tab:red",
                label=f"Δp({names[t]}) if removed")
        ax.set_yticks(y, cues, fontsize=7)
        ax.axvline(0, color="k", linewidth=0.6)
        ax.tick_params(axis="x", labelsize=7)
        ax.invert_yaxis()
        if r == 0:
            ax.legend(fontsize=6, loc="lower right")
        ax = fig.add_subplot(outer[r, 2])
        ax.set_axis_off()
        text = expl.node_text[r] if expl.node_text else ""
        ax.text(0, 1, "\n".join(textwrap.wrap(text, 80)), va="top", fontsize=7, family="monospace")
    fig.suptitle("X-Node explanations: neighbours framed by training label (grey: unlabelled)", fontsize=9)
    return fig
