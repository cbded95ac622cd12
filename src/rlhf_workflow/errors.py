"""The one exception type that reaches the user as a plain message.

Anything the user can fix (a bad file, a bad config value, a missing model) raises
`UserError` with one sentence that names the file, line and field where it applies.
The CLI prints it without a traceback and exits non-zero. Every other exception is a
bug in this project and keeps its traceback.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class UserError(Exception):
    """A problem with the user's input, told in one clear message."""


class ModelSourceError(UserError):
    """A model or tokenizer source that names nothing loadable (no such path, no weights, ...)."""


@contextmanager
def model_source(key: str) -> Iterator[None]:
    """Name the config key behind a `ModelSourceError` raised inside: "... (set by model.name_or_path)"."""
    try:
        yield
    except ModelSourceError as exc:
        if "(set by " in str(exc):
            raise
        raise ModelSourceError(f"{exc} (set by {key})") from None
