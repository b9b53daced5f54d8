"""What ``overwrite`` may delete: only what the cache wrote, never a file someone else put in its directory.

A cache directory holds its root ``zarr.json``, ``parts/`` (its ``zarr.json`` and one directory per part,
``parts/<6 digits>/`` with the part's ``zarr.json`` and one directory per array), the writer lock files and,
after a hard kill, zarr's ``*.partial`` temporaries. Anything else — a run directory placed inside
``cache.path``, a user's notes — makes :func:`remove_cache_files` refuse before deleting anything.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from cache_schema import format as fmt
from cache_schema.lock import LOCK_FILES

_METADATA = "zarr.json"
_PART_DIR = re.compile(rf"^\d{{{fmt.PART_ID_WIDTH}}}$")


def _is_temporary(path: Path) -> bool:
    return path.name.endswith(".partial")


def _foreign_in_part(part_dir: Path) -> list[Path]:
    """A part holds its zarr.json and one directory per array (whatever arrays it has), nothing else."""
    return [p for p in part_dir.iterdir()
            if not (p.is_dir() or p.name == _METADATA or _is_temporary(p))]


def foreign_entries(path: str | os.PathLike) -> list[Path]:
    """Entries under the cache at ``path`` that the cache did not write (empty: overwrite may proceed)."""
    root = Path(path)
    foreign = [p for p in root.iterdir()
               if p.name not in (_METADATA, fmt.PARTS_GROUP, *LOCK_FILES) and not _is_temporary(p)]
    parts = root / fmt.PARTS_GROUP
    if parts.is_dir():
        for entry in parts.iterdir():
            if entry.is_dir() and _PART_DIR.match(entry.name):
                foreign += _foreign_in_part(entry)
            elif entry.name != _METADATA and not _is_temporary(entry):
                foreign.append(entry)
    elif parts.exists():
        foreign.append(parts)
    return sorted(foreign)


def check_overwritable(path: str | os.PathLike, key: str = "cache.path") -> None:
    """Raise CacheError naming what an overwrite of the cache at ``path`` would wrongly delete."""
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(str(p.relative_to(path)) for p in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise fmt.CacheError(
            f"{key}={str(path)!r} holds {len(foreign)} file(s) the cache did not write ({shown}); overwrite "
            "would delete them: move them out of the cache directory, then run again — nothing was deleted"
        )


def remove_cache_files(path: str | os.PathLike) -> None:
    """Delete the cache's own files at ``path`` (parts first, the root metadata last); keep the lock files.

    Refuses, deleting nothing, when anything else is there. A kill midway leaves a cache root whose missing
    parts the next run rescores or overwrites.
    """
    root = Path(path)
    check_overwritable(root)
    if (root / fmt.PARTS_GROUP).exists():
        shutil.rmtree(root / fmt.PARTS_GROUP)
    for entry in root.iterdir():
        if _is_temporary(entry):
            entry.unlink()
    (root / _METADATA).unlink(missing_ok=True)
