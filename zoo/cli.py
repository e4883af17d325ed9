"""Shared bits of the command-line entry points."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from zoo.data import DatasetNotFoundError


def build(node: DictConfig, **kwargs: Any):
    """``hydra.utils.instantiate`` that surfaces the user's error (bad dataset root, unknown model)
    instead of Hydra's wrapper around it."""
    try:
        # _convert_="all": plain lists/dicts reach the model, so its hyperparameters stay plain values.
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def report(text: str) -> None:
    """To the run's log (under Hydra: train.log, echoed on the console), else to stdout."""
    if logging.getLogger().hasHandlers():
        logging.getLogger("zoo").info("%s", text)
    else:
        print(text)


@contextmanager
def user_errors():
    """Turn a user's mistake (missing data root, unknown model or dataset, bad value) into one clear
    line and exit code 2, instead of a wall of traceback. ZOO_DEBUG=1 shows the traceback."""
    try:
        yield
    except (DatasetNotFoundError, FileNotFoundError, ValueError) as err:
        if os.environ.get("ZOO_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
