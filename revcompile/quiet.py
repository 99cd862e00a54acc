"""Keeping torch's own diagnostics out of the user's terminal while revcompile traces.

Tracing runs the model under torch.fx, torch.export and fake tensors, and those print a
lot when something does not go their way: fake-tensor errors with full stack traces
(logged, then handled by the caller), data-dependent-guard warnings, the partial graph
torch.export prints to stderr before raising, Python warnings from the model's own code.
revcompile catches these failures and turns them into one clear message (a plan note, a
``ConversionError``), so the dumps in front of it are noise.

``quiet_torch()`` silences them for the duration of a block: torch's loggers, Python
warnings and writes to ``sys.stderr``. They stay available for debugging: with the
``revcompile`` logger enabled for DEBUG (``logging.getLogger("revcompile").setLevel(
logging.DEBUG)``, or ``revcompile report --verbose``) nothing is silenced.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings

__all__ = ["LOGGER", "quiet_torch", "verbose"]

LOGGER = logging.getLogger("revcompile")
_SILENT = logging.CRITICAL + 1


def verbose() -> bool:
    """Whether the user asked to see torch's diagnostics (the ``revcompile`` logger at DEBUG)."""
    return LOGGER.isEnabledFor(logging.DEBUG)


def _torch_loggers() -> list[logging.Logger]:
    names = [n for n in logging.root.manager.loggerDict if n == "torch" or n.startswith("torch.")]
    loggers = [logging.getLogger(n) for n in names]
    return loggers or [logging.getLogger("torch")]


@contextlib.contextmanager
def quiet_torch():
    """Silence torch's logging, Python warnings and stderr prints inside the block, unless ``verbose()``.

    torch's loggers that have no level of their own inherit the ``torch`` logger's, so
    raising every ``torch.*`` logger's level covers the ones created inside the block too.
    """
    if verbose():
        yield
        return
    loggers = _torch_loggers()
    levels = [logger.level for logger in loggers]
    try:
        _set_levels(loggers, [_SILENT] * len(loggers))
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        _set_levels(loggers, levels)


def _set_levels(loggers: list[logging.Logger], levels: list[int]) -> None:
    """``logger.setLevel`` for each, clearing the loggers' level caches once, not per logger.

    ``setLevel`` clears every logger's cache; torch has a few hundred loggers, so setting
    them one by one costs ~10 ms per ``quiet_torch`` block.
    """
    for logger, level in zip(loggers[1:], levels[1:]):
        logger.level = level
    loggers[0].setLevel(levels[0])  # clears the caches of all loggers
