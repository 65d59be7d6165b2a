"""Lock files, so that two processes of one stage on one workdir never compute the same item twice.

A lock is a hidden file beside the item it guards (``.<item>.lock``), created with O_EXCL and holding the host
and pid of its owner. A lock whose process is gone (same host: the pid is not running; another host: not
touched for ``STALE_S``) is stale and is taken over, so a killed run never blocks the next one.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from .errors import io_error

STALE_S = 3600.0  # a lock of another host's process counts as abandoned after this long


def lock_path(item: Path) -> Path:
    return item.parent / f".{item.name}.lock"


def _holder(lock: Path) -> tuple[str, int] | None:
    try:
        host, pid = lock.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):  # gone meanwhile, or being written: treat as held
        return None


def is_held(lock: Path) -> bool:
    """Whether ``lock`` belongs to a process that may still be running."""
    holder = _holder(lock)
    if holder is None:
        return lock.exists()
    host, pid = holder
    if host != socket.gethostname():
        try:
            return time.time() - lock.stat().st_mtime < STALE_S
        except FileNotFoundError:
            return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def try_lock(item: Path) -> bool:
    """Take ``item``'s lock; False if a live process holds it. A stale lock is removed and taken."""
    lock = lock_path(item)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if is_held(lock):
                return False
            lock.unlink(missing_ok=True)
            continue
        except OSError as exc:
            raise io_error(exc, lock, "create the lock file") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True
    return False


def unlock(item: Path) -> None:
    """Remove ``item``'s lock if this process holds it."""
    lock = lock_path(item)
    if _holder(lock) == (socket.gethostname(), os.getpid()):
        lock.unlink(missing_ok=True)


def holders(items: list[Path]) -> str:
    """'host:pid, …' of the processes holding these items' locks (for a waiting message)."""
    found = {h for h in (_holder(lock_path(i)) for i in items) if h}
    return ", ".join(f"{h}:{p}" for h, p in sorted(found)) or "unknown"

