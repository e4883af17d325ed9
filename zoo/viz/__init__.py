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


def class_name(k: int, class_names: list[str] | None = None) -> str:
    """The readable name of class `k`: the model's / datamodule's name when known, else "class k"."""
    return class_names[k] if class_names and 0 <= k < len(class_names) else f"class {k}"


def panel_title(expl, i: int, class_names: list[str] | None = None, labels=None, prob: float | None = None) -> str:
    """Two lines: "true: X · pred: Y" and "explained: Z (true/pred) p=…" — the explained class marked as
    the true and/or predicted one. `labels`: (B,) true classes, None when unknown (shown as "?")."""
    t, pred = int(expl.target[i]), int(expl.logits[i].argmax())
    true = int(labels[i]) if labels is not None and getattr(labels, "ndim", 0) == 1 else None
    marks = [m for m, hit in (("true", t == true), ("pred", t == pred)) if hit]
    p = float(expl.logits[i].softmax(0)[t]) if prob is None else float(prob)
    return (f"true: {'?' if true is None else class_name(true, class_names)} · pred: {class_name(pred, class_names)}\n"
            f"explained: {class_name(t, class_names)}{' (' + '/'.join(marks) + ')' if marks else ''} p={p:.2f}")


def colour_bar(fig, mappable, axes, label: str, location: str = "right") -> None:
    """A colour bar beside `axes` (an Axes or a list) with its scale stated in `label` (keep it short:
    it runs along the bar)."""
    bar = fig.colorbar(mappable, ax=axes, shrink=0.85, aspect=15, pad=0.02, location=location)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)


SIGNED = "signed, ÷ max |map|"  # colour-bar label of show_signed_map's [-1, 1] scale (per image)


def show_image(ax, image: torch.Tensor, title: str | None = None) -> None:
    ax.imshow(to_display(image), cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=7)


def show_signed_map(ax, image: torch.Tensor | None, attribution: torch.Tensor, title: str | None = None,
                    alpha: float = 0.6, limit: float | None = None):
    """Red = evidence for the class, blue = against, drawn as map / `limit` on a fixed [-1, 1] scale
    (`limit` defaults to the map's own max |value|; pass one to put several maps on one scale), so one
    colour bar (label :data:`SIGNED`) reads for every panel. Returns the map's image for a colour bar."""
    a = attribution.detach().float().cpu().squeeze().numpy()
    limit = limit or float(np.abs(a).max()) or 1.0
    if image is not None:
        ax.imshow(to_display(image), cmap="gray", vmin=0, vmax=1)
    shown = ax.imshow(a / limit, cmap="bwr", vmin=-1, vmax=1, alpha=alpha if image is not None else 1.0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=7)
    return shown


def show_heatmap(ax, image: torch.Tensor | None, attribution: torch.Tensor, title: str | None = None,
                 alpha: float = 0.5):
    """An unsigned map ÷ its max on [0, 1] (jet) over the image; returns the map's image for a colour bar."""
    a = attribution.detach().float().cpu().squeeze().numpy()
    peak = float(np.abs(a).max()) or 1.0
    if image is not None:
        ax.imshow(to_display(image), cmap="gray", vmin=0, vmax=1)
    shown = ax.imshow(a / peak, cmap="jet", vmin=0 if a.min() >= 0 else -1, vmax=1,
                      alpha=alpha if image is not None else 1.0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=7)
    return shown


def attribution_grid(expl, max_items: int = 8, class_names: list[str] | None = None, masks=None, labels=None,
                     **_: Any):
    """Two rows: the inputs (with the ground-truth mask outlined when given) and their maps."""
    if expl.attribution is None or expl.inputs is None:
        raise ValueError(f"a {expl.kind!r} explanation without inputs/attribution has no pixel figure")
    n = min(max_items, len(expl))
    fig, axes = plt.subplots(2, n, figsize=(2.0 * n + 0.8, 4.4), squeeze=False, layout="constrained")
    for i in range(n):
        show_image(axes[0, i], expl.inputs[i], panel_title(expl, i, class_names, labels))
        if masks is not None:
            axes[0, i].contour(masks[i].squeeze().cpu().numpy(), levels=[0.5], colors="lime", linewidths=0.8)
        shown = show_heatmap(axes[1, i], expl.inputs[i], expl.attribution[i])
    colour_bar(fig, shown, axes[1, :].tolist(), "attribution ÷ max")
    fig.suptitle(f"{expl.kind} explanation ({expl.extras.get('method', '')})".strip(), fontsize=9)
    return fig
