"""Shared bits of the command-line entry points."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from zoo.data import DatasetNotFoundError


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
