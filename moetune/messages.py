"""One-line error messages: what moetune prints or raises for an exception it passes on."""

from __future__ import annotations

import shutil


def first_line(err: BaseException) -> str:
    """The exception's message up to its first line break; its type's name where it carries no message."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def whole_message(err: BaseException, limit: int = 300) -> str:
    """The exception's message on one line (its lines joined), cut at `limit` characters: for messages whose first
    line alone says nothing ("Validation error for field 'hidden_size':" above the expected and given types)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_load_errors() -> tuple[type[BaseException], ...]:
    """What `transformers.AutoConfig.from_pretrained` raises for a config.json it cannot use: OSError / ValueError, and
    since huggingface_hub's strict dataclasses (transformers 5.x configs) a StrictDataclassError for a field of the
    wrong type ({"hidden_size": "big"}), which derives from Exception alone."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub has no strict dataclasses
        return (OSError, ValueError, TypeError)
    return (OSError, ValueError, TypeError, StrictDataclassError)


def os_error_line(err: OSError) -> str:
    """One line for a failed write: shutil's copy of a tree (the demo model moved into the output across file systems)
    raises one error holding a list of (source, target, why), which would print as that whole list."""
    failures = err.args[0] if isinstance(err, shutil.Error) and err.args else None
    if isinstance(failures, list) and failures and isinstance(failures[0], tuple) and len(failures[0]) == 3:
        _, target, why = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        return f"cannot write {target}: {why}{more}"
    return first_line(err)
