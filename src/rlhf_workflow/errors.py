"""The one exception type that reaches the user as a plain message.

Anything the user can fix (a bad file, a bad config value, a missing model) raises
`UserError` with one sentence that names the file, line and field where it applies.
The CLI prints it without a traceback and exits non-zero. Every other exception is a
bug in this project and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator


class UserError(Exception):
    """A problem with the user's input, told in one clear message."""


class ModelSourceError(UserError):
    """A model or tokenizer source that names nothing loadable (no such path, no weights, ...)."""


LOW_DISK_BYTES = 64 * 1024 * 1024


@contextmanager
def disk_full_as_oserror(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Writing under ``directory``: turn a failure on a full disk into ``OSError(ENOSPC)``. torch and
    safetensors report a full disk as a bare RuntimeError ("unexpected pos", "iostream error");
    one raised while the device has almost no room left (< 64 MB) is taken for one."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        path = Path(directory)
        while not path.exists() and path != path.parent:
            path = path.parent
        if shutil.disk_usage(path).free < LOW_DISK_BYTES:
            raise OSError(errno.ENOSPC, f"No space left on device ({type(exc).__name__}: {exc})", str(directory)) from exc
        raise


@contextmanager
def model_source(key: str) -> Iterator[None]:
    """Name the config key behind a `ModelSourceError` raised inside: "... (set by model.name_or_path)",
    as the command being run names it (`config_key`)."""
    try:
        yield
    except ModelSourceError as exc:
        if "(set by " in str(exc):
            raise
        raise ModelSourceError(f"{exc} (set by {config_key(key)})") from None


# How the command being run names a stage's config keys: empty for a stage run by its own command;
# a run sets it around each stage it runs (`keys_named`), so that a message about `train.lr` of its
# DPO step says `dpo.train.lr`, the key the user types.
_KEY_NAMES: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("key_names", default=())


@contextmanager
def keys_named(names: dict[str, str]) -> Iterator[None]:
    """Inside, `config_key` names a stage's keys as the command that runs the stage takes them:
    ``names`` maps a stage's key or section (``"model"``, ``"train.lr"``; ``""`` for every other key)
    to the key that sets it (``"policy"``, ``"dpo.train.lr"``; ``"dpo"`` prefixes the rest)."""
    token = _KEY_NAMES.set(tuple(sorted(names.items(), key=lambda item: -len(item[0]))))
    try:
        yield
    finally:
        _KEY_NAMES.reset(token)


def config_key(key: str) -> str:
    """The dotted ``key`` of a stage's config as the user types it in the command that runs the stage."""
    for stage_key, typed in _KEY_NAMES.get():
        if not stage_key:
            return f"{typed}.{key}" if typed else key
        if key == stage_key or key.startswith(stage_key + "."):
            return typed + key[len(stage_key):]
    return key
