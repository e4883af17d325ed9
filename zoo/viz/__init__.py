"""Figures, kept apart from the data they draw.

``plot_explanation(expl)`` dispatches on ``expl.kind`` to the plotter a family registered with
``@register_plotter(kind)``; kinds without their own figure get the generic input | map grid.
Every plotter returns a matplotlib Figure and saves a PNG when given a path.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

_PLOTTERS: dict[str, Callable] = {}
_imported = False


def register_plotter(kind: str) -> Callable[[Callable], Callable]:
    def decorate(fn: Callable) -> Callable:
        _PLOTTERS[kind] = fn
        return fn

    return decorate


def _import_plotters() -> None:
    global _imported
    if not _imported:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"zoo.viz.{info.name}")
        _imported = True


def plot_explanation(expl, path: str | Path | None = None, max_items: int = 8, **kwargs: Any):
    _import_plotters()
    fig = _PLOTTERS.get(expl.kind, attribution_grid)(expl, max_items=max_items, **kwargs)
    if path is not None:
        save_figure(fig, path)
    return fig


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- shared drawing helpers
def to_display(image: torch.Tensor) -> np.ndarray:
    """(C,H,W) image normalised to [-1,1] → (H,W) or (H,W,3) array in [0,1] for imshow."""
    img = ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def show_image(ax, image: torch.Tensor, title: str | None = None) -> None:
    ax.imshow(to_display(image), cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)


def show_signed_map(ax, image: torch.Tensor | None, attribution: torch.Tensor, title: str | None = None,
                    alpha: float = 0.6, limit: float | None = None) -> None:
    """Red = evidence for the class, blue = against; symmetric colour scale around 0 (±`limit`, default
    the map's own max |value|; pass one to put several maps on the same scale)."""
    a = attribution.detach().float().cpu().squeeze().numpy()
    limit = limit or float(np.abs(a).max()) or 1.0
    if image is not None:
        ax.imshow(to_display(image), cmap="gray", vmin=0, vmax=1)
    ax.imshow(a, cmap="bwr", vmin=-limit, vmax=limit, alpha=alpha if image is not None else 1.0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)


def show_heatmap(ax, image: torch.Tensor | None, attribution: torch.Tensor, title: str | None = None,
                 alpha: float = 0.5) -> None:
    a = attribution.detach().float().cpu().squeeze().numpy()
    if image is not None:
        ax.imshow(to_display(image), cmap="gray", vmin=0, vmax=1)
    ax.imshow(a, cmap="jet", alpha=alpha if image is not None else 1.0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)


def attribution_grid(expl, max_items: int = 8, class_names: list[str] | None = None, masks=None, **_: Any):
    """Two rows: the inputs (with the ground-truth mask outlined when given) and their maps."""
    if expl.attribution is None or expl.inputs is None:
        raise ValueError(f"a {expl.kind!r} explanation without inputs/attribution has no pixel figure")
    n = min(max_items, len(expl))
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    probs = expl.logits.softmax(1)
    for i in range(n):
        t = int(expl.target[i])
        name = class_names[t] if class_names else str(t)
        show_image(axes[0, i], expl.inputs[i], f"{name} p={probs[i, t]:.2f}")
        if masks is not None:
            axes[0, i].contour(masks[i].squeeze().cpu().numpy(), levels=[0.5], colors="lime", linewidths=0.8)
        show_heatmap(axes[1, i], expl.inputs[i], expl.attribution[i])
    fig.suptitle(f"{expl.kind} explanation ({expl.extras.get('method', '')})".strip(), fontsize=9)
    return fig
