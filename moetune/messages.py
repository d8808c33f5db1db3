"""One-line error messages: what moetune prints or raises for an exception it passes on."""

from __future__ import annotations


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
