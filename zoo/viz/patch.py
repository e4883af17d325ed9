"""Figure of a patch explanation (MedicalPatchNet, BagNet): red/blue evidence overlays.

Rows: the input (ground-truth mask outlined when given), the raw logit map (patch logits for
MedicalPatchNet, per-location logits for BagNet), the scaled map (× global probability) and, when
the explanation carries them, the refined map (MedicalPatchNet: patch totals of the raw map, detail
from the dense map) and the dense map. Red = evidence for the explained class, blue = against.
Raw and scaled maps share one symmetric colour scale per image (the scaled map fades with the
global probability); the refined and dense maps have their own.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from zoo.viz import SIGNED, colour_bar, panel_title, register_plotter, show_image, show_signed_map

_ROWS = (("raw_map", "raw"), ("scaled_map", "scaled (× p)"), ("refined_map", "refined"), ("dense_map", "dense"))


@register_plotter("patch")
def plot_patch(expl, max_items: int = 8, class_names: list[str] | None = None, masks=None, labels=None,
               **_: Any):
    if expl.inputs is None:
        raise ValueError("a patch explanation without inputs cannot be drawn")
    maps = [(key, label) for key, label in _ROWS if key in expl.extras]
    if not maps:  # a patch explanation from elsewhere: fall back to the attribution itself
        maps = [("attribution", "attribution")]
    n = min(max_items, len(expl))
    fig, axes = plt.subplots(1 + len(maps), n, figsize=(2.0 * n + 1.0, 2.0 * (1 + len(maps))), squeeze=False,
                             layout="constrained")
    probs = expl.extras.get("probability")
    patch = expl.extras.get("patch_size")  # MedicalPatchNet: draw the patch grid on the raw map
    top, left = expl.extras.get("grid_offset", (0, 0))
    H, W = expl.inputs.shape[-2:]
    for i in range(n):
        title = panel_title(expl, i, class_names, labels, prob=None if probs is None else float(probs[i]))
        show_image(axes[0, i], expl.inputs[i], title)
        if masks is not None:
            axes[0, i].contour(masks[i].squeeze().cpu().numpy(), levels=[0.5], colors="lime", linewidths=0.8)
        for r, (key, label) in enumerate(maps, start=1):
            value = expl.attribution if key == "attribution" else expl.extras[key]
            # raw and scaled share raw's scale, so the scaled map shows how sure the model is overall.
            shared = float(expl.extras["raw_map"][i].abs().max()) if key == "scaled_map" else None
            shown = show_signed_map(axes[r, i], expl.inputs[i], value[i], title=label if i == 0 else None,
                                    limit=shared)
            if i == n - 1:  # raw/scaled: ÷ raw's max |logit| (scaled fades with p); others their own
                colour_bar(fig, shown, axes[r, :].tolist(), "logit ÷ max |raw|" if key in ("raw_map", "scaled_map")
                           else SIGNED)
            if patch and key != "dense_map":
                for k in range(1, -(-H // patch) + 1):
                    axes[r, i].axhline(k * patch - top - 0.5, color="k", lw=0.3, alpha=0.5)
                for k in range(1, -(-W // patch) + 1):
                    axes[r, i].axvline(k * patch - left - 0.5, color="k", lw=0.3, alpha=0.5)
    rf = expl.extras.get("receptive_field")
    detail = f"patch {patch} px" if patch else (f"receptive field {rf} px" if rf else "")
    fig.suptitle(f"patch evidence ({detail}); red = for the class, blue = against".strip(), fontsize=9)
    return fig
