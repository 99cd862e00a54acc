"""Errors revcompile raises for things a user can act on."""

from __future__ import annotations

__all__ = ["ConversionError"]


class ConversionError(RuntimeError):
    """The model could not be converted as asked.

    The message says what was found, why it was rejected, and what to try.
    """
