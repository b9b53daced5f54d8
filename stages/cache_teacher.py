"""Stage one recipe: cache the teacher's top-K next-token logprobs over the training samples.

Sections, in the order they run:

1. **setup** — tokenizers (teacher must equal student), samples, shot pool, aligned teacher/student
   sequences, fingerprints, and the decision about an existing cache (nothing to do / resume / refuse).
2. **run** — the samples are cut into shards of ``cache.shard_size``; each shard is scored by one engine and
   written as one cache part. Shards run on dask.distributed (a LocalCluster of ``workers`` processes, or an
   existing scheduler); ``workers=0`` scores in this process (debugging). Each worker loads its engine once.
3. **finish** — the completion record is written last, and a summary is printed.

Resumability lives in the store, not in dask: a part is visible only once its commit record is written, so a
run killed at any moment and started again skips committed parts and redoes the rest. Parts are scored
independently and deterministically (batches never cross a part), so two workers write the same cache as one.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors import SafetensorError

from cache_schema import (
    FORMAT_VERSION,
    CacheMismatchError,
    CacheWriter,
    cache_stats,
    check_overwritable,
    encoding_meta,
    identity_differences,
    json_fingerprint,
    open_cache,
    peek_cache_state,
    targets_meta,
    tokenizer_fingerprint,
    write_part,
)
from kd.config import Config, TeacherConfig, config_to_dict
from kd.data.sequences import AlignedSample
from kd.data.training_set import build_training_set, training_set_fingerprints
from kd.errors import DataError, TeacherConfigError, TeacherServerError, UserError
from kd.teacher.factory import load_backend, requested_temperatures, resolve_scoring
from kd.teacher.server_backend import describe_servers, server_identity, server_length_limit
from kd.teacher.types import SamplingSpec, ScoreRequest, check_top_k_fits
from kd.tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------------------------- setup


@dataclass
class StageOnePlan:
    """Everything stage one decided before scoring anything."""

    cfg: Config
    shards: list[list[AlignedSample]]
    meta: dict[str, Any]
    vocab_size: int
    skipped: list[str] = field(default_factory=list)
    trimmed: int = 0
    state: str = "absent"
    """What was at cache.path before: absent, incomplete (resume) or complete (nothing to do)."""
    notes: list[str] = field(default_factory=list)
    """What stage one decided about the data (detected format, mixture draw), printed before scoring."""

    @property
    def sampling(self) -> SamplingSpec | None:
        """What each scored position draws for sampled targets (cache.targets: sampled | both), else None."""
        targets = self.meta["targets"]
        if targets["mode"] == "topk":
            return None
        return SamplingSpec(targets["samples_per_position"], targets["temperature"], self.cfg.seed,
                            keep_topk=targets["mode"] == "both")

    @property
    def tempered(self) -> tuple[float, ...]:
        """The cache's temperatures other than 1: each sample stores the teacher's log-normalizer at each."""
        return tuple(t for t in self.meta["temperatures"] if t != 1.0)


def _model_config(model: str) -> dict:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model).to_dict()
    except (OSError, ValueError) as exc:
        raise UserError(f"teacher.model={model!r}: cannot load its config ({str(exc).splitlines()[0]})") from None


def _teacher_length_limit(cfg: Config, model_config: dict, served: dict | None) -> int | None:
    limits = [cfg.data.max_teacher_len, cfg.teacher.max_model_len, model_config.get("max_position_embeddings"),
              server_length_limit(served or {})]
    limits = [int(x) for x in limits if x]
    return min(limits) if limits else None


def _teacher_fingerprint(teacher: TeacherConfig, model_config: dict, served: dict | None) -> str:
    """What makes two teachers score alike: the model and its config, the engine, dtype and relation settings
    (and for servers, the served model name and vLLM version)."""
    identity = {"model": teacher.model, "config": model_config, "backend": teacher.backend,
                "dtype": teacher.dtype, "relations": config_to_dict(teacher)["attention"]}
    return json_fingerprint(identity | ({"server": served} if served else {}))


def _served_identity(cfg: Config, tokenizer) -> dict | None:
    """``teacher.backend=server``: what the servers serve (asked before anything is read or scored), else None.

    With every server down, a complete server-made cache at cache.path still answers "nothing to do": its
    recorded identity stands in (a cache that then differs is refused, and scoring would need a server).
    """
    if cfg.teacher.backend != "server":
        return None
    try:
        return server_identity(describe_servers(cfg.teacher, tokenizer))
    except TeacherServerError:
        state, existing = peek_cache_state(cfg.cache.path)
        if state == "complete" and existing and existing.get("teacher_server"):
            return existing["teacher_server"]
        raise


def _check_existing(path: str, meta: dict, overwrite: bool, repair: bool = False) -> str:
    """'absent' | 'incomplete' (resume) | 'complete' (nothing to do) | 'repair' | 'overwrite'; refuses foreign,
    unreadable or mismatched caches before any engine is loaded (the writer re-checks under its lock)."""
    state, existing = peek_cache_state(path)
    if state == "not_a_cache":
        raise UserError(f"cache.path={path!r} exists and is not a teacher cache; choose another cache.path "
                        "(nothing there was touched)")
    if existing is None:
        return "absent"
    if overwrite:
        check_overwritable(path)  # only the cache's own files may go; anything else stops us here
        return "overwrite"
    version = existing.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CacheMismatchError(f"cache.path={path!r} holds a cache of format_version {version!r}, which this "
                                 "code cannot read; pass --overwrite to replace it or choose another cache.path")
    differing = identity_differences(existing, meta)
    sets_then, sets_now = existing.get("fewshot_sets", 0), meta.get("fewshot_sets", 0)
    if differing and sets_then != sets_now:  # name the setting, not only the fingerprint it changes
        differing.append(f"data.fewshot_sets: {sets_then} in the cache, {sets_now} now")
    if differing:
        raise CacheMismatchError(f"cache.path={path!r} holds a cache made from other inputs ({', '.join(differing)} "
                                 "differ); pass --overwrite to replace it or choose another cache.path")
    if repair:
        return "repair"
    if state == "complete":
        open_cache(path)  # a part missing files is damage to report now, not "nothing to do"
    return state


def _cache_top_k(cfg: Config) -> int:
    """K of the cache: teacher.top_k, or 0 when it stores only sampled targets."""
    return 0 if cfg.cache.targets == "sampled" else cfg.teacher.top_k


def setup(cfg: Config, overwrite: bool = False, repair: bool = False) -> StageOnePlan:
    """Read, align and fingerprint everything; decide what to do with an existing cache."""
    tokenizer = load_tokenizer(cfg.teacher.model, "teacher.model")
    student_tokenizer = load_tokenizer(cfg.student.model, "student.model")
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(student_tokenizer):
        raise UserError(f"teacher.model={cfg.teacher.model!r} and student.model={cfg.student.model!r} have "
                        "different tokenizers; cached token ids would mean different things to the student")
    check_top_k_fits(cfg.teacher.top_k, len(tokenizer), cfg.teacher.model)
    model_config = _model_config(cfg.teacher.model)
    # teacher.scoring=span on an architecture it cannot reproduce stops here, before anything is written.
    scoring_note = resolve_scoring(cfg.teacher, model_config)[1] if cfg.teacher.backend == "vllm" else None
    served = _served_identity(cfg, tokenizer)
    training = build_training_set(cfg.data, cfg.seed, tokenizer, _teacher_length_limit(cfg, model_config, served))
    if not training.built:
        origin = cfg.data.train or cfg.data.mixture_file or "data.mixture"
        raise DataError(f"{origin}: no sample fits (first reason: {training.skipped[0]})")
    size = cfg.cache.shard_size
    shards = [training.built[i:i + size] for i in range(0, len(training.built), size)]
    fingerprints = {"teacher": _teacher_fingerprint(cfg.teacher, model_config, served),
                    **training_set_fingerprints(training, cfg.data, cfg.seed, tokenizer)}
    meta = {"fingerprints": fingerprints,
            "top_k": _cache_top_k(cfg), "logprob_mode": cfg.teacher.logprob_mode,
            "config": config_to_dict(cfg), "teacher_model": cfg.teacher.model, "backend": cfg.teacher.backend,
            "num_fewshot": cfg.data.num_fewshot, "fewshot_sets": cfg.data.fewshot_sets,
            "skipped_samples": len(training.skipped),
            "sources": training.sources, "source_formats": training.formats,
            "temperatures": requested_temperatures(cfg), "encoding": encoding_meta(cfg.cache.encoding),
            "targets": targets_meta(cfg.cache.targets, cfg.cache.samples_per_position, cfg.train.temperature)}
    if served:
        meta["teacher_server"] = served
    if cfg.teacher.attention.enabled:
        meta["relations"] = {"layer": cfg.teacher.attention.layer, "num_relation_heads":
                             cfg.teacher.attention.num_heads, "kinds": ["qq", "kk", "vv"]}
    vocab_size = max(int(model_config.get("vocab_size") or 0), len(tokenizer))
    state = _check_existing(cfg.cache.path, meta, overwrite, repair)
    return StageOnePlan(cfg, shards, meta, vocab_size, skipped=training.skipped,
                        trimmed=training.trimmed, state=state,
                        notes=training.notes + ([scoring_note] if scoring_note else []))


# ------------------------------------------------------------------------------------------------------ run

# One engine per worker process, loaded on the first shard and reused for the rest.
_WORKER_BACKENDS: dict[str, Any] = {}


def _worker_backend(teacher: TeacherConfig, seed: int, pin_gpus: int) -> tuple[Any, float]:
    """This process's engine for ``teacher`` (loaded on first use) and the seconds spent loading it now."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()   # stage one's own bar reports progress

    key = json_fingerprint({"teacher": config_to_dict(teacher), "seed": seed})
    if key in _WORKER_BACKENDS:
        return _WORKER_BACKENDS[key], 0.0
    if pin_gpus:
        _pin_gpu_for_this_worker(pin_gpus)
    # vLLM's INFO logs are per request batch; keep warnings unless the user asked for more.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    started = time.perf_counter()
    _WORKER_BACKENDS.clear()
    try:
        _WORKER_BACKENDS[key] = load_backend(teacher, seed=seed)
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as exc:  # a truncated or bad checkpoint
        raise TeacherConfigError(f"teacher.model={teacher.model!r}: cannot load the model's weights "
                                 f"({str(exc).splitlines()[0][:200]}); check or re-download its files") from None
    return _WORKER_BACKENDS[key], time.perf_counter() - started


def _pin_gpu_for_this_worker(num_gpus: int) -> None:
    """LocalCluster does not set CUDA_VISIBLE_DEVICES per worker: worker i takes GPU i mod num_gpus."""
    from distributed import get_worker

    name = get_worker().name
    index = name if isinstance(name, int) else int(str(name).rsplit("-", 1)[-1] or 0)
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index % num_gpus)


def score_shard(teacher: TeacherConfig, seed: int, cache_path: str, part_id: int, shard: list[AlignedSample],
                pin_gpus: int = 0, tempered: tuple[float, ...] = (),
                sampling: SamplingSpec | None = None) -> dict[str, float]:
    """Score one shard with this process's engine and write it as cache part ``part_id`` (commit last).

    ``tempered``: the cache's temperatures other than 1, whose log-normalizers each sample stores; ``sampling``:
    the sampled targets each position draws (keyed by the crc32 of the sample id and the teacher position)."""
    started = time.perf_counter()
    if teacher.backend == "hf" and os.environ.get("OMP_NUM_THREADS"):
        # OpenMP's thread count is per calling thread and dask runs tasks in an executor thread that starts
        # with one; vLLM binds its own threads, so only the hf backend needs this.
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    backend, load_seconds = _worker_backend(teacher, seed, pin_gpus)
    requests = [ScoreRequest(s.pair.teacher_input_ids, np.asarray(s.pair.teacher_positions, dtype=np.int64),
                             zlib.crc32(s.sample_id.encode("utf-8"))) for s in shard]
    results = backend.score(requests, temperatures=tempered, **({"sampling": sampling} if sampling else {}))
    keep = None if sampling is None or sampling.keep_topk else 0  # sampled targets only: [n, 0] top-K
    samples = []
    for item, result in zip(shard, results, strict=True):
        sample = {"sample_id": item.sample_id,
                  "input_ids": np.asarray(item.pair.input_ids, dtype=np.int64),
                  "teacher_input_ids": np.asarray(item.pair.teacher_input_ids, dtype=np.int64),
                  "label_positions": np.asarray(item.pair.label_positions, dtype=np.int64),
                  "teacher_positions": np.asarray(item.pair.teacher_positions, dtype=np.int64),
                  "topk_ids": result.topk_ids[:, :keep], "topk_logprobs": result.topk_logprobs[:, :keep],
                  "label_logprobs": result.label_logprobs, "source": item.source}
        if result.relations is not None:
            sample["relations"] = result.relations
        if tempered:
            sample["log_normalizers"] = result.log_normalizers
        if sampling is not None:
            sample["sampled_ids"], sample["sampled_counts"] = result.sampled_ids, result.sampled_counts
        samples.append(sample)
    write_part(cache_path, part_id, samples)
    return {"part_id": part_id, "samples": len(shard), "seconds": time.perf_counter() - started,
            "load_seconds": load_seconds,
            "teacher_tokens": sum(len(s.pair.teacher_input_ids) for s in shard),
            "positions": sum(len(s.pair.label_positions) for s in shard)}


@dataclass
class RunStats:
    parts_scored: int = 0
    parts_reused: int = 0
    samples: int = 0
    teacher_tokens: int = 0
    positions: int = 0
    seconds: float = 0.0
    engine_start_seconds: float = 0.0
    """Longest engine load among the workers (overlaps with other workers' scoring)."""
    damaged: dict[int, str] = field(default_factory=dict)
    """--repair: the parts found damaged (and re-scored), with what was wrong."""


def _progress(total_samples: int, done_samples: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total_samples, initial=done_samples, unit="sample", desc="stage one", disable=not enabled,
                dynamic_ncols=True)


def _record(stats: RunStats, bar, part_stats: dict, started: float) -> None:
    stats.parts_scored += 1
    stats.samples += int(part_stats["samples"])
    stats.teacher_tokens += int(part_stats["teacher_tokens"])
    stats.positions += int(part_stats["positions"])
    stats.engine_start_seconds = max(stats.engine_start_seconds, float(part_stats["load_seconds"]))
    elapsed = max(time.perf_counter() - started - stats.engine_start_seconds, 1e-9)
    bar.update(int(part_stats["samples"]))
    bar.set_postfix(samples_s=f"{stats.samples / elapsed:.1f}", tokens_s=f"{stats.teacher_tokens / elapsed:.0f}")


def _run_in_process(plan: StageOnePlan, pending: list[int], stats: RunStats, bar, started: float) -> None:
    try:
        for part_id in pending:
            _record(stats, bar, score_shard(plan.cfg.teacher, plan.cfg.seed, plan.cfg.cache.path, part_id,
                                            plan.shards[part_id], tempered=plan.tempered,
                                            sampling=plan.sampling),
                    started)
    finally:
        for backend in _WORKER_BACKENDS.values():
            backend.close()
        _WORKER_BACKENDS.clear()


def engine_threads(backend: str, workers: int, cpus: int | None = None) -> int:
    """OpenMP threads per worker engine.

    hf: the machine's cores shared among the workers (torch's GEMMs scale with them). vllm: one — vLLM's CPU
    runner sets its torch threads to 1 for serving unless OMP_NUM_THREADS says otherwise, and with more it
    warns of spin-wait contention; measured on scale.yaml (2 cores, 64 samples, K=64, two interleaved rounds)
    one thread per engine scored 1.02x and 1.16x the teacher tokens/s of two, so more cores are used as more
    workers (``--workers``), not more threads.
    """
    if backend == "vllm":
        return 1
    return max(1, (cpus or os.cpu_count() or 1) // workers)


def _run_on_dask(plan: StageOnePlan, pending: list[int], stats: RunStats, bar, started: float,
                 workers: int, scheduler: str | None) -> None:
    import dask
    from distributed import Client, LocalCluster, as_completed

    num_gpus = _visible_gpu_count() if scheduler is None else 0
    # Workers slow to exit after the last shard are killed at close; that is expected, not worth a warning.
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
    threads = str(engine_threads(plan.cfg.teacher.backend, workers))
    # vLLM starts its own processes; dask's daemonic workers may not have children. Dask pins OMP/MKL to one
    # thread before spawning workers (a plain `env=` is applied too late for OpenMP): share the cores instead.
    with dask.config.set({"distributed.worker.daemon": False,
                          "distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS": threads,
                          "distributed.nanny.pre-spawn-environ.MKL_NUM_THREADS": threads}):
        cluster = None if scheduler else LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, memory_limit=0, dashboard_address=None,
            env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
        with Client(scheduler or cluster) as client:
            futures = [client.submit(score_shard, plan.cfg.teacher, plan.cfg.seed, plan.cfg.cache.path, part_id,
                                     plan.shards[part_id], num_gpus, plan.tempered, plan.sampling,
                                     key=f"score-part-{part_id}",
                                     pure=False)
                       for part_id in pending]
            for future in as_completed(futures):
                _record(stats, bar, future.result(), started)
        if cluster is not None:
            cluster.close()


def _check_scheduler(address: str) -> None:
    """Refuse an address no dask scheduler answers at before anything is written (dask would wait, then raise)."""
    from distributed import Client

    try:
        with Client(address, timeout="10s"):
            pass
    except (OSError, TimeoutError, ValueError) as exc:
        raise UserError(f"--scheduler {address!r}: no dask scheduler answers there "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); start one "
                        "(`dask scheduler`) or leave --scheduler out to use local workers — nothing was written") from None


def _visible_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no CUDA runtime at all
        return 0


def run(plan: StageOnePlan, workers: int = 1, scheduler: str | None = None, progress: bool = True) -> RunStats:
    """Score and write every part not yet committed."""
    targets = plan.meta["targets"]
    writer = CacheWriter(plan.cfg.cache.path, plan.meta, len(plan.shards), top_k=plan.meta["top_k"],
                         vocab_size=plan.vocab_size, overwrite=plan.state == "overwrite",
                         repair=plan.state == "repair", logprob_dtype=plan.cfg.cache.logprob_dtype,
                         temperatures=plan.meta["temperatures"], encoding=plan.cfg.cache.encoding,
                         targets=targets["mode"], samples_per_position=targets.get("samples_per_position", 0),
                         sample_temperature=targets.get("temperature", 1.0))
    stats = RunStats()
    with writer:  # holds the cache's writer lock: a second run on this cache.path is refused
        stats.damaged = dict(writer.damaged)
        pending = sorted(writer.pending_parts())
        stats.parts_reused = len(plan.shards) - len(pending)
        done = sum(len(plan.shards[i]) for i in set(range(len(plan.shards))) - set(pending))
        started = time.perf_counter()
        with _progress(sum(len(s) for s in plan.shards), done, progress) as bar:
            if not pending:
                pass  # every part is committed: only the completion record may be missing
            elif workers == 0:
                _run_in_process(plan, pending, stats, bar, started)
            else:
                _run_on_dask(plan, pending, stats, bar, started, workers, scheduler)
        stats.seconds = time.perf_counter() - started
        writer.finalize()
    return stats


# --------------------------------------------------------------------------------------------------- finish


def summarize(plan: StageOnePlan, stats: RunStats) -> dict[str, Any]:
    """The closing numbers: what was scored, how fast, how large on disk."""
    stats_of_cache = cache_stats(open_cache(plan.cfg.cache.path))
    # Throughput excludes the engine start (vLLM on CPU: ~1 min) so runs of different sizes compare.
    seconds = max(stats.seconds - stats.engine_start_seconds, 1e-9)
    return {
        "cache": plan.cfg.cache.path, "backend": plan.cfg.teacher.backend, "top_k": plan.cfg.teacher.top_k,
        "samples": stats_of_cache["samples"], "scored_positions": stats_of_cache["distilled_positions"],
        "teacher_tokens": stats_of_cache["teacher_tokens"], "bytes_on_disk": stats_of_cache["bytes_on_disk"],
        "bytes_per_position": stats_of_cache["bytes_per_position"],
        "parts": len(plan.shards), "parts_reused": stats.parts_reused, "parts_scored": stats.parts_scored,
        "skipped_samples": len(plan.skipped), "shots_trimmed": plan.trimmed, "seconds": round(stats.seconds, 2),
        "engine_start_seconds": round(stats.engine_start_seconds, 2),
        "teacher_tokens_per_s": round(stats.teacher_tokens / seconds, 1),
        "scored_positions_per_s": round(stats.positions / seconds, 1),
        "samples_per_s": round(stats.samples / seconds, 2),
    }


def format_summary(summary: dict[str, Any], skipped: list[str]) -> str:
    lines = [f"stage one done: {summary['samples']} samples, {summary['scored_positions']} scored positions "
             f"(K={summary['top_k']}, {summary['backend']}) in {summary['cache']}",
             f"  {summary['bytes_per_position']:.1f} bytes per scored position on disk; "
             f"{summary['teacher_tokens_per_s']:.0f} teacher tokens/s, {summary['samples_per_s']:.2f} samples/s "
             f"(run {summary['seconds']:.1f} s, of which engine start {summary['engine_start_seconds']:.1f} s)",
             f"  parts: {summary['parts']} ({summary['parts_reused']} reused, {summary['parts_scored']} scored); "
             f"skipped samples: {summary['skipped_samples']}; samples with fewer shots: {summary['shots_trimmed']}"]
    lines += [f"  skipped {reason}" for reason in skipped[:5]]
    if len(skipped) > 5:
        lines.append(f"  ... and {len(skipped) - 5} more skipped")
    return "\n".join(lines)


def cache_teacher(cfg: Config, *, workers: int = 1, scheduler: str | None = None, overwrite: bool = False,
                  repair: bool = False, progress: bool = True, echo=print) -> dict[str, Any]:
    """Stage one end to end. Returns the summary (``{"nothing_to_do": True, ...}`` for a matching cache).

    ``repair`` reads every part of a complete cache and re-scores only the damaged ones.
    """
    plan = setup(cfg, overwrite=overwrite, repair=repair)
    if scheduler is not None:
        _check_scheduler(scheduler)
    for note in plan.notes:
        echo(f"stage one: {note}")
    if plan.state == "complete":
        echo(f"stage one: nothing to do — {cfg.cache.path} is a complete cache with matching fingerprints")
        return {"nothing_to_do": True, "cache": cfg.cache.path}
    if plan.state == "incomplete":
        echo(f"stage one: resuming the incomplete cache at {cfg.cache.path}")
    stats = run(plan, workers=workers, scheduler=scheduler, progress=progress)
    if plan.state == "repair":
        found = "; ".join(f"part {part_id}: {why}" for part_id, why in sorted(stats.damaged.items()))
        echo(f"stage one: --repair re-scored {len(stats.damaged)} damaged part(s)" + (f" ({found})" if found else
             f"; every part of {cfg.cache.path} reads back intact"))
    summary = summarize(plan, stats)
    echo(format_summary(summary, plan.skipped))
    return summary
