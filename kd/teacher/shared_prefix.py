"""Finding requests that share a teacher prefix (``data.fewshot_sets``), so a backend computes it once.

Both span backends use it: vLLM orders its prefix-cached work with :func:`prefix_leader_waves`; the hf backend
runs each group's common prefix once and batches the suffixes on its ``past_key_values``
(:func:`shared_prefix_groups`).
"""
from __future__ import annotations

import numpy as np

PREFIX_KEY_TOKENS = 32
"""Prompts whose first 32 tokens agree are taken to share a prefix (a shot set) when ordering the work."""
MIN_SHARED_PREFIX = 64
"""hf: a common prefix shorter than this is not worth a separate forward and a cache copy per batch."""


def prefix_leader_waves(prompts: list[list[int]]) -> list[list[int]]:
    """Prompt indices in two waves: the first prompt of each shared prefix, then all others. vLLM only reads
    prefix blocks already computed, so the followers must be scheduled after their leader has run."""
    seen: set[tuple[int, ...]] = set()
    leaders, followers = [], []
    for index, prompt in enumerate(prompts):
        key = tuple(prompt[:PREFIX_KEY_TOKENS])
        (followers if key in seen else leaders).append(index)
        seen.add(key)
    return [wave for wave in (leaders, followers) if wave]


def _common_prefix_length(first: np.ndarray, other: np.ndarray) -> int:
    length = min(first.size, other.size)
    differs = np.flatnonzero(first[:length] != other[:length])
    return int(differs[0]) if differs.size else length


def shared_prefix_groups(arrays: list[tuple[np.ndarray, np.ndarray]], indices: list[int]) -> list[tuple[list[int], int]]:
    """[(request indices, L)]: groups of >= 2 of ``indices`` whose first L >= MIN_SHARED_PREFIX tokens are equal
    and whose scored rows (tp - 1) all lie at or after L, so the prefix's hidden states are never needed.

    arrays: (ids [Tt], positions [n]) per request; requests in no group are not listed.
    """
    buckets: dict[tuple[int, ...], list[int]] = {}
    for index in indices:
        ids, positions = arrays[index]
        if positions.size and ids.size > PREFIX_KEY_TOKENS:
            buckets.setdefault(tuple(ids[:PREFIX_KEY_TOKENS].tolist()), []).append(index)
    groups = []
    for members in buckets.values():
        if len(members) < 2:
            continue
        first = arrays[members[0]][0]
        length = min(_common_prefix_length(first, arrays[m][0]) for m in members[1:])
        length = min([length] + [int(arrays[m][1].min()) - 1 for m in members])
        if length >= MIN_SHARED_PREFIX:
            groups.append((members, length))
    return groups
