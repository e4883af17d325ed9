"""One registry of model names, as in timm: ``create_model(name, **kwargs)`` / ``list_models()``.

A family registers its Lightning module class with ``@register_model("name")``; nothing else needs
to know the family exists. Model modules are imported lazily by :func:`_import_families` so that
``import zoo`` stays cheap and a broken family cannot break the others' import.
"""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from typing import Any, Callable

_REGISTRY: dict[str, type] = {}
_imported = False


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator: make `cls` available as ``create_model(name)``."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = cls
        cls.model_name = name
        return cls

    return decorate


def _import_families() -> None:
    """Import every module under zoo.models once, so their @register_model decorators run."""
    global _imported
    if _imported:
        return
    import zoo.models as models_pkg

    for info in pkgutil.iter_modules(models_pkg.__path__):
        importlib.import_module(f"zoo.models.{info.name}")
    _imported = True


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered model names matching a shell-style `pattern`."""
    _import_families()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_class(name: str) -> type:
    _import_families()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any):
    """Build registered model `name` with hyperparameters `kwargs` (plain values only). An unknown
    hyperparameter or a value of the wrong kind is one clear ValueError."""
    cls = model_class(name)
    cls.check_hparams(kwargs)
    return cls(**kwargs)
