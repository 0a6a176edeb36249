"""Versioned JSON files written atomically: every output says what it is and how it was made."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import SpdyError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_json(path: str | os.PathLike, kind: str, version: int, body: dict[str, Any]) -> None:
    """Save `body` tagged with its file kind and format version."""
    document = {"format": kind, "version": version, **body}
    atomic_write_bytes(path, (json.dumps(document, indent=1) + "\n").encode())


def load_json(path: str | os.PathLike, kind: str, version: int) -> dict[str, Any]:
    """Load a file saved by `save_json`; refuse anything but a `kind` file of `version`."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpdyError(f"{path}: no such file; check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpdyError(f"{path}: not valid JSON ({e}); the file is corrupted or truncated, "
                        "regenerate it") from None
    if not isinstance(document, dict) or document.get("format") != kind:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise SpdyError(f"{path}: expected a {kind!r} file, found {found!r}; pass the right file")
    if document.get("version") != version:
        raise SpdyError(f"{path}: {kind} format version {document.get('version')!r} is not "
                        f"supported (this spdy-gpu reads version {version}); regenerate the file")
    return document


def require(document: dict[str, Any], key: str, types: type | tuple,
            path: str | os.PathLike) -> Any:
    """Fetch a required field of a loaded document, with a clear error if absent or mistyped."""
    if key not in document:
        raise SpdyError(f"{path}: missing field {key!r}; the file is malformed, regenerate it")
    value = document[key]
    if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
        raise SpdyError(f"{path}: field {key!r} has type {type(value).__name__}; "
                        "the file is malformed, regenerate it")
    return value


def _as_tuple(types: type | tuple) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def located(path: str | os.PathLike, error: Exception) -> SpdyError:
    """`error` as a SpdyError whose message starts with the file it is about."""
    message = str(error)
    return SpdyError(message if message.startswith(str(path)) else f"{path}: {message}")
