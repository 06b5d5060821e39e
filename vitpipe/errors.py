"""User errors: problems the user can fix, reported on one line (``vitpipe <command>: error: ...``), status 2."""

from __future__ import annotations

import sys


class UserError(Exception):
    """A problem the user can fix; reported on one line without a traceback."""


_LIBRARY_ERRORS = (
    ("pipeline.config", "ConfigError"),  # an unknown key, a wrong type, a bad value
    ("pipeline.rundir", "RunError"),  # no config.toml, no weights, a run directory that is taken
    ("pipeline.export", "ExportError"),  # an incomplete checkpoint
    ("pipeline.data.shards", "LoaderError"),  # no such split, no shards
    ("data_prep.errors", "PrepError"),  # a source dataset that cannot be prepared
    ("data_prep.format", "FormatError"),  # a dataset directory that cannot be read
    ("model.factory", "UnknownModelError"),  # model.name is not registered
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types reported as user errors.

    A library error class is looked up in ``sys.modules`` rather than imported: an exception can only
    have been raised if its module was loaded, and building the tuple must not import torch.
    """
    found = [getattr(sys.modules[module], name) for module, name in _LIBRARY_ERRORS if module in sys.modules]
    return UserError, FileNotFoundError, *found
