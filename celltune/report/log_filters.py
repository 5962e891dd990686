"""Log hygiene for a run: a message from a library once per run, a logger kept quiet.

scib-metrics logs "isolated labels: ..." through the root logger once per method scored;
:func:`once_per_run` lets the first of each such message through and drops the repeats.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class OncePerRun(logging.Filter):
    """Let a record whose message starts with one of ``prefixes`` through once."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefixes):
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextlib.contextmanager
def once_per_run(*prefixes: str, logger: str = "") -> Iterator[OncePerRun]:
    """Within the block, repeats of a message of ``logger`` (default: the root logger)
    starting with one of ``prefixes`` are dropped."""
    target = logging.getLogger(logger)
    flt = OncePerRun(*prefixes)
    target.addFilter(flt)
    try:
        yield flt
    finally:
        target.removeFilter(flt)


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Within the block, logger ``name`` logs only at ``level`` and above."""
    target = logging.getLogger(name)
    before = target.level
    target.setLevel(level)
    try:
        yield
    finally:
        target.setLevel(before)


__all__ = ["OncePerRun", "once_per_run", "quiet_logger"]
