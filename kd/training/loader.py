"""Stage two's input: batches of cached teacher targets streamed from a kd-topk-cache (no tokenizer, no teacher).

:class:`CacheStream` is an endless, deterministic, resumable, rank-sharded stream of :class:`Batch` objects read
by a background thread; :func:`iterate_once` walks held-out samples once for validation. Which samples train
and which are held out, and whether a cache fits a student, is :mod:`kd.training.training_data`'s.

Order. Epoch ``e`` visits ``indices`` in the block-window shuffle drawn by ``numpy.random.default_rng([seed, e])``
(:func:`kd.training.cache_blocks.window_shuffled`: blocks of 64 consecutive samples permuted, samples permuted
within windows of 16 blocks, so each decoded block serves a whole window; or in the given order when
``shuffle=False``) cut into *global* batches of ``batch_size * world_size`` samples; rank
``r`` reads the ``r``-th ``batch_size`` slice of each. So a 2-rank run and a 1-rank run with twice the batch size
see the same samples per step, every rank gets the same number of batches per epoch (no DDP hang), and the
uneven tail of an epoch is dropped (``drop_last``). With ``max_tokens_per_batch`` the per-rank batch shrinks
below ``batch_size`` where ``rows × longest row`` would exceed the budget (decided per global batch, so all
ranks still agree); a single row longer than the budget still forms a batch of one — never truncated.

Source reweighting. With ``sample_weights`` (from :func:`source_sample_weights`: ``train.source_weights``
per source, 1 for unlisted sources) an epoch is ``len(indices)`` draws *with replacement*, sample i drawn with
probability ∝ its source's weight, from ``default_rng([seed, e])``: a source of weight 2 is seen twice as often
as cached, weight 0 never — the mixture is re-balanced at train time without re-caching (the same design as
sampling-probability blends in Megatron / ``datasets.interleave_datasets``; loss weights would instead keep the
cached proportions and rescale gradients, which makes the effective learning rate depend on the batch's mix).

Alignment (cache_schema README): ``label_positions`` p index ``input_ids``; the teacher's distribution at p
predicts token ``input_ids[p]``, so the student's logits for it sit at ``p - 1``.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from queue import Empty, Full, Queue
from typing import Any

import numpy as np
import torch

from kd.training.cache_blocks import STAGE_TWO_SKIPS, DecodedBlocks, window_shuffled

_POLL_S = 0.1  # how often a blocked queue put/get re-checks for shutdown
_PLANS_KEPT = 3  # epoch plans cached per schedule: the consumer's epoch and the prefetcher's next one


@dataclass
class Batch:
    """One batch of student inputs and flattened teacher targets. B rows, T padded length, N distilled positions.

    input_ids [B, T] long (right-padded with pad_id); attention_mask [B, T] long (1 = real token);
    row_index [N] long: batch row of each distilled position; label_positions [N] long: p in that row (the
    student predicts it from position p - 1); label_ids [N] long = input_ids[row_index, label_positions];
    topk_ids [N, K] long; topk_logprobs [N, K] float32; teacher_label_logprobs [N] float32 (teacher's logprob
    of label_ids); relations: per row [3, A_r, n_i, n_i] float32, or None when the cache has none;
    teacher_log_normalizers [N, M] float32: log Σ_V p^(1/τ_m) per position for the cache's M temperatures other
    than 1 (``cache.tempered_temperatures``), or None when it has none; sampled_ids / sampled_counts [N, S] long:
    the cache's sampled targets (unique drawn ids, their counts, count-0 padding), or None when it has none.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    row_index: torch.Tensor
    label_positions: torch.Tensor
    label_ids: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    teacher_label_logprobs: torch.Tensor
    sample_ids: list[str]
    num_tokens: int
    relations: list[torch.Tensor] | None = None
    teacher_log_normalizers: torch.Tensor | None = None
    sampled_ids: torch.Tensor | None = None
    sampled_counts: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_positions(self) -> int:
        return int(self.row_index.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on `device` (sample_ids and num_tokens unchanged)."""
        moved: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                moved[item.name] = value.to(device, non_blocking=non_blocking)
        if self.relations is not None:
            moved["relations"] = [r.to(device, non_blocking=non_blocking) for r in self.relations]
        return replace(self, **moved)


# ---------------------------------------------------------------------------------------------------- reading


def read_cache_samples(cache: Any, indices: Sequence[int], pool: Executor | None = None) -> list[dict[str, Any]]:
    """cache[i] (without the teacher's side) for each i in `indices`, in that order, reading each run of
    consecutive indices in one go.

    Runs matter for in-order validation passes: one read_range slices every flat array once per run instead
    of once per sample. With `pool`, runs are read concurrently (zarr decodes outside the GIL in part).
    """
    wanted = np.asarray(indices, dtype=np.int64)
    if wanted.size == 0:
        return []
    order = np.argsort(wanted, kind="stable")
    ascending = wanted[order]
    breaks = np.flatnonzero(np.diff(ascending) != 1) + 1  # a duplicate (diff 0) also starts a new run
    samples: list[dict[str, Any] | None] = [None] * wanted.size
    taken = 0
    runs = np.split(ascending, breaks)

    def read(run: np.ndarray) -> list[dict[str, Any]]:
        return cache.read_range(int(run[0]), int(run[-1]) + 1, skip=STAGE_TWO_SKIPS)

    for block in (pool.map(read, runs) if pool is not None and len(runs) > 1 else map(read, runs)):
        for sample in block:
            samples[int(order[taken])] = sample
            taken += 1
    return samples  # type: ignore[return-value]


def collate(samples: Sequence[dict[str, Any]], pad_id: int, top_k: int) -> Batch:
    """Right-pad `samples` (cache sample dicts) to their longest sequence and flatten their targets."""
    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)  # [B]
    counts = np.array([len(s["label_positions"]) for s in samples], dtype=np.int64)  # [B] n_i
    width = int(lengths.max()) if len(samples) else 0
    input_ids = np.full((len(samples), width), pad_id, dtype=np.int64)  # [B, T]
    attention_mask = np.zeros((len(samples), width), dtype=np.int64)  # [B, T]
    for row, sample in enumerate(samples):
        input_ids[row, :lengths[row]] = sample["input_ids"]
        attention_mask[row, :lengths[row]] = 1
    row_index = np.repeat(np.arange(len(samples), dtype=np.int64), counts)  # [N]
    label_positions = _concat([s["label_positions"] for s in samples], np.int64, ())  # [N]
    relations = None
    if samples and all("relations" in s for s in samples):
        relations = [torch.from_numpy(np.ascontiguousarray(s["relations"], dtype=np.float32)) for s in samples]
    normalizers = None
    if samples and all("log_normalizers" in s for s in samples):
        width = samples[0]["log_normalizers"].shape[1]
        normalizers = torch.from_numpy(_concat([s["log_normalizers"] for s in samples], np.float32, (width,)))
    sampled = {}
    if samples and all("sampled_ids" in s for s in samples):
        draws = samples[0]["sampled_ids"].shape[1]
        sampled = {key: torch.from_numpy(_concat([s[key] for s in samples], np.int64, (draws,)))
                   for key in ("sampled_ids", "sampled_counts")}
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        row_index=torch.from_numpy(row_index),
        label_positions=torch.from_numpy(label_positions),
        label_ids=torch.from_numpy(input_ids[row_index, label_positions]),
        topk_ids=torch.from_numpy(_concat([s["topk_ids"] for s in samples], np.int64, (top_k,))),
        topk_logprobs=torch.from_numpy(_concat([s["topk_logprobs"] for s in samples], np.float32, (top_k,))),
        teacher_label_logprobs=torch.from_numpy(_concat([s["label_logprobs"] for s in samples], np.float32, ())),
        sample_ids=[str(s["sample_id"]) for s in samples],
        num_tokens=int(lengths.sum()),
        relations=relations,
        teacher_log_normalizers=normalizers,
        **sampled,
    )


def _concat(arrays: Sequence[np.ndarray], dtype: Any, tail: tuple[int, ...]) -> np.ndarray:
    if not arrays or 0 in tail:  # [n, 0] top-K rows of a sampled-only cache cannot reshape to (-1, 0)
        return np.zeros((sum(len(a) for a in arrays), *tail), dtype=dtype)
    return np.concatenate([np.asarray(a, dtype=dtype).reshape((-1, *tail)) for a in arrays])


def load_batch(cache: Any, indices: Sequence[int], pad_id: int, pool: Executor | None = None,
               blocks: DecodedBlocks | None = None) -> Batch:
    """Read and collate the cache samples at `indices` (in that order), through `blocks` when given (orders
    that stay within a few blocks at a time: the window shuffle, in-order passes)."""
    samples = blocks.samples(indices, pool) if blocks is not None else read_cache_samples(cache, indices, pool)
    return collate(samples, pad_id, int(cache.top_k))


def sample_lengths(cache: Any) -> np.ndarray:
    """[S] student sequence length of every cache sample, from the offsets the reader keeps in memory."""
    return np.concatenate([np.diff(part.offsets.tokens) for part in cache.parts] or [np.zeros(0, np.int64)])


# ---------------------------------------------------------------------------------------------------- order


class BatchSchedule:
    """Which cache indices rank `rank` reads as batch `j` of epoch `e`: a pure function of the arguments.

    An epoch's plan is its sample order [M] and the boundaries [G+1] of its global batches in that order;
    rank r reads the r-th of `world_size` equal slices of each global batch.
    """

    def __init__(
        self, indices: Sequence[int], *, batch_size: int, seed: int, shuffle: bool, rank: int, world_size: int,
        drop_last: bool, max_tokens_per_batch: int | None, lengths: np.ndarray | None,
        sample_weights: np.ndarray | None = None,
    ) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        # [M] drawing probability of each index (None: a permutation per epoch).
        self.probabilities = None if sample_weights is None else np.asarray(sample_weights, np.float64) / float(
            np.sum(sample_weights))
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.max_tokens_per_batch = max_tokens_per_batch
        self.lengths = lengths
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()  # the consumer and the prefetch thread both ask for plans

    def order(self, epoch: int) -> np.ndarray:
        """[M] the epoch's visiting order of `indices`."""
        if self.probabilities is not None:
            rng = np.random.default_rng([self.seed, epoch])
            return self.indices[rng.choice(self.indices.size, size=self.indices.size, p=self.probabilities)]
        if not self.shuffle:
            return self.indices
        return window_shuffled(self.indices, np.random.default_rng([self.seed, epoch]))

    def block_local(self) -> bool:
        """True when an epoch's order stays within a window of blocks (no weighted draws with replacement)."""
        return self.probabilities is None

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order [M], global batch boundaries [G+1]) of `epoch`, cached for the last few epochs."""
        with self._lock:
            if epoch not in self._plans:
                order = self.order(epoch)
                self._plans[epoch] = (order, self._boundaries(order))
                for old in sorted(self._plans)[:-_PLANS_KEPT]:
                    del self._plans[old]
            return self._plans[epoch]

    def _boundaries(self, order: np.ndarray) -> np.ndarray:
        size = self.indices.size
        full = self.batch_size * self.world_size
        if self.max_tokens_per_batch is None:
            stop = size - size % full if self.drop_last else size
            return np.append(np.arange(0, stop, full), stop)
        assert self.lengths is not None
        bounds, start = [0], 0
        while size - start >= (full if self.drop_last else self.world_size):
            rows = min(self.batch_size, (size - start) // self.world_size)
            # Shrink the per-rank batch until the widest rank fits; all ranks compute the same `rows`.
            while rows > 1 and rows * int(self.lengths[order[start:start + rows * self.world_size]].max()) \
                    > self.max_tokens_per_batch:
                rows -= 1
            start += rows * self.world_size
            bounds.append(start)
        return np.asarray(bounds, dtype=np.int64)

    def num_batches(self, epoch: int) -> int:
        return len(self.plan(epoch)[1]) - 1

    def rank_batch(self, epoch: int, batch: int) -> np.ndarray:
        """[b] cache indices this rank reads as batch `batch` of `epoch`."""
        order, bounds = self.plan(epoch)
        start, stop = int(bounds[batch]), int(bounds[batch + 1])
        rows = (stop - start) // self.world_size
        return order[start + self.rank * rows:start + (self.rank + 1) * rows]

    def following(self, epoch: int, batch: int) -> tuple[int, int]:
        """The position after (epoch, batch); epochs roll over forever."""
        batch += 1
        return (epoch + 1, 0) if batch >= self.num_batches(epoch) else (epoch, batch)


# ---------------------------------------------------------------------------------------------------- prefetch


class _Failure:
    """An exception raised in the prefetch thread, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _put(queue: Queue, item: Any, stop: threading.Event) -> bool:
    """Block until `item` is queued or `stop` is set (returns False then)."""
    while not stop.is_set():
        try:
            queue.put(item, timeout=_POLL_S)
            return True
        except Full:
            continue
    return False


def _produce(cache: Any, schedule: BatchSchedule, pad_id: int, start: tuple[int, int], queue: Queue,
             stop: threading.Event, read_threads: int) -> None:
    """Thread body: read and collate batches from `start` on until stopped; the first error ends it.

    Holds no reference to the CacheStream, so an abandoned stream can be garbage-collected (which stops us).
    """
    epoch, batch = start
    pool = ThreadPoolExecutor(read_threads, thread_name_prefix="kd-cache-read") if read_threads > 1 else None
    blocks = DecodedBlocks(cache) if schedule.block_local() else None
    try:
        while not stop.is_set():
            loaded = load_batch(cache, schedule.rank_batch(epoch, batch), pad_id, pool, blocks)
            if not _put(queue, (epoch, batch, loaded), stop):
                return
            epoch, batch = schedule.following(epoch, batch)
    except BaseException as error:  # noqa: BLE001 - every failure must reach the consumer, not die silently
        _put(queue, _Failure(error), stop)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class _Prefetcher:
    """A daemon thread keeping up to `depth` collated batches ready, starting at position `start`."""

    def __init__(self, cache: Any, schedule: BatchSchedule, pad_id: int, start: tuple[int, int], depth: int,
                 read_threads: int):
        self._queue: Queue = Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce, args=(cache, schedule, pad_id, start, self._queue, self._stop, read_threads),
            name="kd-cache-prefetch", daemon=True,
        )
        self._thread.start()
        _LIVE_PREFETCHERS.add(self)

    def get(self) -> tuple[int, int, Batch]:
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the cache prefetch thread stopped without a batch or an error") from None
                continue
            if isinstance(item, _Failure):
                raise item.error
            return item

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        while True:  # drain so a producer blocked on a full queue notices the stop at once
            try:
                self._queue.get_nowait()
            except Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


_LIVE_PREFETCHERS: "weakref.WeakSet[_Prefetcher]" = weakref.WeakSet()


@atexit.register
def _close_all_prefetchers() -> None:
    # Registered after zarr's own exit hook (imported above), so it runs first: our threads stop before the
    # store's event loop goes away and none is left mid-read at interpreter exit.
    for prefetcher in list(_LIVE_PREFETCHERS):
        prefetcher.close(timeout=1.0)


# ---------------------------------------------------------------------------------------------------- stream


_PLAN_KEYS = ("seed", "shuffle", "global_batch_size", "num_indices", "indices_crc32", "drop_last",
              "max_tokens_per_batch", "sample_weights_crc32")


class CacheStream:
    """Endless, deterministic, resumable stream of this rank's batches; see the module docstring for the order.

    Drive it with `next(stream)` (or a for loop) and stop by step count. `state_dict()` describes the batches
    the consumer has taken (never what the prefetch thread has read ahead); `load_state_dict` resumes with
    exactly the next one. `prefetch=0` reads synchronously in the caller's thread; otherwise a daemon thread
    keeps `prefetch` batches ready, reading each batch's samples with `read_threads` threads (zarr's per-read
    overhead dominates a sample read: 2 threads measured ~1.7x faster than 1 on a 2-core box). Call `close()` (or use it
    as a context manager) to stop the prefetch thread; it is a daemon, so a forgotten stream never blocks exit.
    """

    def __init__(
        self, cache: Any, indices: Sequence[int], *, batch_size: int, seed: int, shuffle: bool = True,
        rank: int = 0, world_size: int = 1, pad_id: int, drop_last: bool = True, prefetch: int = 2,
        max_tokens_per_batch: int | None = None, read_threads: int = 2, sample_weights: np.ndarray | None = None,
    ) -> None:
        _check_stream_args(len(indices), batch_size, rank, world_size, drop_last, prefetch, max_tokens_per_batch)
        if read_threads < 1:
            raise ValueError(f"read_threads must be >= 1, got {read_threads}")
        self.cache = cache
        self.pad_id = int(pad_id)
        self.prefetch = int(prefetch)
        self.read_threads = int(read_threads)
        self.schedule = BatchSchedule(
            indices, batch_size=batch_size, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size,
            drop_last=drop_last, max_tokens_per_batch=max_tokens_per_batch,
            lengths=sample_lengths(cache) if max_tokens_per_batch is not None else None,
            sample_weights=sample_weights,
        )
        self._position = (0, 0)  # (epoch, batches taken in it) of the next batch the consumer gets
        self._prefetcher: _Prefetcher | None = None
        self._blocks = DecodedBlocks(cache) if self.schedule.block_local() else None  # prefetch=0 reads

    @property
    def epoch(self) -> int:
        return self._position[0]

    @property
    def batches_in_epoch(self) -> int:
        return self._position[1]

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches each rank gets in `epoch` (default: the current one); constant unless max_tokens_per_batch."""
        return self.schedule.num_batches(self.epoch if epoch is None else epoch)

    def __iter__(self) -> "CacheStream":
        return self

    def __next__(self) -> Batch:
        epoch, batch = self._position
        if self.prefetch == 0:
            loaded = load_batch(self.cache, self.schedule.rank_batch(epoch, batch), self.pad_id, blocks=self._blocks)
        else:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(
                    self.cache, self.schedule, self.pad_id, self._position, self.prefetch, self.read_threads
                )
            try:
                got_epoch, got_batch, loaded = self._prefetcher.get()
            except BaseException:
                self.close()  # a later next() restarts the thread at the same position (a retry)
                raise
            if (got_epoch, got_batch) != (epoch, batch):
                raise RuntimeError(f"prefetch out of step: got batch {(got_epoch, got_batch)}, expected {(epoch, batch)}")
        self._position = self.schedule.following(epoch, batch)
        return loaded

    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch plus what the order depends on (checked by load_state_dict)."""
        schedule = self.schedule
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "seed": schedule.seed,
            "shuffle": schedule.shuffle,
            "batch_size": schedule.batch_size,
            "world_size": schedule.world_size,
            "global_batch_size": schedule.batch_size * schedule.world_size,
            "num_indices": int(schedule.indices.size),
            "indices_crc32": zlib.crc32(schedule.indices.tobytes()),
            "drop_last": schedule.drop_last,
            "max_tokens_per_batch": schedule.max_tokens_per_batch,
            # Absent (None) without reweighting, so checkpoints saved before it existed still resume.
            "sample_weights_crc32": (None if schedule.probabilities is None
                                     else zlib.crc32(schedule.probabilities.tobytes())),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the batch after the last one taken when `state` was saved.

        The world size may change if the global batch size does not (the order is defined on global
        batches), except with max_tokens_per_batch, where the per-rank budget shapes the global batches.
        """
        mine = self.state_dict()
        keys = _PLAN_KEYS + (("world_size",) if mine["max_tokens_per_batch"] is not None else ())
        for key in keys:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"cannot resume the cache stream: saved {key}={state.get(key)!r} but this run has {mine[key]!r} "
                    "(resume with the same data split, seed and global batch size)"
                )
        epoch, batch = int(state["epoch"]), int(state["batches_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.schedule.num_batches(epoch):
            raise ValueError(f"cannot resume the cache stream: no batch {batch} in epoch {epoch}")
        self.close()
        self._position = (epoch, batch)

    def close(self) -> None:
        """Stop the prefetch thread (if any); the stream stays usable and restarts it on the next batch."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __enter__(self) -> "CacheStream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        prefetcher = getattr(self, "_prefetcher", None)
        if prefetcher is not None:
            prefetcher.close(timeout=0.0)


def _check_stream_args(num_indices: int, batch_size: int, rank: int, world_size: int, drop_last: bool,
                       prefetch: int, max_tokens_per_batch: int | None) -> None:
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or prefetch < 0:
        raise ValueError(
            f"need batch_size >= 1, 0 <= rank < world_size and prefetch >= 0; got batch_size={batch_size}, "
            f"rank={rank}, world_size={world_size}, prefetch={prefetch}"
        )
    if max_tokens_per_batch is not None and max_tokens_per_batch < 1:
        raise ValueError(f"max_tokens_per_batch must be >= 1 or None, got {max_tokens_per_batch}")
    if not drop_last and world_size > 1:
        raise ValueError("drop_last=False needs world_size=1: a short last batch cannot be split evenly across ranks")
    needed = batch_size * world_size if drop_last else 1
    if num_indices < needed:
        raise ValueError(
            f"{num_indices} training samples cannot fill one global batch of {batch_size} x {world_size} ranks; "
            "lower the batch size or add data"
        )


# ---------------------------------------------------------------------------------------------------- helpers


def iterate_once(cache: Any, indices: Sequence[int], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Every sample of `indices` once, in order, in batches of `batch_size` (the last may be short)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ordered = np.asarray(indices, dtype=np.int64)
    blocks = DecodedBlocks(cache, capacity=2)  # in order: a block serves every batch it overlaps
    for start in range(0, ordered.size, batch_size):
        yield load_batch(cache, ordered[start:start + batch_size], pad_id, blocks=blocks)


def measure_loader(stream: Iterator[Batch], num_batches: int) -> dict[str, float]:
    """Throughput of taking `num_batches` batches from `stream` (advances it), after one untimed warm-up batch.

    tokens_per_s counts non-pad tokens.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    next(stream)  # thread start-up and the first read are latency, not throughput
    samples = tokens = 0
    started = time.perf_counter()
    for _ in range(num_batches):
        batch = next(stream)
        samples += batch.batch_size
        tokens += batch.num_tokens
    seconds = max(time.perf_counter() - started, 1e-9)
    return {"batches_per_s": num_batches / seconds, "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}
