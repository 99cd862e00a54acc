"""Sparing Python's cycle collector the objects that existed before a conversion.

A conversion allocates hundreds of thousands of small Python objects (fx nodes, fake
tensors, export's symbolic shapes), so the cycle collector runs a full collection now and
then while it works, and a full collection walks every tracked object of the process --
torch's, transformers', the user's -- not just the conversion's: 0.25-0.4 s of a 32-layer
HF Llama's ~3 s conversion here, in most runs. ``gc.freeze()`` moves the objects alive at
the start into a permanent generation that collections skip; what the conversion makes
is still collected as usual, and ``gc.unfreeze()`` hands the rest back afterwards (garbage
among the frozen objects waits until then). A process that froze objects itself (a
pre-fork server) is left alone: ``unfreeze`` would undo its freeze.
"""

from __future__ import annotations

import contextlib
import functools
import gc

__all__ = ["collector_spared", "spares_collector"]


@contextlib.contextmanager
def collector_spared():
    """Collections inside the block skip the objects alive when it starts (see the module docstring)."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def spares_collector(function):
    """``function`` run under ``collector_spared()``."""
    @functools.wraps(function)
    def spared(*args, **kwargs):
        with collector_spared():
            return function(*args, **kwargs)
    return spared
