"""Hydra config nodes generated from the model signatures, so every default has one home.

:func:`register_model_configs` stores, for every registered model, the node ``model_defaults/<name>``:
``_target_: zoo.create_model``, ``name`` and every hyperparameter default of the model's ``__init__``
chain (:meth:`SelfExplainingModule.default_hparams`). Each ``conf/model/<name>.yaml`` starts from that
node and adds only what it deliberately changes, so ``python train.py model=x`` builds exactly
``zoo.create_model(x)``, ``model.<key>=<value>`` overrides any hyperparameter, and
``python train.py model=x --cfg job`` prints them all. Called by train.py (and the tests) before Hydra
composes.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from zoo.hub import plain
from zoo.registry import list_models, model_class

GROUP = "model_defaults"


def model_defaults(name: str) -> dict:
    """The config node of registered model ``name``: its target, name and signature defaults."""
    return {"_target_": "zoo.create_model", "name": name, **plain(model_class(name).default_hparams())}


def register_model_configs() -> None:
    store = ConfigStore.instance()
    for name in list_models():
        store.store(group=GROUP, name=name, node=model_defaults(name))
