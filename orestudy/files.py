"""File helpers shared by every wing: whole-or-nothing writes, JSON caches that heal, one warning line."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from pathlib import Path




def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def read_cache(path: Path | None, valid=lambda value: True):
    """A JSON cache file's content, or None when absent; a damaged one (truncated, garbage, or not what
    valid accepts) is reported and treated as absent, so it is rebuilt rather than blocking every run."""
    if path is None or not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
        if valid(value):
            return value
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError):
        pass
    warn(f"ignoring the damaged cache file {path}; it is rebuilt")
    return None


@contextlib.contextmanager
def replaced(path: Path):
    """A temporary name beside path, of this process and thread alone, moved over path when the block
    ends: a reader sees the old file or the whole new one, and concurrent writers (two identical runs,
    trials sharing a cache) never write into each other's file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, value, indent: int | None = None) -> None:
    """JSON written whole or not at all: processes sharing a cache folder never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced(path) as tmp:
        tmp.write_text(json.dumps(value, indent=indent))
