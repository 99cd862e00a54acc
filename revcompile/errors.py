"""Errors revcompile raises for things a user can act on, and how any error becomes one line."""

from __future__ import annotations

__all__ = ["ConversionError", "one_line"]


class ConversionError(RuntimeError):
    """The model could not be converted as asked.

    The message says what was found, why it was rejected, and what to try.
    """


def one_line(err: BaseException, *, limit: int = 300, with_type: bool = True) -> str:
    """``err`` as one line: ``"TypeName: first line of its message"``, at most ``limit`` characters.

    Torch and the libraries it calls raise multi-line messages (graph dumps, suggested
    fixes); a user reading a command's error, a plan note or a skipped reason needs the
    first line, where they say what went wrong. Without ``with_type`` the whole message is
    kept, with its line breaks and runs of spaces folded into single spaces.
    """
    text = str(err).strip()
    if not with_type:
        return " ".join(text.split())
    first = text.splitlines()[0].strip() if text else ""
    if len(first) > limit:
        first = first[: limit - 3].rstrip() + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
