"""The one target-class helper: which class an explanation or a metric is about.

An int (or 0-d tensor) is broadcast to the batch, a tensor is read as one class per item; with
``num_classes`` an index outside 0..K−1 is a ValueError. ``None`` is resolved by the caller (a model
explains its prediction: :func:`targets_or_predictions` runs the model).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def class_targets(target: Tensor | int, n: int, device: torch.device | str | None = None,
                  num_classes: int | None = None, what: str = "target class") -> Tensor:
    """(n,) long class indices from an int or a tensor of n entries; out of range: ``"<what> out of range"``."""
    t = torch.as_tensor(target, device=device, dtype=torch.long)
    t = t.expand(n).contiguous() if t.ndim == 0 else t.view(n)
    if num_classes is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"{what} out of range 0..{num_classes - 1}")
    return t


def targets_or_predictions(model: Callable[[Tensor], Tensor], images: Tensor, target: Tensor | int | None,
                           batch_size: int = 256) -> Tensor:
    """(B,) long: `target` as :func:`class_targets` reads it, or — None — the model's prediction on `images`."""
    B = images.shape[0]
    if target is None:
        with torch.no_grad():
            return torch.cat([model(images[i:i + batch_size]).argmax(dim=1) for i in range(0, B, batch_size)]
                             ).to(images.device)
    return class_targets(target, B, images.device)
