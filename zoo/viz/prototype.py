"""Figures of prototype networks.

* ``plot_prototype`` (kind "prototype", the local "this looks like that" figure): one row per test
  image — the image with the exact attribution of its target logit, then for each of the top-k
  prototypes (by contribution to the target) the test patch that activates it (box = pixels ≥ the
  95th percentile of its upsampled similarity map, as in ProtoPNet) next to the prototype's source
  training image with its push box, titled with similarity g_j, weight W[t,j] and contribution W·g.
* ``prototype_gallery``: every prototype's source image with its box, one row per class.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from zoo.viz import SIGNED, class_name, colour_bar, panel_title, register_plotter, save_figure, show_image, show_signed_map


def _box(ax, box, color: str = "red") -> None:
    y0, x0, y1, x1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor=color, lw=1.2))


def _name(k: int, class_names: list[str] | None) -> str:
    return class_name(k, class_names)


@register_plotter("prototype")
def plot_prototype(expl, max_items: int = 8, class_names: list[str] | None = None, masks=None, top_k: int = 2,
                   labels=None, **_: Any):
    if expl.inputs is None or expl.attribution is None:
        raise ValueError("a prototype explanation without inputs/attribution cannot be drawn")
    top = expl.extras.get("top_prototypes")
    if top is None or expl.prototype_similarities is None:
        raise ValueError("a prototype explanation needs extras['top_prototypes'] and prototype_similarities")
    boxes = expl.extras.get("top_boxes")
    sources = expl.extras.get("source_images")
    provenance = expl.prototype_provenance or []
    pclass = expl.extras.get("prototype_class")
    k = min(top_k, top.shape[1])
    n = min(max_items, len(expl))
    cols = 1 + 2 * k
    fig, axes = plt.subplots(n, cols, figsize=(2.0 * cols + 0.8, 2.2 * n + 0.4), squeeze=False, layout="constrained")
    weight_of = expl.contributions  # (B,K,P) or None (probabilistic: mean-prototype view)
    for i in range(n):
        t = int(expl.target[i])
        shown = show_signed_map(axes[i, 0], expl.inputs[i], expl.attribution[i],
                                title=panel_title(expl, i, class_names, labels))
        if masks is not None:
            axes[i, 0].contour(masks[i].squeeze().cpu().numpy(), levels=[0.5], colors="lime", linewidths=0.8)
        for r in range(k):
            j = int(top[i, r])
            g = float(expl.prototype_similarities[i, j])
            contrib = f" c={float(weight_of[i, t, j]):.2f}" if weight_of is not None else ""
            ax_test, ax_src = axes[i, 1 + 2 * r], axes[i, 2 + 2 * r]
            show_image(ax_test, expl.inputs[i], f"this looks like p{j}\ng={g:.2f}{contrib}")
            if boxes is not None:
                _box(ax_test, boxes[i, r])
            cls = f" ({_name(int(pclass[j]), class_names)})" if pclass is not None else ""
            if sources is not None and j < len(provenance) and provenance[j]["pushed"]:
                show_image(ax_src, sources[j], f"that: p{j}{cls}\ntrain #{provenance[j]['index']}")
                _box(ax_src, provenance[j]["box"])
            else:
                ax_src.set_axis_off()
                ax_src.set_title(f"p{j}{cls}\n(not pushed)", fontsize=7)
    view = expl.extras.get("view", "exact")
    colour_bar(fig, shown, axes[:, 0].tolist(), "logit " + SIGNED, location="left")
    fig.suptitle(f"this looks like that — attribution ({view}): red = for the class; top-{k} prototypes "
                 f"(g: similarity, c: contribution to the logit)", fontsize=9)
    return fig


def prototype_gallery(source, path=None, class_names: list[str] | None = None, max_per_class: int = 10):
    """Every pushed prototype's source image with its box, one row per class.

    `source`: a prototype model (after push) or an Explanation of one (uses extras['source_images']
    and prototype_provenance). Returns the Figure; saves a PNG when `path` is given."""
    if hasattr(source, "provenance") and callable(source.provenance):  # a model
        provenance = source.provenance()
        images = source.push_images.float() if getattr(source, "push_images", None) is not None else None
    else:
        provenance, images = source.prototype_provenance, source.extras.get("source_images")
    if not provenance or images is None or not any(p["pushed"] for p in provenance):
        raise ValueError("no pushed prototypes with stored source images to draw (run push first; keep_push_images=True)")
    classes = sorted({p.get("class", 0) for p in provenance})
    per_class = {c: [p for p in provenance if p.get("class", 0) == c][:max_per_class] for c in classes}
    cols = max(len(v) for v in per_class.values())
    fig, axes = plt.subplots(len(classes), cols, figsize=(1.4 * cols + 0.6, 1.6 * len(classes) + 0.4), squeeze=False,
                             layout="constrained")
    for r, c in enumerate(classes):
        for col in range(cols):
            ax = axes[r, col]
            ax.set_axis_off()
            if col >= len(per_class[c]):
                continue
            p = per_class[c][col]
            if not p["pushed"]:
                ax.set_title(f"p{p['prototype']} –", fontsize=7)
                continue
            show_image(ax, images[p["prototype"]], f"p{p['prototype']} #{p['index']}")
            _box(ax, p["box"])
        axes[r, 0].text(-0.15, 0.5, _name(c, class_names), transform=axes[r, 0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=8)
    fig.suptitle("prototype gallery: source training image and box of each prototype", fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig
