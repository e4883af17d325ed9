"""Feature extractors every family can sit on: the zoo's small CNN, the per-patch CNN and any timm
model, built by :func:`build_backbone` (random, timm's online weights, or a local ``pretrained_file``)
and loaded from a saved zoo model by :func:`load_pretrained`.

A backbone maps images (B,C,H,W) to a feature map (B,D,h,w) and exposes ``out_channels`` (D) and
``reduction`` (H/h). Families never care which one they got.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from zoo import hub
from zoo.nets.patches import PatchCNN

log = logging.getLogger("zoo")


class SmallCNN(nn.Module):
    """VGG-style stages of two 3×3 convs (BN, ReLU), a 2×2 max-pool between stages.

    Sized for 28–64 px inputs: with the default three stages a 32 px image gives an 8×8 map, fine
    enough for prototype and Grad-CAM maps yet cheap to train on 2 CPU cores.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, width in enumerate(widths):
            if stage > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.out_channels = channels
        self.reduction = 2 ** (len(widths) - 1)

    def forward(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,D,H/r,W/r)
        return self.features(x)


class TimmBackbone(nn.Module):
    """Any timm model as a feature extractor (its last feature stage).

    Weights: random by default (nothing is downloaded); ``pretrained=True`` fetches timm's own weights
    (online), ``pretrained_file`` reads a local file instead through timm's loader
    (``pretrained_cfg_overlay=dict(file=...)``: safetensors, or a torch state dict read with
    ``weights_only=True``), which adapts the first conv to ``in_channels`` (RGB kernels summed for one
    channel) and resamples a ViT's position embedding to its ``img_size``.

    Normalisation: zoo images arrive in [-1, 1] (mean 0.5, std 0.5 of [0, 1]); pretrained weights expect
    their ``pretrained_cfg`` mean/std, so with pretrained weights ``forward`` first applies the fixed
    affine that maps one to the other (buffers, not saved; for a channel count other than the weights',
    e.g. grey images on RGB weights, the mean of the per-channel statistics). Random init has no affine,
    so its outputs are exactly those of the bare timm model.
    """

    def __init__(self, name: str, in_channels: int = 1, pretrained: bool = False,
                 pretrained_file: str | None = None, **kwargs) -> None:
        super().__init__()
        import timm  # lazy: importing timm costs ~1 s and only timm backbones need it

        if pretrained_file is not None:
            kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": str(pretrained_file)}
        weighted = pretrained or pretrained_file is not None
        # zoo.load: the saved weights replace these, so build untrained (no file read, no download) but keep
        # the pretrained input normalisation, which is part of the saved model's computation.
        read = weighted and not hub.rebuilding_saved_model()
        try:
            with _TimmLoadReport() as report:
                self.body = timm.create_model(name, pretrained=read, features_only=True, out_indices=(-1,),
                                              in_chans=in_channels, **kwargs)
        except (RuntimeError, pickle.UnpicklingError) as err:  # shapes that do not fit, pickled code
            if pretrained_file is None:
                raise
            raise ValueError(f"pretrained_file {str(pretrained_file)!r} does not load into timm {name!r}: "
                             f"{_first_lines(err)}") from None
        kept = {k.removeprefix("model.") for k in self.body.state_dict()}  # a ViT's wrapper nests it as model.
        lacking = [k for k in report.missing if k in kept]  # not the head etc. the feature wrapper drops
        if read and lacking:
            source = f"pretrained_file {str(pretrained_file)!r}" if pretrained_file else "timm's pretrained weights"
            raise ValueError(f"{source} does not fit timm {name!r}: it lacks weights for {', '.join(lacking[:5])}"
                             f" ({len(lacking)} tensors)")
        info = self.body.feature_info
        self.out_channels = info.channels()[-1]
        self.reduction = info.reduction()[-1]
        self.normalize = weighted
        if weighted:
            scale, shift = _input_affine(self.body.pretrained_cfg, in_channels)
            self.register_buffer("in_scale", scale, persistent=False)
            self.register_buffer("in_shift", shift, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.normalize:
            x = x * self.in_scale + self.in_shift  # [-1, 1] → the pretrained weights' normalisation
        return self.body(x)[-1]


class _TimmLoadReport(logging.Handler):
    """Collects the missing keys timm reports while loading pretrained weights.

    Why: timm loads a ``features_only`` model non-strictly (its classifier is dropped) and reports keys
    the weights lack only in its log, so a file of another model would leave a silently random backbone.
    Reading timm's own report keeps timm's key adaptation (stems, position embeddings, renames)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.missing: list[str] = []
        self.logger = logging.getLogger("timm.models._builder")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Missing keys ("):
            self.missing = message[len("Missing keys ("):].split(") discovered")[0].split(", ")

    def __enter__(self) -> "_TimmLoadReport":
        self.level = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


def _input_affine(cfg: Mapping[str, Any], in_channels: int) -> tuple[Tensor, Tensor]:
    """(scale, shift), each (1,C,1,1), with ``x·scale + shift = (x01 − mean)/std`` for ``x = 2·x01 − 1``."""
    mean = torch.tensor(cfg.get("mean", (0.5,)), dtype=torch.float32)
    std = torch.tensor(cfg.get("std", (0.5,)), dtype=torch.float32)
    if len(mean) != in_channels:  # weights adapted to another channel count: one shared statistic
        mean, std = mean.mean().expand(in_channels), std.mean().expand(in_channels)
    scale, shift = 0.5 / std, (0.5 - mean) / std
    return scale.reshape(1, -1, 1, 1).clone(), shift.reshape(1, -1, 1, 1).clone()


def _first_lines(err: BaseException, n: int = 3) -> str:
    return " ".join(line.strip() for line in str(err).strip().splitlines()[:n])[:400]


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A weights file as a state dict: ``.safetensors``, else a torch file read with ``weights_only=True``
    (a Lightning-style ``{"state_dict": ...}`` is unwrapped). One ValueError names the file if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_file {str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors' own error, UnpicklingError (pickled objects), corrupt files
        raise ValueError(f"pretrained_file {str(path)!r}: not a readable safetensors / weights-only torch "
                         f"state dict ({_first_lines(err, 1)})") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"pretrained_file {str(path)!r}: expected a mapping of parameter names to tensors")
    return dict(state)


def load_module_file(module: nn.Module, path: str | os.PathLike, what: str) -> None:
    """Strictly load the weights file `path` into `module` (the zoo's own CNNs); a mismatch is one
    ValueError naming the file and the first missing / unexpected keys or the first misfit shape."""
    state = read_state_dict(path)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misfit = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or misfit:
        raise ValueError(f"pretrained_file {str(path)!r} does not fit the {what} backbone: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}, shape {misfit[:1]} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected, {len(misfit)} misfit)")
    module.load_state_dict(state)


def build_backbone(name: str = "zoo_cnn", in_channels: int = 1, widths: Sequence[int] | None = None,
                   pretrained: bool = False, patch_size: int | None = None,
                   timm_kwargs: Mapping[str, Any] | None = None,
                   pretrained_file: str | os.PathLike | None = None) -> nn.Module:
    """The one place a family's ``backbone`` hyperparameter becomes a module:

    * ``"zoo_cnn"`` → :class:`SmallCNN` with stage ``widths`` (default (32, 64, 128));
    * ``"patch_cnn"`` → :class:`zoo.nets.patches.PatchCNN`, receptive field exactly ``patch_size``;
    * anything else → the timm model of that name (``timm_kwargs`` go to ``timm.create_model``, e.g. a
      ViT's own ``patch_size``; ``widths`` unused), see :class:`TimmBackbone`.

    Weights: random unless ``pretrained=True`` (timm's weights, downloaded: online only) or
    ``pretrained_file`` (a local safetensors / weights-only torch state dict; it wins over
    ``pretrained``). For timm it is a state dict of the timm model (e.g. the hub's ``model.safetensors``);
    for the zoo CNNs one of this very module, loaded strictly. The zoo CNNs have no online weights.
    """
    if name in ("zoo_cnn", "patch_cnn"):
        if timm_kwargs:
            raise ValueError(f"backbone {name!r} takes no timm arguments, got {sorted(timm_kwargs)}")
        if pretrained and pretrained_file is None:
            raise ValueError(f"backbone {name!r} has no online pretrained weights (pretrained=true is for timm "
                             "backbones); give pretrained_file=<a state dict of this backbone> instead")
        kwargs = {} if widths is None else {"widths": tuple(widths)}
        if name == "zoo_cnn":
            module = SmallCNN(in_channels, **kwargs)
        elif patch_size is None:
            raise ValueError("backbone 'patch_cnn' needs patch_size")
        else:
            module = PatchCNN(in_channels, patch_size, **kwargs)
        if pretrained_file is not None and not hub.rebuilding_saved_model():
            load_module_file(module, pretrained_file, name)
        return module
    if pretrained_file is not None and not hub.rebuilding_saved_model() and not Path(pretrained_file).is_file():
        raise FileNotFoundError(f"pretrained_file {str(pretrained_file)!r}: no such file")  # timm's names no file
    return TimmBackbone(name, in_channels=in_channels, pretrained=pretrained, pretrained_file=pretrained_file,
                        **(timm_kwargs or {}))


def load_pretrained(source: str, parts: Mapping[str, nn.Module], owner: str, mismatch: str,
                    missing: str = "raise") -> bool:
    """The one pretrained loader: copy into each module of ``parts`` (name → module, e.g.
    ``{"backbone": self.backbone, "head": self.head}``) the weights of the same-named part of a saved zoo
    model — a folder, a pretrained name under checkpoints/ or a Lightning ``.ckpt`` (``zoo.load``).

    A part the donor lacks, or weights that do not fit, is a ValueError ``"<owner>: <source> (<donor>)
    <mismatch>: ..."``. A source that is not there raises FileNotFoundError, or with ``missing="warn"``
    logs a warning and loads nothing (the parts stay as initialised). Returns whether it loaded. Not
    read while ``zoo.load`` rebuilds a saved model (its own weights replace these)."""
    if hub.rebuilding_saved_model():
        return False
    try:
        donor = hub.load(source)
    except FileNotFoundError:
        if missing != "warn":
            raise
        log.warning("%s: pretrained weights %r not found; the %s stays random", owner, source, " and ".join(parts))
        return False
    try:
        for name, module in parts.items():
            module.load_state_dict(getattr(donor, name).state_dict())
    except (AttributeError, RuntimeError) as err:
        raise ValueError(f"{owner}: {source!r} ({donor.model_name}) {mismatch}: {err}") from None
    return True


def conv_layer_names(module: nn.Module) -> list[str]:
    """Names of every Conv2d in `module`, input to output (candidate Grad-CAM layers)."""
    return [name for name, m in module.named_modules() if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def feature_shape(backbone: nn.Module, in_channels: int, image_size: int) -> tuple[int, int, int]:
    """(D,h,w) of the backbone's output for one image, found by a dry run (timm reductions vary)."""
    was_training = backbone.training
    backbone.eval()
    out = backbone(torch.zeros(1, in_channels, image_size, image_size))
    backbone.train(was_training)
    return tuple(out.shape[1:])
