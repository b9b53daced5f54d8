"""Builders of random but valid cache samples and metadata for the cache_schema tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cache_schema import CacheWriter, read_part_commit, write_part
from cache_schema.format import PART_COMMIT_ATTR, part_path
from cache_schema.integrity import DIGESTS_KEY, part_file_digests

VOCAB_SIZE = 1000
TOP_K = 8
NUM_RELATION_HEADS = 2


def make_meta(data_fingerprint: str = "data-a", top_k: int = TOP_K) -> dict[str, Any]:
    return {
        "fingerprints": {"teacher": "teacher-a", "tokenizer": "tok-a", "data": data_fingerprint, "prompt": "prompt-a"},
        "top_k": top_k,
        "logprob_mode": "raw_logprobs",
        "config": {"teacher": {"model": "tiny"}, "cache": {"top_k": top_k}},
    }


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def make_sample(
    rng: np.random.Generator,
    sample_id: str,
    *,
    with_relations: bool = False,
    top_k: int = TOP_K,
    min_pairs: int = 1,
) -> dict[str, Any]:
    """A valid sample: teacher sequence = random few-shot prefix + student sequence; ragged lengths.

    Shapes: input_ids [T], teacher_input_ids [P+T], positions [n], topk [n, K], relations [3, A_r, n, n].
    """
    length = int(rng.integers(max(2, min_pairs + 1), 40))
    prefix = int(rng.integers(0, 12))
    input_ids = rng.integers(0, VOCAB_SIZE, size=length)
    teacher_input_ids = np.concatenate([rng.integers(0, VOCAB_SIZE, size=prefix), input_ids])
    num_pairs = int(rng.integers(min_pairs, length))
    label_positions = np.sort(rng.choice(np.arange(1, length), size=num_pairs, replace=False))
    logprobs = _log_softmax(rng.normal(scale=3.0, size=(num_pairs, VOCAB_SIZE)))  # [n, V] full-vocab
    topk_ids = np.argsort(-logprobs, axis=1, kind="stable")[:, :top_k]
    sample = {
        "sample_id": sample_id,
        "input_ids": input_ids,
        "teacher_input_ids": teacher_input_ids,
        "label_positions": label_positions,
        "teacher_positions": label_positions + prefix,
        "topk_ids": topk_ids,
        "topk_logprobs": np.take_along_axis(logprobs, topk_ids, axis=1).astype(np.float32),
        "label_logprobs": logprobs[np.arange(num_pairs), input_ids[label_positions]].astype(np.float32),
    }
    if with_relations:
        scores = rng.normal(size=(3, NUM_RELATION_HEADS, num_pairs, num_pairs))
        sample["relations"] = np.exp(_log_softmax(scores)).astype(np.float32)
    return sample


def make_parts(seed: int, part_sizes: list[int], **sample_kwargs: Any) -> list[list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    return [
        [make_sample(rng, f"p{part}-s{index}", **sample_kwargs) for index in range(size)]
        for part, size in enumerate(part_sizes)
    ]


def write_cache(path: Path, parts: list[list[dict[str, Any]]], **writer_kwargs: Any) -> CacheWriter:
    """Write and finalize a cache holding `parts` (one list of samples per part)."""
    writer_kwargs.setdefault("top_k", TOP_K)
    writer_kwargs.setdefault("vocab_size", VOCAB_SIZE)
    meta = writer_kwargs.pop("meta", None) or make_meta(top_k=writer_kwargs["top_k"])
    writer = CacheWriter(path, meta, len(parts), **writer_kwargs)
    with writer:
        for part_id in writer.pending_parts():
            write_part(path, part_id, parts[part_id])
        writer.finalize()
    return writer


def reseal_digests(path, part_id: int = 0) -> None:
    """Record part ``part_id``'s current file digests as if the writer had written its present bytes.

    Tests that plant invalid values (a buggy writer, not disk damage) use this so the per-file integrity
    check passes and value validation is what catches the fault; the whole-part checksum is left as it was.
    """
    commit = {**read_part_commit(path, part_id), DIGESTS_KEY: part_file_digests(path / part_path(part_id))}
    zarr.open_group(store=str(path / part_path(part_id)), mode="r+", zarr_format=3).attrs.update(
        {PART_COMMIT_ATTR: commit})
    root = zarr.open_group(store=str(path), mode="r+", zarr_format=3)
    index = dict(root.attrs["index"])
    index["parts"] = [commit if i == part_id else entry for i, entry in enumerate(index["parts"])]
    root.attrs.update({"index": index})
