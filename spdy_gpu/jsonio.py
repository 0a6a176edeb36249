"""Versioned JSON files written atomically: every output says what it is and how it was made."""

from __future__ import annotations

import json
import numbers
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import SpdyError, as_path

TEMPORARY = ".tmp"      # replacing's files: .NAME.<12 hex digits>.tmp next to NAME


def leftover_temporaries(directory: Path, name: str | None = None) -> list[Path]:
    """The files `replacing` writes before their rename, in `directory` (only those of the
    file `name` and its side files, NAME.<suffix>, when given): left there only by a killed
    writer when the caller holds the lock on what they were written for."""
    stem = re.escape(name) + r"(\..+)?" if name is not None else ".+"
    return [p for p in directory.glob(f".*{TEMPORARY}")
            if re.fullmatch(rf"\.{stem}\.[0-9a-f]{{12}}{re.escape(TEMPORARY)}", p.name)]


def written_for(temporary: Path) -> str:
    """The name of the file (or side file) a `replacing` temporary was written for."""
    return temporary.name[1:-len(TEMPORARY) - 13]


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file next to `path`, for a writer that wants a file name: it becomes
    `path` when the with-block succeeds (a reader sees the old file or the whole new one,
    never half) and is removed whatever happens. A symlink's target is replaced (the link
    stays); a device or pipe (/dev/null) is written through, as it cannot be replaced."""
    path = Path(os.path.realpath(as_path(path)))
    if is_special(path):
        with _writing_through(path) as tmp:
            yield tmp
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_file(path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{TEMPORARY}")
    except OSError as e:
        raise _cannot_write(path, e) from e
    mode = os.stat(tmp).st_mode
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)             # writers that recreate the file (safetensors) make it 0600
        with open(tmp, "rb") as f:      # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _cannot_write(path, e) from e
    finally:
        Path(tmp).unlink(missing_ok=True)


def is_special(path: Path) -> bool:
    """An existing path that is neither a regular file nor a directory: a device, a pipe."""
    return path.exists() and not path.is_file() and not path.is_dir()


@contextmanager
def _writing_through(path: Path) -> Iterator[Path]:
    """A temporary file whose bytes are copied into the device or pipe `path` at the end."""
    with tempfile.TemporaryDirectory(prefix="spdy-") as tmp_dir:
        tmp = Path(tmp_dir) / path.name
        yield tmp
        try:
            with open(tmp, "rb") as source, open(path, "wb") as target:
                shutil.copyfileobj(source, target)
        except OSError as e:
            raise _cannot_write(path, e) from e


def _new_file(path: Path) -> Path:
    """Create `path`, which must not exist, with the permissions open() gives (0666 less
    the umask; tempfile.mkstemp's are 0600, which other users of an output could not read)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return path


def slug(name: str) -> str:
    """`name` as a file-name part: lower case, runs of other characters as one '-' (a GPU's
    name, a model's)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see replacing)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def _cannot_write(path: Path, error: OSError) -> SpdyError:
    return SpdyError(f"cannot write {path} ({error.strerror or error}); choose a writable "
                     "location with free space")


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """`path` as a file this process can write, refused before any work: a directory, a
    location under a file or one with no write permission is a one-line error naming `flag`."""
    path = as_path(path, flag)
    if path.is_dir():
        raise SpdyError(f"{flag} {path} is a directory; give the path of a file to write")
    if is_special(path.resolve()):
        if not os.access(path, os.W_OK):
            raise SpdyError(f"{flag} {path}: no permission to write it; choose another path")
        return path
    _check_can_create_in(path.resolve().parent, path, flag)
    return path


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """`path` as a directory this process can create or write into, checked before any work."""
    path = as_path(path, flag)
    if path.exists() and not path.is_dir():
        raise SpdyError(f"{flag} {path} is a file, not a directory; give a directory path")
    _check_can_create_in(path, path, flag)
    return path


def _check_can_create_in(directory: Path, path: Path, flag: str) -> None:
    """Files can be created in `directory` (made later if missing): its nearest existing
    ancestor is a directory we can create a file in. A real file is tried, since permission
    bits do not tell (root ignores them; /proc refuses anyway)."""
    existing = next(p for p in (directory, *directory.parents, Path(".")) if p.exists())
    if not existing.is_dir():
        raise SpdyError(f"{flag} {path}: {existing} is a file, not a directory; choose "
                        "another location")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise SpdyError(f"{flag} {path}: cannot write in {existing} ({e.strerror or e}); "
                        "choose a writable location") from None


def save_json(path: str | os.PathLike, kind: str, version: int, body: dict[str, Any]) -> None:
    """Save `body` tagged with its file kind and format version."""
    document = {"format": kind, "version": version, **body}
    atomic_write_bytes(path, (json.dumps(document, indent=1) + "\n").encode())


def load_json(path: str | os.PathLike, kind: str, version: int) -> dict[str, Any]:
    """Load a file saved by `save_json`; refuse anything but a `kind` file of `version`."""
    path = as_path(path, f"the {kind} file")
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpdyError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise SpdyError(f"{path} is a directory, not a JSON file; pass the file's path") from None
    except OSError as e:
        raise SpdyError(f"{path}: cannot read it ({e.strerror or e}); check the path and its "
                        "permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpdyError(f"{path}: not valid JSON ({e}); the file is corrupted or truncated, "
                        "regenerate it") from None
    if not isinstance(document, dict) or document.get("format") != kind:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise SpdyError(f"{path}: expected a {kind!r} file, found {found!r}; pass the right file")
    found = document.get("version")
    if found != version or type(found) is not int:      # (True == 1 and 1.0 == 1 too)
        raise SpdyError(f"{path}: {kind} format version {found!r} is not supported (this "
                        f"spdy-gpu reads the number {version}); regenerate the file")
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


def side_file(path: str | os.PathLike, suffix: str) -> Path | None:
    """The file beside the output `path` that keeps a job's progress (PATH + suffix, next to
    the real file a symlink names, where the output's lock is), or None for a device such
    as /dev/null: no progress is kept there."""
    real = Path(os.path.realpath(as_path(path)))
    if is_special(real):
        return None
    return real.with_name(real.name + suffix)


def is_number(value: Any) -> bool:
    """A real number: an int or float as a JSON number loads, or a NumPy scalar (a bool,
    though an int subclass, is not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_tuple(types: type | tuple) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def located(path: str | os.PathLike, error: Exception) -> SpdyError:
    """`error` as a SpdyError whose message starts with the file it is about."""
    message = str(error)
    return SpdyError(message if message.startswith(str(path)) else f"{path}: {message}")


def changed_fields(before: Any, now: Any, name: str = "") -> list[str]:
    """The dotted names of the fields two JSON documents differ in (identity.methods,
    identity.run.search.max_evaluations, ...), the document itself if it is not a dict."""
    if isinstance(before, Mapping) and isinstance(now, Mapping):
        return [field for key in sorted(before.keys() | now.keys(), key=str)
                for field in changed_fields(before.get(key), now.get(key),
                                             f"{name}.{key}" if name else str(key))]
    return [] if before == now else [name or "the document"]
