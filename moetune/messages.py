"""One-line error messages: what moetune prints or raises for an exception it passes on."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The exception's message up to its first line break; its type's name where it carries no message."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
