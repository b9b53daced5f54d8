"""Reading cache samples for stage two at the speed of sequential decoding.

A zarr chunk holds thousands of rows (2,048 top-K rows, 32,768 tokens); reading one sample decodes whole
chunks, so a sample-by-sample random read decodes ~30× more than it returns (measured on the tiny cache: 85
random single-sample reads/s vs 2,250 samples/s iterating in order). Two things fix it without losing the
deterministic order or the exact mid-epoch resume:

- :func:`window_shuffled`: an epoch's order is a pure function of (seed, epoch): the samples are grouped into
  blocks of :data:`ORDER_BLOCK` consecutive cache indices, the blocks are permuted, cut into windows of
  :data:`WINDOW_BLOCKS` blocks, and the samples of each window permuted (mosaicml/streaming's block-shuffle
  idea). Any window holds ~1,000 samples from 16 random places of the cache; a cache of ≤ 1,024 samples is
  fully shuffled.
- :class:`DecodedBlocks`: the reader keeps the last ``capacity`` decoded blocks (a window and the next), so
  each block is read and decoded once per epoch, in one contiguous read per array.

Stage two never reads the teacher's side of a sample (``STAGE_TWO_SKIPS``: the teacher sequence with its worked
examples is often the longest array).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

ORDER_BLOCK = 64
"""Consecutive cache indices per block: about one 2,048-row top-K chunk at ~30 distilled positions a sample."""
WINDOW_BLOCKS = 16
"""Blocks shuffled together: the order mixes 16 × 64 samples at a time."""
STAGE_TWO_SKIPS = ("teacher_input_ids", "teacher_positions")
"""Sample keys stage two does not need (cache_schema's ``SKIPPABLE_KEYS``)."""


def window_shuffled(indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[M] cache indices -> [M] the same indices, blocks permuted, samples permuted within windows of blocks."""
    blocks = indices // ORDER_BLOCK  # [M] block of each index
    unique, block_of = np.unique(blocks, return_inverse=True)
    block_rank = np.empty(unique.size, dtype=np.int64)
    block_rank[rng.permutation(unique.size)] = np.arange(unique.size)  # position of each block in the order
    window = block_rank[block_of] // WINDOW_BLOCKS  # [M] window of each index
    return indices[np.lexsort((rng.random(indices.size), window))]  # by window, random within a window


class DecodedBlocks:
    """The last ``capacity`` decoded blocks of a cache (LRU), each read with one ``read_range``.

    Not thread-safe: one per reading thread (the prefetch thread, or the caller with prefetch off).
    """

    def __init__(self, cache: Any, capacity: int = 2 * WINDOW_BLOCKS + 1) -> None:
        self.cache = cache
        self.capacity = capacity
        self._blocks: OrderedDict[int, list[dict[str, Any]]] = OrderedDict()

    def _read(self, block: int) -> list[dict[str, Any]]:
        start = block * ORDER_BLOCK
        return self.cache.read_range(start, min(start + ORDER_BLOCK, len(self.cache)), skip=STAGE_TWO_SKIPS)

    def samples(self, indices: Sequence[int], pool: Executor | None = None) -> list[dict[str, Any]]:
        """cache[i] (without the teacher's side) for each i, in order; missing blocks read concurrently."""
        wanted = np.asarray(indices, dtype=np.int64)
        missing = [int(b) for b in dict.fromkeys((wanted // ORDER_BLOCK).tolist()) if int(b) not in self._blocks]
        reads = pool.map(self._read, missing) if pool is not None and len(missing) > 1 else map(self._read, missing)
        for block, samples in zip(missing, reads):
            self._blocks[block] = samples
        out = []
        for index in wanted.tolist():
            block = index // ORDER_BLOCK
            self._blocks.move_to_end(block)
            out.append(self._blocks[block][index - block * ORDER_BLOCK])
        while len(self._blocks) > max(self.capacity, len(missing)):
            self._blocks.popitem(last=False)
        return out
