"""Logging of the package: library code logs to ``timm_nfnet_ext.*`` loggers; the commands
(``timm-nfnet-train``, ``timm-nfnet-validate``) show those messages as plain lines on stdout.

A program that imports the package configures ``logging`` as it likes; the package adds no
handler of its own outside its commands.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

__all__ = ['command_output']


@contextlib.contextmanager
def command_output(level: int = logging.INFO) -> Iterator[None]:
    """For the length of a command: the package's log messages at ``level`` and above are printed
    to stdout as plain lines (as the commands have always printed them).

    Args:
        level: the lowest level shown.

    Yields:
        None; the handler is removed and the logger restored when the block exits.
    """
    logger = logging.getLogger('timm_nfnet_ext')
    handler = logging.StreamHandler(sys.stdout)  # (the stdout of now: pytest's capture included)
    handler.setFormatter(logging.Formatter('%(message)s'))
    previous_level, previous_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # a root handler set by the caller would print every line twice
    try:
        yield
    finally:
        handler.flush()
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        logger.propagate = previous_propagate
