"""Cheap, read-only inspection of what is at a cache path: used by the writer (resume / overwrite decisions),
the reader (open checks) and the orchestrator (`peek_cache_state`, to say "nothing to do" or refuse early).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import zarr

from cache_schema.format import FORMAT_NAME, PART_COMMIT_ATTR, part_path
from cache_schema.lock import LOCK_FILES

CacheState = Literal["absent", "incomplete", "complete", "not_a_cache"]


def _read_group_attrs(path: Path) -> dict[str, Any] | None:
    """Attributes of the Zarr v3 group at `path`, or None when there is no readable group there."""
    if not (path / "zarr.json").is_file():
        return None
    try:
        group = zarr.open_group(store=str(path), mode="r", zarr_format=3)
    except Exception:  # a broken or non-group zarr.json: not something we may treat as ours
        return None
    return dict(group.attrs)


def read_root_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """Root metadata of a kd-topk-cache at `path` (any version), or None if it is not one."""
    attrs = _read_group_attrs(Path(path))
    if attrs is None or attrs.get("format") != FORMAT_NAME:
        return None
    return attrs


def peek_cache_state(path: str | os.PathLike) -> tuple[CacheState, dict[str, Any] | None]:
    """Classify `path` without opening a writer or reading any array.

    Returns ("absent", None) for a missing path or an empty directory, ("not_a_cache", None) for anything
    else that is not a kd-topk-cache root (never delete those), and ("incomplete"|"complete", root_meta) for
    a cache; "complete" means the completion record (`completed_at` + index) was written.
    """
    root = Path(path)
    if not root.exists() or (root.is_dir() and all(p.name in LOCK_FILES for p in root.iterdir())):
        return "absent", None  # a directory holding only a writer lock is what a run that wrote nothing leaves
    if not root.is_dir():
        return "not_a_cache", None
    meta = read_root_meta(root)
    if meta is None:
        return "not_a_cache", None
    return ("complete" if meta.get("completed_at") else "incomplete"), meta


def read_part_commit(path: str | os.PathLike, part_id: int) -> dict[str, Any] | None:
    """The commit record of part `part_id`, or None when the part is absent or uncommitted (garbage)."""
    attrs = _read_group_attrs(Path(path) / part_path(part_id))
    if attrs is None:
        return None
    return attrs.get(PART_COMMIT_ATTR)
