"""User-facing errors.

Every problem caused by the user's input is raised as an :class:`InputError` whose
message names the problem *and* the fix, so the CLI can print it without a traceback.
"""

from __future__ import annotations


class CelltuneError(Exception):
    """Base class for errors that the CLI reports as a one-line message."""


class InputError(CelltuneError, ValueError):
    """Bad input data, options or files; the message says how to fix it."""


class CheckpointError(CelltuneError, ValueError):
    """A model directory or weight file that cannot be loaded safely or consistently."""
