"""Save and load models without pickle: ``model.safetensors`` + ``config.yaml`` + ``card.md``.

A saved folder holds plain data only, so loading a downloaded model can never run code. Lightning
``.ckpt`` files are read with ``torch.load(weights_only=True)`` for the same reason. Pretrained
names (``zoo.load("cnn-synthetic")``) resolve to folders under the repository's ``checkpoints/``
(or ``$ZOO_CHECKPOINTS``).
"""

from __future__ import annotations

import contextvars
import os
import pickle
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from zoo.registry import create_model

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.yaml", "card.md"

# True while load() rebuilds a saved model whose own weights file is about to overwrite every parameter:
# initial weights (pretrained_file, timm downloads, another saved model) are then not read, so a saved model
# loads on a machine without them (zoo.nets.backbones reads this).
_REBUILDING = contextvars.ContextVar("zoo_rebuilding_saved_model", default=False)


def rebuilding_saved_model() -> bool:
    """Whether the model being built will get all its weights from a saved file (skip initial weights)."""
    return _REBUILDING.get()


def pretrained_root() -> Path:
    """``$ZOO_CHECKPOINTS`` if set, else the checkpoints shipped with the package (``zoo/checkpoints``: a
    link to the repository's ``checkpoints/`` in a checkout, package data in an installed wheel)."""
    return Path(os.environ.get("ZOO_CHECKPOINTS", Path(__file__).resolve().parent / "checkpoints"))


def list_pretrained() -> list[str]:
    """Names of the saved models under :func:`pretrained_root`; warns (never silently) when there are none."""
    root = pretrained_root()
    names = sorted(p.name for p in root.iterdir() if (p / CONFIG).is_file()) if root.is_dir() else []
    if not names:
        warnings.warn(f"no pretrained models under {root} (set ZOO_CHECKPOINTS to a folder of saved zoo "
                      "models, e.g. a checkout's checkpoints/)", stacklevel=2)
    return names


def plain(value: Any) -> Any:
    """Hyperparameters as YAML-safe plain values (tuples → lists, mappings → dicts)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    raise TypeError(f"hyperparameter value {value!r} of type {type(value).__name__} is not a plain value")


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved model is a normal, shareable file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def input_convention() -> dict[str, Any]:
    """What a saved model expects as input, for users outside the zoo: x = (image in [0, 1] - mean) / std."""
    from zoo.data.common import MEAN, STD  # lazily: zoo.data imports hub (graph recipes)

    return {"range": [-1.0, 1.0], "mean": MEAN, "std": STD}


def save(model, directory: str | os.PathLike, metrics: Mapping[str, float] | None = None,
         command: str | None = None, data: str | None = None, notes: str | None = None) -> Path:
    """Write `model` to `directory` as safetensors + config.yaml + a model card. Returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {"model": model.model_name, "hparams": plain(dict(model.hparams)), "input": input_convention()}
    if metrics:
        config["metrics"] = plain(dict(metrics))
    _atomic_write(directory / WEIGHTS, lambda p: save_file(state, p, metadata={"model": model.model_name}))
    _atomic_write(directory / CONFIG, lambda p: Path(p).write_text(yaml.safe_dump(config, sort_keys=False)))
    _atomic_write(directory / CARD, lambda p: Path(p).write_text(_card(model, config, metrics, command, data, notes)))
    return directory


def _card(model, config, metrics, command, data, notes) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    lines = [f"# {model.model_name}", "", f"- family explanation kind: `{model.explanation_kind}`",
             f"- parameters: {n_params:,}", f"- data: {data or 'unspecified'}"]
    if command:
        lines += [f"- reproduce: `{command}`"]
    if metrics:
        lines += ["", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    if notes:
        lines += ["", notes]
    lines += ["", "Hyperparameters:", "", "```yaml", yaml.safe_dump(config["hparams"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _resolve(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    candidate = pretrained_root() / str(name_or_path)
    if candidate.is_dir():
        return candidate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the error below says it
        available = ", ".join(list_pretrained()) or "none"
    raise FileNotFoundError(f"no saved model at {str(name_or_path)!r} and no pretrained model of that name "
                            f"under {pretrained_root()} (pretrained: {available}; ZOO_CHECKPOINTS sets that folder)")


def load(name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """A ready model in eval mode from a saved folder, a pretrained name, or a Lightning .ckpt file.

    A broken folder or checkpoint is one ValueError naming the file and what is wrong with it."""
    path = _resolve(name_or_path)
    if path.is_file() and path.suffix == ".ckpt":
        return load_lightning_checkpoint(path, map_location)
    if path.is_file():
        path = path.parent
    config_file, weights_file = path / CONFIG, path / WEIGHTS
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: missing — a saved zoo model folder holds {CONFIG} and {WEIGHTS}")
    try:
        config = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{config_file}: not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), str) \
            or not isinstance(config.get("hparams"), dict):
        raise ValueError(f"{config_file}: expected a mapping with 'model' (a registered name) and 'hparams'")
    model = _build(config["model"], config["hparams"], config_file)
    try:
        state = load_file(weights_file, device=str(map_location))
    except Exception as err:  # safetensors raises its own SafetensorError (truncated, not safetensors)
        raise ValueError(f"{weights_file}: unreadable safetensors file ({err})") from None
    _load_state(model, state, weights_file)
    return model.to(map_location).eval()


def _build(name: str, hparams: dict, source: Path):
    token = _REBUILDING.set(True)  # the saved weights follow: do not read the initial ones (see above)
    try:
        return create_model(name, **hparams)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: {err}") from None
    finally:
        _REBUILDING.reset(token)


def _load_state(model, state: Mapping[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing / unexpected keys, shape mismatch
        first = str(err).strip().splitlines()
        raise ValueError(f"{source}: weights do not fit the {model.model_name} its config describes "
                         f"({' '.join(line.strip() for line in first[:3])[:400]})") from None


def load_lightning_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild a model from a Lightning checkpoint without unpickling code (weights_only=True)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a pickle of objects at all: a corrupt file
            raise ValueError(f"{path}: not a readable torch checkpoint (corrupt or not a torch file)") from None
        # torch's own message suggests weights_only=False, i.e. running the file's code: never do that.
        raise ValueError(f"{path}: holds pickled objects beyond plain tensors and values; the zoo only reads "
                         "weights-only checkpoints and never unpickles code. Save models with zoo.save "
                         "(safetensors) or checkpoints holding tensors and plain values only") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({' '.join(str(err).split())[:300]})") from None
    if not isinstance(ckpt, dict) or "zoo_model" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a zoo checkpoint (no 'zoo_model' and 'state_dict' entries)")
    model = _build(ckpt["zoo_model"], dict(ckpt.get("hyper_parameters", {})), path)
    _load_state(model, ckpt["state_dict"], path)
    return model.to(map_location).eval()
