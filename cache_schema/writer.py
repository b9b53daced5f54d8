"""Writing a kd-topk-cache: CacheWriter (root creation, resume, finalize) and write_part (one part, callable
from any process).

Protocol (README.md, "Parts and commits"): the root group and its metadata are created first; each part is
written into its own sub-group `parts/<part_id>` and committed by writing its commit record LAST (an attribute
of the part's group; zarr >= 3.1.3 replaces zarr.json atomically). A part without a commit record is garbage
and is deleted before being rewritten. The completion record (`completed_at` + `index`) is written to the root
attributes LAST, only once every part is committed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cache_schema import format as fmt
from cache_schema.cache_state import peek_cache_state, read_part_commit, read_root_meta
from cache_schema.encoding import cache_encoding, compressors_for, encoding_meta
from cache_schema.integrity import DIGESTS_KEY, damaged_parts, part_file_digests
from cache_schema.lock import CacheWriteLock
from cache_schema.overwrite import remove_cache_files
from cache_schema.part_layout import StorageDtypes, chunk_shape, decode_sample_ids, pack_samples, part_checksum
from cache_schema.sample_checks import coerce_sample, rules_from_meta, sample_problems
from cache_schema.sampled import cache_targets, targets_meta


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _relations_from_meta(meta: Mapping[str, Any], relations: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """Accept the relations spec either as the `relations` argument or as meta["relations"] (same keys;
    `kinds`, if given, must be the standard ["qq", "kk", "vv"]); both given must agree."""
    from_meta = meta.get("relations")
    if from_meta is None:
        return relations
    if not isinstance(from_meta, Mapping) or list(from_meta.get("kinds", fmt.RELATION_KINDS)) != list(
        fmt.RELATION_KINDS
    ):
        raise fmt.CacheError(
            f"meta['relations'] must be {{'layer', 'num_relation_heads'}} with kinds qq/kk/vv, got {from_meta!r}"
        )
    spec = {key: from_meta.get(key) for key in ("layer", "num_relation_heads")}
    if relations is not None and dict(relations) != spec:
        raise fmt.CacheError(f"relations={dict(relations)!r} disagrees with meta['relations']={dict(from_meta)!r}")
    return spec


def _check_relations_spec(relations: Mapping[str, Any] | None, relations_dtype: str) -> dict[str, Any] | None:
    if relations is None:
        return None
    unknown = sorted(set(relations) - {"layer", "num_relation_heads"})
    if (
        unknown
        or not isinstance(relations.get("layer"), int)
        or not isinstance(relations.get("num_relation_heads"), int)
    ):
        raise fmt.CacheError(f"relations must be {{'layer': int, 'num_relation_heads': int}}, got {dict(relations)!r}")
    if relations["num_relation_heads"] < 1:
        raise fmt.CacheError(f"relations.num_relation_heads must be >= 1, got {relations['num_relation_heads']}")
    if relations_dtype not in fmt.LOGPROB_DTYPES:
        raise fmt.CacheError(f"relations_dtype must be one of {fmt.LOGPROB_DTYPES}, got {relations_dtype!r}")
    return {**relations, "kinds": list(fmt.RELATION_KINDS), "dtype": relations_dtype}


def _check_sources(meta: Mapping[str, Any]) -> None:
    """``meta["sources"]``, when given, names each sample's source: distinct non-empty strings."""
    sources = meta.get(fmt.SOURCES_META_KEY)
    if sources is None:
        return
    if (not isinstance(sources, list) or not sources or not all(isinstance(n, str) and n for n in sources)
            or len(set(sources)) != len(sources)):
        raise fmt.CacheError(f"cache meta['sources'] must be a non-empty list of distinct non-empty names, "
                             f"got {sources!r}")


def _check_user_meta(meta: Mapping[str, Any], writer_meta: Mapping[str, Any]) -> None:
    """Required keys present, JSON-able, and no writer-owned key set to a different value."""
    missing = [key for key in fmt.REQUIRED_META_KEYS if key not in meta]
    if missing:
        raise fmt.CacheError(f"cache meta is missing key(s) {missing}; it needs {list(fmt.REQUIRED_META_KEYS)}")
    fingerprints = meta["fingerprints"]
    if not isinstance(fingerprints, Mapping) or any(k not in fingerprints for k in fmt.REQUIRED_FINGERPRINTS):
        raise fmt.CacheError(
            f"cache meta['fingerprints'] must be a dict with keys {list(fmt.REQUIRED_FINGERPRINTS)}, "
            f"got {fingerprints!r}"
        )
    for key in fmt.WRITER_KEYS:
        if key in meta and meta[key] != writer_meta.get(key):
            raise fmt.CacheError(
                f"cache meta key {key!r}={meta[key]!r} conflicts with the writer's value {writer_meta.get(key)!r}; "
                "drop it from meta (the writer records it)"
            )
    try:
        json.dumps(dict(meta), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise fmt.CacheError(
            f"cache meta must be JSON-serializable (resolve configs to plain dicts): {error}"
        ) from None


def _identity(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two caches the same product: compared for both complete and incomplete caches."""
    relations = meta.get("relations") or {}
    return {
        "fingerprints": meta.get("fingerprints"),
        "top_k": meta.get("top_k"),
        "relations.layer": relations.get("layer"),
        "relations.num_relation_heads": relations.get("num_relation_heads"),
        "temperatures": list(fmt.cache_temperatures(meta)),  # (1.0,) for versions 1-2: they stay reusable
        "encoding": cache_encoding(meta)["name"],
        "targets": cache_targets(meta),  # {"mode": "topk"} for versions 1-3
    }


def identity_differences(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Names of what makes two caches different products: fingerprint names, ``top_k``, ``relations.*``,
    ``temperatures``, ``encoding``, ``targets``.

    Empty when a cache with meta ``existing`` can be reused (or resumed) for the request ``wanted``.
    """
    have, want = _identity(existing), _identity(wanted)
    have_fps, want_fps = have.pop("fingerprints") or {}, want.pop("fingerprints") or {}
    names = sorted(k for k in set(have_fps) | set(want_fps) if have_fps.get(k) != want_fps.get(k))
    return names + [key for key in want if have.get(key) != want[key]]


def _layout(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a resumed (incomplete) cache must also share, because parts already written depend on it."""
    return {
        key: meta.get(key) for key in ("format_version", "num_parts", "vocab_size", "id_dtype", "logprob_dtype",
                                       fmt.SOURCES_META_KEY)
    } | {"relations.dtype": (meta.get("relations") or {}).get("dtype")}


def _first_difference(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    for key in wanted:
        if existing.get(key) != wanted[key]:
            return f"{key}: existing {existing.get(key)!r} vs requested {wanted[key]!r}"
    return None


class CacheWriter:
    """Creates (or resumes) a cache at `path` whose samples are written in `num_parts` parts.

    Use as a context manager; inside, `pending_parts()` lists the parts still to write, `write_part` (this
    module, any process) writes one, and `finalize()` writes the completion record. `already_complete` is
    True when a complete cache with the same fingerprints and top_k already exists (nothing to do).
    `relations`, when given as {"layer": int, "num_relation_heads": int}, makes every sample carry
    `relations` [3, A_r, n, n]. `temperatures` (1.0 is always included) other than 1 make every sample carry
    `log_normalizers` [n, M]: log Σ_V p^(1/τ) per temperature, what tempering the tail exactly needs.
    `encoding` (cache_schema/encoding.py): ``plain`` top-K arrays or ``compact`` ones (sorted id deltas, 8-bit
    logprob codes); samples are given and read back the same way either way. ``targets`` (cache_schema/sampled.py):
    ``topk``, ``sampled`` (top_k must be 0; every sample carries sampled_ids / sampled_counts [n, S] with S =
    ``samples_per_position`` draws at ``sample_temperature``) or ``both``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        meta: Mapping[str, Any],
        num_parts: int,
        *,
        top_k: int,
        vocab_size: int,
        overwrite: bool = False,
        repair: bool = False,
        logprob_dtype: str = "float16",
        relations: Mapping[str, Any] | None = None,
        relations_dtype: str = "float16",
        temperatures: Sequence[float] = (1.0,),
        encoding: str = "plain",
        targets: str = "topk",
        samples_per_position: int = 0,
        sample_temperature: float = 1.0,
    ) -> None:
        if not 1 <= num_parts <= fmt.MAX_PARTS:
            raise fmt.CacheError(f"num_parts must be in [1, {fmt.MAX_PARTS}], got {num_parts}")
        targets_record = targets_meta(targets, samples_per_position, sample_temperature)
        if (top_k != 0) if targets == "sampled" else top_k < 1:
            raise fmt.CacheError(f"top_k must be {'0 with targets=sampled' if targets == 'sampled' else '>= 1'}, "
                                 f"got {top_k}")
        if logprob_dtype not in fmt.LOGPROB_DTYPES:
            raise fmt.CacheError(f"logprob_dtype must be one of {fmt.LOGPROB_DTYPES}, got {logprob_dtype!r}")
        self.path = Path(path)
        self.num_parts = num_parts
        self.overwrite = overwrite
        self.repair = repair
        self.damaged: dict[int, str] = {}
        """repair only: {part_id: why} of the parts found damaged and re-opened for scoring."""
        self._lock: CacheWriteLock | None = None
        self.already_complete = False
        writer_meta = {
            "format": fmt.FORMAT_NAME,
            "format_version": fmt.FORMAT_VERSION,
            "num_parts": num_parts,
            "vocab_size": int(vocab_size),
            "top_k": int(top_k),
            "id_dtype": fmt.id_dtype_for_vocab(vocab_size).name,
            "position_dtype": fmt.POSITION_DTYPE.name,
            "logprob_dtype": logprob_dtype,
            "label_logprob_dtype": fmt.LABEL_LOGPROB_DTYPE.name,
            "relations": _check_relations_spec(_relations_from_meta(meta, relations), relations_dtype),
            "temperatures": fmt.normalized_temperatures(temperatures),
            "encoding": encoding_meta(encoding),
            "targets": targets_record,
        }
        user_meta = {key: value for key, value in meta.items() if key != "relations"}  # merged just above
        _check_user_meta(user_meta, writer_meta)
        _check_sources(user_meta)
        self.meta: dict[str, Any] = {**user_meta, **writer_meta}

    def __enter__(self) -> CacheWriter:
        if peek_cache_state(self.path)[0] == "not_a_cache":
            raise fmt.CacheError(
                f"{self.path} exists and is not a {fmt.FORMAT_NAME} cache; refusing to write into or delete it "
                "(choose a new or empty directory)"
            )
        # Everything that creates, deletes or cleans up happens under the lock, decided on what is there now.
        self._lock = CacheWriteLock(self.path).__enter__()
        try:
            return self._enter_locked()
        except BaseException:
            self.__exit__()
            raise

    def _enter_locked(self) -> CacheWriter:
        state, existing = peek_cache_state(self.path)
        if state != "absent" and self.overwrite:
            remove_cache_files(self.path)
            state, existing = "absent", None
        if state == "absent":
            self._create_root()
            return self
        assert existing is not None
        difference = _first_difference(_identity(existing), _identity(self.meta))
        if difference is None and state == "incomplete":
            difference = _first_difference(_layout(existing), _layout(self.meta))
        if difference is not None:
            raise fmt.CacheMismatchError(
                f"{state} cache at {self.path} was made from other inputs ({difference}); "
                "pass overwrite=True or choose another path"
            )
        if self.repair:
            state = self._reopen_damaged(existing)
        self.already_complete = state == "complete"
        self.meta = {key: value for key, value in existing.items()
                     if state == "complete" or key not in ("completed_at", "index")}
        zarr.open_group(store=str(self.path), mode="a", zarr_format=3).require_group(fmt.PARTS_GROUP)
        return self

    def _reopen_damaged(self, existing: Mapping[str, Any]) -> str:
        """repair: make a cache with damaged parts incomplete (again), so exactly those parts are re-scored."""
        self.damaged = damaged_parts(self.path, existing)
        if not self.damaged:
            return "complete" if existing.get("completed_at") else "incomplete"
        if existing.get("format_version") != fmt.FORMAT_VERSION:  # its parts could not be rewritten alike
            raise fmt.CacheError(
                f"{self.path}: part(s) {sorted(self.damaged)[:5]} are damaged, but this code writes format version "
                f"{fmt.FORMAT_VERSION}, not the cache's {existing.get('format_version')!r}; rebuild it with overwrite "
                "(nothing was changed)"
            )
        # Incomplete first (the index lists the damaged parts' old commits), then the damaged parts go.
        root = zarr.open_group(store=str(self.path), mode="r+", zarr_format=3)
        root.attrs.put({key: value for key, value in root.attrs.items() if key not in ("completed_at", "index")})
        for part_id in self.damaged:
            shutil.rmtree(self.path / fmt.part_path(part_id), ignore_errors=True)
        return "incomplete"

    def __exit__(self, *exc_info: object) -> None:
        # finalize is explicit: leaving the block early must not mark the cache complete
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.__exit__()

    def _create_root(self) -> None:
        self.meta["created_at"] = _utc_now()
        root = zarr.create_group(store=str(self.path), attributes=self.meta, zarr_format=3)
        root.create_group(fmt.PARTS_GROUP)

    def pending_parts(self) -> list[int]:
        """Ids of parts not yet committed; deletes their uncommitted leftovers. Call before dispatching work."""
        if self.already_complete:
            return []
        pending = []
        for part_id in range(self.num_parts):
            if read_part_commit(self.path, part_id) is None:
                shutil.rmtree(self.path / fmt.part_path(part_id), ignore_errors=True)
                pending.append(part_id)
        return pending

    def write_part(self, part_id: int, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Same as the module-level write_part on this writer's path."""
        return write_part(self.path, part_id, samples)

    def finalize(self) -> dict[str, Any]:
        """Check every part is committed and sample ids are unique, then write the completion record LAST.

        Returns the index ({"parts": [...], "totals": {...}}). A no-op on an already complete cache.
        """
        if self.already_complete:
            return self.meta["index"]
        commits = [read_part_commit(self.path, part_id) for part_id in range(self.num_parts)]
        missing = [part_id for part_id, commit in enumerate(commits) if commit is None]
        if missing:
            raise fmt.IncompleteCacheError(
                f"cannot finalize {self.path}: {len(missing)} of {self.num_parts} part(s) not committed "
                f"(first: {missing[:5]}); write them, then finalize again"
            )
        self._check_unique_sample_ids()
        totals = {key: sum(int(c[key]) for c in commits) for key in _COUNT_KEYS}
        index = {"parts": commits, "totals": totals,
                 "max_token_id": max(int(c.get("max_token_id", -1)) for c in commits) if commits else -1}
        root = zarr.open_group(store=str(self.path), mode="r+", zarr_format=3)
        root.attrs.update({"index": index, "completed_at": _utc_now()})
        self.meta = dict(root.attrs)
        return index

    def _check_unique_sample_ids(self) -> None:
        seen: dict[str, int] = {}
        for part_id in range(self.num_parts):
            group = zarr.open_group(store=str(self.path / fmt.part_path(part_id)), mode="r", zarr_format=3)
            ids = decode_sample_ids(group[fmt.SAMPLE_ID_OFFSETS][:], group[fmt.SAMPLE_ID_BYTES][:])
            for sample_id in ids:
                if sample_id in seen:
                    raise fmt.CacheValidationError(
                        f"sample id {sample_id!r} appears in part {seen[sample_id]} and part {part_id}; "
                        "sample ids must be unique across the cache"
                    )
                seen[sample_id] = part_id


_COUNT_KEYS = ("num_samples", "num_tokens", "num_teacher_tokens", "num_label_positions", "num_relation_values")


def _load_writable_meta(path: Path, part_id: int) -> dict[str, Any]:
    meta = read_root_meta(path)
    if meta is None:
        raise fmt.CacheFormatError(f"{path} is not a {fmt.FORMAT_NAME} cache; create it with CacheWriter first")
    if meta.get("format_version") != fmt.FORMAT_VERSION:
        raise fmt.CacheFormatError(
            f"{path} has format_version {meta.get('format_version')!r}; this code writes version {fmt.FORMAT_VERSION}"
        )
    if meta.get("completed_at"):
        raise fmt.CacheError(f"{path} is already complete; refusing to write part {part_id}")
    if not isinstance(part_id, int) or not 0 <= part_id < int(meta["num_parts"]):
        raise fmt.CacheError(f"part_id {part_id!r} out of range: {path} has num_parts={meta['num_parts']}")
    return meta


def _coerce_all(samples: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], part_id: int) -> list[dict[str, Any]]:
    """Validate every sample before anything is written; the first bad sample raises, naming its id."""
    rules = rules_from_meta(meta)
    coerced, seen = [], set()
    for sample in samples:
        arrays = coerce_sample(sample, rules)
        problems = sample_problems(arrays, rules)
        if problems:
            raise fmt.CacheValidationError(
                f"part {part_id}: sample {arrays['sample_id']!r} is invalid: " + "; ".join(problems)
            )
        if arrays["sample_id"] in seen:
            raise fmt.CacheValidationError(f"part {part_id}: sample id {arrays['sample_id']!r} appears twice")
        seen.add(arrays["sample_id"])
        coerced.append(arrays)
    return coerced


def _check_storage_range(packed: Mapping[str, Any], samples: Sequence[Mapping[str, Any]], part_id: int) -> None:
    """A finite logprob below float16's range (-65504) would be stored as -inf: refuse instead of corrupting."""
    if fmt.TOPK_LOGPROBS not in packed:
        return  # compact: the row top is float32 and codes saturate; nothing can overflow
    finite_rows = np.isfinite(packed[fmt.TOPK_LOGPROBS]).all(axis=1)  # [N]
    if finite_rows.all():
        return
    first_row = int(np.flatnonzero(~finite_rows)[0])
    sample_index = int(np.searchsorted(packed[fmt.LABEL_OFFSETS], first_row, side="right") - 1)
    raise fmt.CacheValidationError(
        f"part {part_id}: sample {samples[sample_index]['sample_id']!r} has topk_logprobs below the "
        f"{packed[fmt.TOPK_LOGPROBS].dtype} range; use logprob_dtype='float32'"
    )


def write_part(path: str | os.PathLike, part_id: int, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Validate `samples`, write them as part `part_id` of the cache at `path`, then commit the part.

    Safe to call concurrently from several processes for DIFFERENT part ids (each part owns its own arrays);
    never call it twice at once for the same part. Refuses to overwrite a committed part. Uncommitted
    leftovers of this part (from a crashed run) are deleted first. Returns the commit record.
    """
    path = Path(path)
    meta = _load_writable_meta(path, part_id)
    if read_part_commit(path, part_id) is not None:
        raise fmt.CacheError(f"part {part_id} of {path} is already committed; refusing to overwrite it")
    coerced = _coerce_all(samples, meta, part_id)
    dtypes = StorageDtypes.from_meta(meta)
    packed = pack_samples(coerced, dtypes, int(meta["top_k"]))
    _check_storage_range(packed, coerced, part_id)
    has_relations = dtypes.relations is not None

    part_dir = path / fmt.part_path(part_id)
    shutil.rmtree(part_dir, ignore_errors=True)
    group = zarr.create_group(store=str(part_dir), attributes={"part_id": part_id}, zarr_format=3)
    for name in dtypes.array_names():
        data = packed[name]
        array = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunk_shape(name, data.shape),
            compressors=compressors_for(name),
            fill_value=0,
        )
        if data.size:
            array[...] = data
    commit = {
        "part_id": part_id,
        "num_samples": len(coerced),
        "num_tokens": int(packed[fmt.TOKEN_OFFSETS][-1]),
        "num_teacher_tokens": int(packed[fmt.TEACHER_TOKEN_OFFSETS][-1]),
        "num_label_positions": int(packed[fmt.LABEL_OFFSETS][-1]),
        "num_relation_values": int(packed[fmt.RELATION_OFFSETS][-1]) if has_relations else 0,
        # The largest id a student must embed (its inputs and the teacher's top-K): lets a student whose
        # embedding is padded differently from the teacher's (Qwen 151936 vs 152064 rows) be checked exactly.
        "max_token_id": max((int(np.max(ids)) for ids in (packed[fmt.INPUT_IDS], *(s["topk_ids"] for s in coerced),
                                                                  *(s.get(fmt.SAMPLED_IDS_KEY, s["topk_ids"])
                                                                    for s in coerced))
                             if ids.size), default=-1),
        "checksum": part_checksum(packed, dtypes.array_names()),
        "committed_at": _utc_now(),
        DIGESTS_KEY: part_file_digests(part_dir),  # every file of every array, checked on each later read
    }
    group.attrs.update({fmt.PART_COMMIT_ATTR: commit})  # LAST: this write is what makes the part exist
    return commit
