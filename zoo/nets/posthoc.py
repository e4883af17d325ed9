"""Post-hoc reference explanations (Grad-CAM, Integrated Gradients) through Captum.

Every family is compared against these on the zoo's black-box baseline. Captum is used rather than
hand-written hooks so the baseline is the standard implementation users already trust.
"""

from __future__ import annotations

import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
from torch import Tensor, nn

from zoo.nets.backbones import conv_layer_names


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> nn.Module:
    """A module of `model` by dotted name; None → the last Conv2d (the textbook Grad-CAM layer)."""
    if isinstance(layer, nn.Module):
        return layer
    names = conv_layer_names(model)
    if layer is None:
        if not names:
            raise ValueError("model has no Conv2d layer for Grad-CAM; pass `layer=` explicitly")
        layer = names[-1]
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"no layer named {layer!r}; conv layers are: {', '.join(names)}")
    return modules[layer]


def gradcam(model: nn.Module, x: Tensor, target: Tensor, layer: str | nn.Module | None = None) -> Tensor:
    """Grad-CAM map (B,1,H,W) of `target` at `layer`, ReLU'd and bilinearly upsampled to the input."""
    with torch.enable_grad():
        cam = LayerGradCam(model, resolve_layer(model, layer)).attribute(x, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")


def gradcam_layers(model: nn.Module, x: Tensor, target: Tensor, layers: list[str]) -> dict[str, Tensor]:
    """Grad-CAM maps (B,1,H,W) at every layer in `layers` from one forward and one backward pass.

    Same formula as :func:`gradcam` (Captum's LayerGradCam: ReLU(sum_c mean_hw(dy/dA_c) A_c), bilinear
    upsampling). Why hand-written: LayerGradCam takes one layer per call, i.e. one forward + backward
    per layer; screening every conv layer (``best_gradcam_layer``) needs them all for the same images.
    """
    modules = {name: resolve_layer(model, name) for name in layers}
    acts: dict[str, Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: acts.__setitem__(name, out))
               for name, m in modules.items()]
    try:
        with torch.enable_grad():
            # the input requires grad (as Captum's does), so activations of a frozen model have a graph too
            logits = model(x.detach().requires_grad_(True))
            score = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()  # rows are independent
            grads = torch.autograd.grad(score, [acts[name] for name in layers])
    finally:
        for h in handles:
            h.remove()
    maps = {}
    for name, g in zip(layers, grads):
        cam = (g.mean(dim=(2, 3), keepdim=True) * acts[name]).sum(dim=1, keepdim=True).relu().detach()
        maps[name] = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return maps


def integrated_gradients(model: nn.Module, x: Tensor, target: Tensor, n_steps: int = 32, baseline: float = 0.0) -> Tensor:
    """Integrated Gradients (B,1,H,W) summed over channels, from a constant `baseline` image.

    The default baseline 0 is mid-grey for images normalised to [-1,1].
    """
    with torch.enable_grad():
        attr = IntegratedGradients(model).attribute(
            x, baselines=torch.full_like(x, baseline), target=target, n_steps=n_steps, internal_batch_size=x.shape[0] * 8
        )
    return attr.detach().sum(dim=1, keepdim=True)
