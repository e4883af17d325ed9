"""The prototypes of a head that does not project them (ProtoFM): each shown by its k nearest
training patches, as the crop of the patch's receptive-field box from its training image, the patch
(stride cell) outlined inside the crop and the cosine in the title. One row per prototype, grouped by
class. Takes plain tensors (the search is the model's: zoo/models/prototypes/proto_head.py)."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle
from torch import Tensor

from zoo.viz import class_name, save_figure, show_image


def nearest_patch_figure(found: Any, images: Sequence[Tensor], prototype_class: Tensor, path=None,
                         class_names: list[str] | None = None, max_prototypes: int = 40):
    """found: a NearestPatches ((P,k) similarity/index, (P,k,4) box and cell); images: the training
    images of found.position in row-major (P·k) order, each (C,H,W) in [-1, 1]. Returns the Figure;
    saves a PNG when `path` is given."""
    P, k = found.similarity.shape
    if len(images) != P * k:
        raise ValueError(f"nearest_patch_figure: need {P * k} images (P·k), got {len(images)}")
    order = sorted(range(P), key=lambda j: (int(prototype_class[j]), j))[:max_prototypes]
    fig, axes = plt.subplots(len(order), k, figsize=(1.25 * k + 0.9, 1.3 * len(order) + 0.5), squeeze=False,
                             layout="constrained")
    for r, j in enumerate(order):
        for c in range(k):
            ax = axes[r, c]
            y0, x0, y1, x1 = (int(v) for v in found.box[j, c])
            cy0, cx0, cy1, cx1 = (int(v) for v in found.cell[j, c])
            crop = images[j * k + c][:, y0:y1 + 1, x0:x1 + 1]
            show_image(ax, crop, f"{float(found.similarity[j, c]):.3f} #{int(found.index[j, c])}")
            ax.add_patch(Rectangle((cx0 - x0 - 0.5, cy0 - y0 - 0.5), cx1 - cx0 + 1, cy1 - cy0 + 1, fill=False,
                                   edgecolor="red", lw=1.0))
        axes[r, 0].text(-0.12, 0.5, f"p{j}\n{class_name(int(prototype_class[j]), class_names)}",
                        transform=axes[r, 0].transAxes, va="center", ha="right", fontsize=7)
    fig.suptitle(f"each prototype's {k} nearest training patches (cosine, train #): receptive-field crop, "
                 "patch in red", fontsize=8)
    if path is not None:
        save_figure(fig, path)
    return fig
