"""One writer per cache: an exclusive lock on the cache directory, held for a whole stage-one run.

The lock is an OS file lock (``filelock``: ``flock`` on POSIX) on ``<cache>/.kd-writer.lock``. The kernel
releases it when the holding process dies, kill -9 included, so a stale lock of a dead run never blocks the
next one: the lock file stays, but the lock on it is free and the next run takes it over. Who holds it is
written to ``<cache>/.kd-writer.owner`` (pid, host, start time) after taking it, so a refused run can name
the holder; filelock truncates the lock file itself on every attempt, so that record lives beside it.

Only the run that holds the lock creates, overwrites, cleans up or finalizes the cache; the dask workers of
that run write their own parts without taking it (each part owns its directory).
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from cache_schema import format as fmt

LOCK_FILE = ".kd-writer.lock"
OWNER_FILE = ".kd-writer.owner"
LOCK_FILES = (LOCK_FILE, OWNER_FILE)
"""Names the lock keeps in the cache directory: not cache content, never a reason to call it foreign."""


class CacheLockedError(fmt.CacheError):
    """Another live process is writing this cache."""


def _holder(path: Path) -> str:
    try:
        owner = json.loads((path / OWNER_FILE).read_text())
        return f"process {owner['pid']} on {owner['host']} (since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class CacheWriteLock:
    """Context manager: take the cache's writer lock without waiting, or raise CacheLockedError naming the holder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock: FileLock | None = None

    def __enter__(self) -> CacheWriteLock:
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / LOCK_FILE), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            raise CacheLockedError(
                f"{self.path} is being written by {_holder(self.path)}; wait for that run to finish (or stop "
                "it), then run again — nothing was changed"
            ) from None
        self._lock = lock
        owner: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (self.path / OWNER_FILE).write_text(json.dumps(owner) + "\n")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
