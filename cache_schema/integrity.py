"""Per-chunk integrity of a committed part: digests recorded at commit, checked at open and on every read.

The writer lists every file of every array a part holds (each array's ``zarr.json`` and its chunk files) once
the arrays are written, and records a crc32 of each in the part's commit record (``chunk_digests``), which is
written last. Readers then

* check at open that every recorded file exists (:func:`missing_files`): a deleted chunk would otherwise read
  back as the fill value (top-K ids of 0) and train silently;
* read the part through :class:`VerifiedStore`, which compares each recorded file's bytes with its digest
  before zarr decodes them: a flipped or truncated chunk is a :class:`CacheDamagedError`, never a wrong value
  or a codec traceback.

Nothing here knows the array names: whatever arrays a part has are covered, so arrays added by later format
versions need no change. Parts written before digests existed carry none and are checked structurally only
(:func:`has_digests` says which). :func:`damaged_parts` reads every file of every part and is what
``cache-teacher --repair`` uses to find the parts to re-score.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr
from zarr.storage import LocalStore

from cache_schema import format as fmt
from cache_schema.cache_state import read_part_commit
from cache_schema.part_layout import StorageDtypes, part_checksum

DIGESTS_KEY = "chunk_digests"  # key of the commit record: {"algorithm": "crc32", "files": {key: int}}
ALGORITHM = "crc32"
REPAIR_HINT = "re-score the damaged part(s) with `pipeline cache-teacher --repair` and the same config"


class CacheDamagedError(fmt.CacheFormatError):
    """A committed part's stored files differ from what its commit record says (missing, changed, truncated)."""


def _digest(data: bytes) -> int:
    # crc32 (zlib, C speed) detects accidental damage, which is the threat here; it costs a small fraction
    # of decoding the same chunk (measured in the loader benchmark, see README).
    return zlib.crc32(data)


def part_file_digests(part_dir: str | os.PathLike) -> dict[str, Any]:
    """{"algorithm", "files": {store key -> digest}} over every file below the part's array directories.

    Store keys are relative to the part (``topk_ids/c/0/0``, ``topk_ids/zarr.json``). The part's own
    ``zarr.json`` is left out: it holds the commit record itself.
    """
    root = Path(part_dir)
    files: dict[str, int] = {}
    for array_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(f for f in array_dir.rglob("*") if f.is_file()):
            files[file.relative_to(root).as_posix()] = _digest(file.read_bytes())
    return {"algorithm": ALGORITHM, "files": files}


def has_digests(commit: Mapping[str, Any]) -> bool:
    """True when the part's commit record lists its files' digests (parts written since integrity records)."""
    return isinstance(commit.get(DIGESTS_KEY), Mapping)


def _where(cache_path: Path, part_id: int, key: str) -> str:
    array, _, chunk = key.partition("/")
    return f"cache at {cache_path} is damaged: part {part_id}, array {array}, file {chunk or key}"


def missing_files(cache_path: Path, part_id: int, commit: Mapping[str, Any]) -> None:
    """Raise CacheDamagedError naming the first recorded file of the part that is no longer on disk."""
    if not has_digests(commit):
        return
    part_dir = cache_path / fmt.part_path(part_id)
    for key in commit[DIGESTS_KEY]["files"]:
        if not (part_dir / key).is_file():
            raise CacheDamagedError(f"{_where(cache_path, part_id, key)} is missing; {REPAIR_HINT}")


class VerifiedStore(LocalStore):
    """A read-only LocalStore over one part that checks each recorded file against its digest as it is read."""

    def __init__(self, cache_path: Path, part_id: int, digests: Mapping[str, int]) -> None:
        super().__init__(cache_path / fmt.part_path(part_id), read_only=True)
        self._cache_path = cache_path
        self._part_id = part_id
        self._digests = dict(digests)

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        expected = self._digests.get(key)
        if expected is None:
            return await super().get(key, prototype, byte_range)
        whole = await super().get(key, prototype, None)
        if whole is None:
            raise CacheDamagedError(f"{_where(self._cache_path, self._part_id, key)} is missing; {REPAIR_HINT}")
        if _digest(whole.to_bytes()) != expected:
            raise CacheDamagedError(f"{_where(self._cache_path, self._part_id, key)} does not match its "
                                    f"checksum (changed or truncated after commit); {REPAIR_HINT}")
        return whole if byte_range is None else await super().get(key, prototype, byte_range)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, VerifiedStore) and self.root == other.root
                and self._digests == other._digests)

    __hash__ = None  # type: ignore[assignment]


def part_store(cache_path: Path, part_id: int, commit: Mapping[str, Any]) -> VerifiedStore | str:
    """The store to open part ``part_id`` with: verifying when its commit has digests, else its plain path."""
    if not has_digests(commit):
        return str(cache_path / fmt.part_path(part_id))
    return VerifiedStore(cache_path, part_id, commit[DIGESTS_KEY]["files"])


def _checksum_damage(part_dir: Path, commit: Mapping[str, Any], meta: Mapping[str, Any]) -> str | None:
    """Parts written before per-file digests: recompute the whole-part checksum of the commit record."""
    try:
        group = zarr.open_group(store=str(part_dir), mode="r", zarr_format=3)
        arrays = {name: group[name] for name in group.array_keys()}
        checksum = part_checksum(arrays, StorageDtypes.from_meta(meta).array_names())
    except Exception as exc:  # noqa: BLE001 - any failure to read the part back is damage to report
        return f"unreadable ({type(exc).__name__})"
    return None if checksum == commit.get("checksum") else "does not match its checksum"


def _part_damage(cache_path: Path, part_id: int, commit: Mapping[str, Any] | None,
                 meta: Mapping[str, Any]) -> str | None:
    """Why part ``part_id`` is damaged (reading every recorded file), or None when it reads back intact."""
    part_dir = cache_path / fmt.part_path(part_id)
    if commit is None:
        return "not committed"
    if not has_digests(commit):
        return _checksum_damage(part_dir, commit, meta)
    for key, expected in commit[DIGESTS_KEY]["files"].items():
        file = part_dir / key
        if not file.is_file():
            return f"{key} is missing"
        if _digest(file.read_bytes()) != expected:
            return f"{key} does not match its checksum"
    return None


def damaged_parts(cache_path: str | os.PathLike, meta: Mapping[str, Any]) -> dict[int, str]:
    """{part_id: reason} for every part of the cache (root metadata ``meta``) that does not read back intact.

    Reads every file of every part: the full check ``cache-teacher --repair`` runs, not something to do on
    every open.
    """
    root = Path(cache_path)
    found = {}
    for part_id in range(int(meta["num_parts"])):
        reason = _part_damage(root, part_id, read_part_commit(root, part_id), meta)
        if reason is not None:
            found[part_id] = reason
    return found
