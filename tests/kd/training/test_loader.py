"""CacheStream and friends on small random caches: exact values, order, resume, sharding, prefetch, checks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_schema import CacheFormatError, open_cache, tokenizer_fingerprint
from kd.training.cache_blocks import ORDER_BLOCK, WINDOW_BLOCKS, DecodedBlocks, window_shuffled
from kd.training.loader import Batch, CacheStream, iterate_once, measure_loader
from kd.training.training_data import CacheMismatch, check_student_compatible, split_indices
from tests.cache_schema.sample_factory import NUM_RELATION_HEADS, VOCAB_SIZE, make_meta, make_parts, write_cache

K = 5
PAD = VOCAB_SIZE + 7  # outside the vocabulary, so padding can never be mistaken for a token
PART_SIZES = [13, 11]  # 24 samples in 2 parts
REPO = Path(__file__).resolve().parents[3]


class FakeTokenizer:
    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


TEACHER_TOKENIZER = FakeTokenizer({f"t{i}": i for i in range(VOCAB_SIZE)})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    meta = make_meta(top_k=K)
    meta["fingerprints"]["tokenizer"] = tokenizer_fingerprint(TEACHER_TOKENIZER)
    path = tmp_path_factory.mktemp("student_data") / "cache"
    write_cache(path, make_parts(seed=3, part_sizes=PART_SIZES, top_k=K), top_k=K, meta=meta)
    return open_cache(path)


def take(stream, count: int) -> list[Batch]:
    return [next(stream) for _ in range(count)]


def ids_of(batches: list[Batch]) -> list[list[str]]:
    return [batch.sample_ids for batch in batches]


def assert_batches_equal(left: list[Batch], right: list[Batch]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.sample_ids == b.sample_ids and a.num_tokens == b.num_tokens
        for name in ("input_ids", "attention_mask", "row_index", "label_positions", "label_ids", "topk_ids",
                     "topk_logprobs", "teacher_label_logprobs"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def assert_batch_matches_cache(batch: Batch, cache) -> None:
    """Every row and every distilled position carries exactly the cached values of its sample."""
    position_of = {sample_id: i for i, sample_id in enumerate(cache.sample_ids)}
    samples = [cache[position_of[sample_id]] for sample_id in batch.sample_ids]
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch.input_ids.shape == batch.attention_mask.shape == (len(samples), max(lengths))
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
    assert batch.num_tokens == sum(lengths) == int(batch.attention_mask.sum())
    for row, (sample, length) in enumerate(zip(samples, lengths)):
        assert batch.input_ids[row, :length].tolist() == sample["input_ids"].tolist()
        assert (batch.input_ids[row, length:] == PAD).all() and (batch.attention_mask[row, length:] == 0).all()
        assert (batch.attention_mask[row, :length] == 1).all()
        mine = batch.row_index == row
        positions = batch.label_positions[mine].numpy()
        np.testing.assert_array_equal(positions, sample["label_positions"])
        np.testing.assert_array_equal(batch.label_ids[mine].numpy(), sample["input_ids"][positions])
        np.testing.assert_array_equal(batch.topk_ids[mine].numpy(), sample["topk_ids"])
        np.testing.assert_array_equal(batch.topk_logprobs[mine].numpy(), sample["topk_logprobs"])
        np.testing.assert_array_equal(batch.teacher_label_logprobs[mine].numpy(), sample["label_logprobs"])
    assert torch.equal(batch.label_ids, batch.input_ids[batch.row_index, batch.label_positions])
    assert batch.topk_ids.shape == batch.topk_logprobs.shape == (batch.num_positions, K)
    assert batch.topk_ids.dtype == torch.long and batch.topk_logprobs.dtype == torch.float32
    assert batch.relations is None


def test_an_epoch_carries_every_sample_once_with_its_cached_values(cache):
    with CacheStream(cache, range(len(cache)), batch_size=4, seed=0, pad_id=PAD) as stream:
        assert stream.batches_per_epoch() == 6
        epoch = take(stream, 6)
        assert stream.state_dict()["epoch"] == 1 and stream.state_dict()["batches_in_epoch"] == 0
    for batch in epoch:
        assert batch.batch_size == 4
        assert_batch_matches_cache(batch, cache)
    assert sorted(sum(ids_of(epoch), [])) == sorted(cache.sample_ids)


def test_order_is_seeded_and_reshuffled_every_epoch(cache):
    def first_epochs(seed: int) -> list[list[str]]:
        with CacheStream(cache, range(len(cache)), batch_size=6, seed=seed, pad_id=PAD) as stream:
            return ids_of(take(stream, 8))  # 4 batches per epoch: two epochs

    again, other = first_epochs(5), first_epochs(6)
    assert first_epochs(5) == again
    assert other != again
    epoch0, epoch1 = sum(again[:4], []), sum(again[4:], [])
    assert sorted(epoch0) == sorted(epoch1) == sorted(cache.sample_ids) and epoch0 != epoch1


def test_unshuffled_stream_follows_the_given_indices(cache):
    indices = [20, 3, 4, 5, 11, 0, 7, 8]
    with CacheStream(cache, indices, batch_size=3, seed=0, shuffle=False, pad_id=PAD) as stream:
        got = sum(ids_of(take(stream, 4)), [])  # 2 batches per epoch (the last 2 indices are dropped)
    expected = [cache.sample_ids[i] for i in indices[:6]]
    assert got == expected + expected


@pytest.mark.parametrize("first, then", [(7, 5), (3, 5), (5, 1)])  # (3, 5) and (5, 1) cross epoch boundaries
def test_resume_yields_exactly_the_next_batches(cache, first, then):
    stream = CacheStream(cache, range(len(cache)), batch_size=4, seed=11, pad_id=PAD, prefetch=3)
    take(stream, first)
    state = stream.state_dict()
    assert (state["epoch"], state["batches_in_epoch"]) == divmod(first, 6)  # the consumer's count, not read-ahead
    expected = take(stream, then)
    stream.close()
    resumed = CacheStream(cache, range(len(cache)), batch_size=4, seed=11, pad_id=PAD, prefetch=3)
    resumed.load_state_dict(state)
    assert_batches_equal(take(resumed, then), expected)
    resumed.close()


def test_resume_refuses_another_seed_or_global_batch(cache):
    with CacheStream(cache, range(len(cache)), batch_size=4, seed=1, pad_id=PAD) as stream:
        state = stream.state_dict()
    for other in (dict(batch_size=4, seed=2), dict(batch_size=3, seed=1)):
        with pytest.raises(ValueError, match="cannot resume"):
            CacheStream(cache, range(len(cache)), pad_id=PAD, **other).load_state_dict(state)


def test_two_ranks_split_each_single_process_global_batch(cache):
    indices = list(range(22))  # 22 % 6 != 0: the uneven tail must be dropped on both ranks alike
    single = CacheStream(cache, indices, batch_size=6, seed=4, pad_id=PAD)
    ranks = [CacheStream(cache, indices, batch_size=3, seed=4, rank=r, world_size=2, pad_id=PAD) for r in (0, 1)]
    assert single.batches_per_epoch() == ranks[0].batches_per_epoch() == ranks[1].batches_per_epoch() == 3
    for _ in range(7):  # crosses two epoch boundaries
        whole, part0, part1 = next(single), next(ranks[0]), next(ranks[1])
        assert not set(part0.sample_ids) & set(part1.sample_ids)
        assert part0.sample_ids + part1.sample_ids == whole.sample_ids
    # A 1-process checkpoint resumes a 2-process run with the same global batch.
    state = single.state_dict()
    for stream in ranks:
        stream.load_state_dict(state)
    whole, part0, part1 = next(single), next(ranks[0]), next(ranks[1])
    assert part0.sample_ids + part1.sample_ids == whole.sample_ids
    for stream in (single, *ranks):
        stream.close()


def test_prefetch_on_and_off_give_identical_batches(cache):
    streams = [CacheStream(cache, range(len(cache)), batch_size=5, seed=9, pad_id=PAD, prefetch=depth,
                           read_threads=threads) for depth, threads in ((0, 1), (1, 1), (4, 3))]
    batches = [take(stream, 9) for stream in streams]
    assert_batches_equal(batches[0], batches[1])
    assert_batches_equal(batches[0], batches[2])
    for stream in streams:
        stream.close()


class FailingCache:
    """Delegates to a real cache but fails reading sample `bad`, like a corrupt chunk would."""

    def __init__(self, cache, bad: int) -> None:
        self.inner, self.bad = cache, bad
        self.top_k, self.parts = cache.top_k, cache.parts

    def __len__(self) -> int:
        return len(self.inner)

    def read_range(self, start: int, stop: int, skip=()):
        if start <= self.bad < stop:
            raise CacheFormatError(f"sample {self.bad}: chunk is corrupt")
        return self.inner.read_range(start, stop, skip=skip)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_read_error_reaches_the_consumer(cache, prefetch):
    # The 24 samples are one block of the reader (ORDER_BLOCK = 64): the first batch reads it and fails.
    assert len(cache) <= ORDER_BLOCK
    stream = CacheStream(FailingCache(cache, bad=17), range(len(cache)), batch_size=4, seed=0, shuffle=False,
                         pad_id=PAD, prefetch=prefetch)
    with pytest.raises(CacheFormatError, match="sample 17: chunk is corrupt"):
        next(stream)
    assert stream.state_dict()["batches_in_epoch"] == 0  # the failed batch was not counted as taken
    assert stream._prefetcher is None  # the thread was stopped
    with pytest.raises(CacheFormatError):  # a retry reads the same batch again
        next(stream)


def test_close_stops_the_thread_and_the_stream_restarts(cache):
    stream = CacheStream(cache, range(len(cache)), batch_size=4, seed=0, pad_id=PAD, prefetch=2)
    first = take(stream, 2)
    thread = stream._prefetcher._thread
    stream.close()
    assert not thread.is_alive()
    reference = CacheStream(cache, range(len(cache)), batch_size=4, seed=0, pad_id=PAD, prefetch=0)
    assert_batches_equal(first + take(stream, 2), take(reference, 4))
    stream.close()


def test_an_unclosed_stream_does_not_hang_interpreter_exit(cache):
    script = textwrap.dedent(f"""
        import time
        from cache_schema import open_cache
        from kd.training.loader import CacheStream
        stream = CacheStream(open_cache({str(cache.path)!r}), range(24), batch_size=2, seed=0, pad_id=0, prefetch=2,
                             read_threads=1)
        print(next(stream).batch_size)
        while not stream._prefetcher._queue.full():  # the thread is now blocked handing over a batch
            time.sleep(0.01)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"


def test_token_budget_shrinks_batches_and_ranks_agree(cache):
    lengths = {sample_id: len(cache[i]["input_ids"]) for i, sample_id in enumerate(cache.sample_ids)}
    budget = 70  # sample lengths are 2..39, so 4 rows often do not fit
    ranks = [CacheStream(cache, range(len(cache)), batch_size=4, seed=2, rank=r, world_size=2, pad_id=PAD,
                         max_tokens_per_batch=budget) for r in (0, 1)]
    assert ranks[0].batches_per_epoch() == ranks[1].batches_per_epoch() > 24 // 8
    seen: list[str] = []
    for _ in range(ranks[0].batches_per_epoch()):
        pair = [next(stream) for stream in ranks]
        assert pair[0].batch_size == pair[1].batch_size
        for batch in pair:
            assert batch.input_ids.numel() <= budget or batch.batch_size == 1
            assert batch.input_ids.shape[1] == max(lengths[s] for s in batch.sample_ids)
            seen += batch.sample_ids
    assert len(seen) == len(set(seen)) and len(seen) > 24 - 8  # only a tail shorter than 8 is dropped
    for stream in ranks:
        stream.close()


def test_relations_are_passed_per_row(tmp_path):
    parts = make_parts(seed=8, part_sizes=[3, 2], top_k=4, with_relations=True)
    write_cache(tmp_path / "cache", parts, top_k=4, relations={"layer": 1, "num_relation_heads": NUM_RELATION_HEADS},
                relations_dtype="float32")
    rel_cache = open_cache(tmp_path / "cache")
    batch = next(iterate_once(rel_cache, [4, 0, 2], batch_size=3, pad_id=PAD))
    assert batch.sample_ids == [rel_cache.sample_ids[i] for i in (4, 0, 2)]
    assert batch.topk_ids.shape[1] == 4
    for row, index in enumerate((4, 0, 2)):
        expected = rel_cache[index]["relations"]
        assert batch.relations[row].shape == (3, NUM_RELATION_HEADS, len(expected[0, 0]), len(expected[0, 0]))
        np.testing.assert_array_equal(batch.relations[row].numpy(), expected)


def test_iterate_once_visits_all_in_order_with_a_short_tail(cache):
    batches = list(iterate_once(cache, range(len(cache)), batch_size=5, pad_id=PAD))
    assert [b.batch_size for b in batches] == [5, 5, 5, 5, 4]
    assert sum(ids_of(batches), []) == cache.sample_ids
    for batch in batches:
        assert_batch_matches_cache(batch, cache)
    scattered = [23, 1, 2, 3, 12, 12]
    assert sum(ids_of(iterate_once(cache, scattered, 4, PAD)), []) == [cache.sample_ids[i] for i in scattered]


def test_drop_last_false_keeps_the_short_batch_on_one_rank(cache):
    with CacheStream(cache, range(10), batch_size=4, seed=0, drop_last=False, pad_id=PAD) as stream:
        assert [b.batch_size for b in take(stream, 6)] == [4, 4, 2, 4, 4, 2]
    with pytest.raises(ValueError, match="world_size=1"):
        CacheStream(cache, range(10), batch_size=4, seed=0, drop_last=False, world_size=2, pad_id=PAD)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        CacheStream(cache, range(10), batch_size=3, seed=0, world_size=4, pad_id=PAD)


def test_split_indices_is_a_seeded_disjoint_partition():
    train, validation = split_indices(50, 8, seed=1)
    assert len(validation) == 8 and len(train) == 42
    assert sorted(np.concatenate([train, validation]).tolist()) == list(range(50))
    assert train.tolist() == sorted(train.tolist())
    again_train, again_validation = split_indices(50, 8, seed=1)
    assert np.array_equal(again_validation, validation) and np.array_equal(again_train, train)
    assert not np.array_equal(split_indices(50, 8, seed=2)[1], validation)
    assert split_indices(50, 0, seed=1)[1].size == 0
    with pytest.raises(ValueError, match="num_validation"):
        split_indices(5, 5, seed=1)


def test_student_compatibility_check(cache):
    same = tokenizer_fingerprint(TEACHER_TOKENIZER)
    check_student_compatible(cache, same, VOCAB_SIZE)
    check_student_compatible(cache, same, VOCAB_SIZE + 128)  # padded embedding rows are fine
    other = tokenizer_fingerprint(FakeTokenizer({f"u{i}": i for i in range(VOCAB_SIZE)}))
    with pytest.raises(CacheMismatch, match=f"made with tokenizer {same}, student.model has {other}") as refused:
        check_student_compatible(cache, other, VOCAB_SIZE)
    assert isinstance(refused.value, ValueError) and "\n" not in str(refused.value)
    needed = cache.meta["index"]["max_token_id"] + 1
    assert needed == max(max(s["input_ids"].max(), s["topk_ids"].max()) for s in cache) + 1
    # A student padded differently from the teacher (fewer rows than the teacher's vocab_size) is fine as long
    # as every cached id fits (Qwen2.5 7B teacher, 152064 rows → 3B student, 151936 rows).
    check_student_compatible(cache, same, needed)
    with pytest.raises(CacheMismatch, match=f"ids up to {needed - 1} but the student's embedding has only "
                                            f"{needed - 1} rows"):
        check_student_compatible(cache, same, needed - 1)


def test_measure_loader_counts_what_it_took(cache):
    with CacheStream(cache, range(len(cache)), batch_size=4, seed=0, pad_id=PAD) as stream:
        rates = measure_loader(stream, 5)
        assert stream.state_dict()["batches_in_epoch"] == 0 and stream.state_dict()["epoch"] == 1  # 1 + 5 taken
    assert set(rates) == {"batches_per_s", "samples_per_s", "tokens_per_s"}
    assert rates["samples_per_s"] == pytest.approx(4 * rates["batches_per_s"])
    assert rates["tokens_per_s"] > rates["samples_per_s"] > 0


def test_batch_to_moves_every_tensor(cache):
    batch = next(iterate_once(cache, [0, 1], batch_size=2, pad_id=PAD))
    moved = batch.to("meta")
    assert moved.input_ids.device.type == moved.topk_logprobs.device.type == "meta"
    assert moved.sample_ids == batch.sample_ids and batch.input_ids.device.type == "cpu"


def test_window_shuffle_is_a_seeded_permutation_that_stays_within_windows():
    indices = np.arange(3, 5000, dtype=np.int64)  # blocks 0..78, the first and last partial
    order = window_shuffled(indices, np.random.default_rng([0, 1]))
    np.testing.assert_array_equal(np.sort(order), indices)  # every sample once
    np.testing.assert_array_equal(order, window_shuffled(indices, np.random.default_rng([0, 1])))
    assert not np.array_equal(order, window_shuffled(indices, np.random.default_rng([0, 2])))
    window_size = ORDER_BLOCK * WINDOW_BLOCKS
    for start in range(0, order.size - window_size, window_size // 2):
        # any stretch of a window's length touches at most two windows' blocks
        assert np.unique(order[start:start + window_size] // ORDER_BLOCK).size <= 2 * WINDOW_BLOCKS
    # samples of a block are spread over its window, not kept together
    first_window = order[: window_size]
    assert np.abs(np.diff(first_window)).mean() > ORDER_BLOCK


def test_decoded_blocks_return_what_the_cache_holds_without_the_teacher_side(tmp_path):
    path = tmp_path / "c"
    write_cache(path, make_parts(seed=8, part_sizes=[70, 90], top_k=K), top_k=K, meta=make_meta(top_k=K))
    cache = open_cache(path)
    blocks = DecodedBlocks(cache, capacity=1)  # evicts constantly: correctness does not depend on hits
    wanted = np.random.default_rng(0).permutation(len(cache))[:50]
    for got, index in zip(blocks.samples(wanted), wanted, strict=True):
        want = cache[int(index)]
        assert set(want) - set(got) == {"teacher_input_ids", "teacher_positions"}
        for key in got:
            if key != "sample_id":
                np.testing.assert_array_equal(got[key], want[key])
        assert got["sample_id"] == want["sample_id"]
    with pytest.raises(ValueError, match="can be skipped"):
        cache.read_range(0, 1, skip=("topk_ids",))
