"""Exclusive locks on what a command writes: a directory (a database, a run directory) or
one output file with its side files (a timing table and its .partial, gAP's weights and
checkpoint).

`exclusive_directory(path)` holds an flock on `path/.spdy-gpu.lock` for the with-block
(`exclusive_file(path)`: on `.NAME.spdy-gpu.lock` beside the file) and writes its pid and
host into the lock file so that a refused writer can be told who holds it.
The kernel releases an flock when its process dies, so a lock left by a killed process is
stale by construction: the next writer gets it, finds the dead holder's pid in the file and
says that it takes it over.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import SpdyError, as_path
from .jsonio import is_special, leftover_temporaries, written_for

log = logging.getLogger(__name__)

LOCK_NAME = ".spdy-gpu.lock"


@contextlib.contextmanager
def exclusive_directory(directory: str | os.PathLike, what: str = "directory") -> Iterator[Path]:
    """Hold `directory` (created if absent) for writing; a second writer is refused with
    one line naming the holder. On leaving, the lock file goes, and so does the directory
    when this lock created it and nothing else was written into it."""
    directory = as_path(directory, f"the {what}")
    target = Path(os.path.realpath(directory))     # a symlink's target, made if missing
    created = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpdyError(f"cannot create the {what} {directory} ({e.strerror or e}); choose a "
                        "writable path") from None
    try:
        with _held(directory / LOCK_NAME, f"{what} {directory}",
                   lambda: _leftovers_below(directory)):
            # a file in it locked by exclusive_file (`timings --out DIR/timings.json`) is
            # being written by another process, which would write what this one does
            _refuse_held(directory.glob(f".*{LOCK_NAME}"), f"{what} {directory}")
            yield directory
    finally:
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()                # only succeeds when empty


@contextlib.contextmanager
def exclusive_file(path: str | os.PathLike, what: str = "output file") -> Iterator[Path]:
    """Hold the file `path` and its side files (a checkpoint beside it) for writing; a
    second writer is refused with one line naming the holder. A device or pipe such as
    /dev/null is written through, unlocked."""
    path = Path(os.path.realpath(as_path(path, f"the {what}")))
    if is_special(path):
        yield path
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpdyError(f"cannot create the directory of {path} ({e.strerror or e}); choose a "
                        "writable path") from None
    # in a directory that exclusive_directory holds (a run's), its writer owns the file
    _refuse_held([path.parent / LOCK_NAME], f"{what} {path}")
    with _held(path.parent / f".{path.name}{LOCK_NAME}", f"{what} {path}",
               lambda: leftover_temporaries(path.parent, path.name)):
        yield path


@contextlib.contextmanager
def _held(lock: Path, held: str, leftovers: Callable[[], Iterable[Path]]) -> Iterator[None]:
    """The flock on `lock` for the block; once held, the `leftovers()` (temporaries a
    killed writer left) are removed; the lock file goes before it is unlocked."""
    fd = _acquire(lock, held)
    for leftover in leftovers():                       # a killed writer's, now ours
        log.info("removing %s, left by an interrupted write", leftover)
        leftover.unlink(missing_ok=True)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)      # before unlocking: the next writer makes a new file
        os.close(fd)


def _leftovers_below(directory: Path) -> Iterator[Path]:
    """Temporaries in `directory` and its subdirectories, except those another lock owns: a
    directory with a lock of its own (a database inside a run directory) and a file locked
    by exclusive_file (a `timings --out DIR/t.json`), whose writer, or its next one, owns
    them."""
    for root, subdirectories, files in os.walk(directory):
        subdirectories[:] = [d for d in subdirectories
                             if not os.path.lexists(os.path.join(root, d, LOCK_NAME))]
        locked = [f[1:-len(LOCK_NAME)] for f in files
                  if f.startswith(".") and f.endswith(LOCK_NAME) and f != LOCK_NAME]
        yield from (t for t in leftover_temporaries(Path(root))
                    if not any(written_for(t) == name or written_for(t).startswith(name + ".")
                               for name in locked))


ABANDONED_AFTER_S = 60      # a scratch lock this old and unheld: its process is gone


@contextlib.contextmanager
def scratch_directory(prefix: str) -> Iterator[Path]:
    """A temporary directory, locked while in use. A SIGKILL skips the cleanup of temporary
    directories, so the unlocked ones of `prefix` that a killed process left (its lock file
    older than ABANDONED_AFTER_S and held by no one) are removed first."""
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        lock = path / LOCK_NAME
        with contextlib.suppress(OSError):
            old = time.time() - lock.stat().st_mtime > ABANDONED_AFTER_S
            if old and holder(path) is None:
                log.info("removing %s, left by a killed process", path)
                shutil.rmtree(path, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, \
            exclusive_directory(tmp, "scratch directory") as held:
        yield held


def holder(directory: str | os.PathLike) -> str | None:
    """'pid N on host H' of the process writing `directory` now, or None when none is."""
    return _holder_of(Path(directory) / LOCK_NAME)


def _refuse_held(locks: Iterable[Path], wanted: str) -> None:
    """Refuse to write `wanted` while another process holds one of `locks`."""
    for lock in locks:
        writer = _holder_of(lock)
        if writer is not None:
            raise SpdyError(f"the {wanted} is being written by another spdy-gpu process "
                            f"({writer}, lock file {lock}); wait for it to finish or choose "
                            "another path")


def _holder_of(lock: Path) -> str | None:
    """'pid N on host H' of the process holding the flock on `lock`, or None."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)     # shared: readers never collide
    except BlockingIOError:
        return _describe(lock)
    else:
        return None
    finally:
        os.close(fd)


def _acquire(lock: Path, held: str) -> int:
    """An open descriptor holding the flock on `lock` (which guards `held`, e.g. "run
    directory runs/x"), its file naming this process."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SpdyError(f"cannot create the lock file {lock} ({e.strerror or e}); choose a "
                            "writable path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpdyError(f"the {held} is being written by another spdy-gpu process "
                            f"({_describe(lock)}, lock file {lock}); wait for it to finish or "
                            "choose another path") from None
        if _same_file(fd, lock):
            break
        os.close(fd)          # locked a file its last holder had already removed: retry
    previous = _describe(lock)
    if previous != "unknown holder":
        log.warning("taking over the stale lock %s of %s (that process is gone)", lock, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\nhost {socket.gethostname()}\n".encode(), 0)
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _describe(lock: Path) -> str:
    """'pid N on host H' from a lock file's content."""
    try:
        fields = dict(line.split(" ", 1) for line in lock.read_text().splitlines()
                      if " " in line)
    except OSError:
        fields = {}
    if "pid" not in fields:
        return "unknown holder"
    return f"pid {fields['pid']} on host {fields.get('host', '?')}"
