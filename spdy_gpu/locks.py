"""Exclusive locks on the directories a command writes (a database, a run directory).

`exclusive_directory(path)` holds an flock on `path/.spdy-gpu.lock` for the with-block and
writes its pid and host into the file so that a refused writer can be told who holds it.
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
from collections.abc import Iterator
from pathlib import Path

from .errors import SpdyError
from .jsonio import leftover_temporaries

log = logging.getLogger(__name__)

LOCK_NAME = ".spdy-gpu.lock"


@contextlib.contextmanager
def exclusive_directory(directory: str | os.PathLike, what: str = "directory") -> Iterator[Path]:
    """Hold `directory` (created if absent) for writing; a second writer is refused with
    one line naming the holder. On leaving, the lock file goes, and so does the directory
    when this lock created it and nothing else was written into it."""
    directory = Path(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpdyError(f"cannot create the {what} {directory} ({e.strerror or e}); choose a "
                        "writable path") from None
    lock = directory / LOCK_NAME
    fd = _acquire(lock, what)
    for leftover in leftover_temporaries(directory):     # a killed writer's, now ours
        log.info("removing %s, left by an interrupted write", leftover)
        leftover.unlink(missing_ok=True)
    try:
        yield directory
    finally:
        lock.unlink(missing_ok=True)      # before unlocking: the next writer makes a new file
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()         # only succeeds when empty


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
    lock = Path(directory) / LOCK_NAME
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


def _acquire(lock: Path, what: str) -> int:
    """An open descriptor holding the flock on `lock`, its file naming this process."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SpdyError(f"cannot create the lock file {lock} ({e.strerror or e}); choose a "
                            f"writable {what}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpdyError(f"the {what} {lock.parent} is being written by another spdy-gpu "
                            f"process ({_describe(lock)}, lock file {lock}); wait for it to "
                            "finish or choose another path") from None
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
