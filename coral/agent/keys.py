"""Shared key files: one function, so the proxy and the agent refuse the same bad keys."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.logchannel import MIN_KEY_SIZE

__all__ = ["MIN_KEY_SIZE", "read_key"]


def read_key(path: str | os.PathLike[str], what: str = "key") -> bytes:
    """The key in the file at PATH, surrounding whitespace stripped (so a trailing
    newline from `echo` or an editor does not become part of it).

    ValueError, naming WHAT ("key", "log key") and the file, if the file cannot be
    read or the key is shorter than MIN_KEY_SIZE bytes: a short key would make every
    MAC guessable, so it is refused rather than padded.
    """
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise ValueError(f"cannot read the {what}: {e}") from None
    if len(key) < MIN_KEY_SIZE:
        raise ValueError(f"{path}: the {what} must be at least {MIN_KEY_SIZE} bytes")
    return key
