"""Scaling: how stage one and stage two grow with samples, context, K and sequence length; a PNG per table.

Five tables, each measured in one run on the named config (``--config scale.yaml`` for the real vocabulary):

- stage one (hf backend, in this process) vs the number of samples, and vs the teacher's context length
  (0, 2, 4, 8 worked examples before each question): seconds without the model load, teacher tokens/s;
- stage two step time and true peak memory vs K (cached KD at each K, CE-only once as the K-free reference),
  and vs sequence length (``text`` documents cut into windows of exactly L tokens, every token distilled;
  KD and CE-only at each L), each condition in a fresh process (kd.training.metrics.PeakMemory);
- bytes on disk per distilled token and per kept entry vs K (the caches of the K table).

Timings are medians over ``repeats`` interleaved rounds where a table repeats; on a shared machine read the
shapes of the curves and the ratios, not the absolute seconds.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench.records import BenchResult
from bench.stage_two import run_isolated
from bench.workspace import BenchSettings, bench_config, config_record, training_cache

SAMPLE_COUNTS = (32, 64, 128)
CONTEXT_SHOTS = (0, 2, 4, 8)
SCALING_TOP_KS = (16, 32, 64, 128, 256)
SEQUENCE_LENGTHS = (128, 256, 512, 1024)
DOCUMENTS = 24
"""``text`` documents of the sequence-length table, each ~40 problems (over 1,024 tokens): every length cuts
the same tokens into windows of L, so the caches hold the same distilled tokens."""
PROBLEMS_PER_DOCUMENT = 40
SEQUENCE_BATCH = 4
"""Batch size of the sequence-length table (1024-token windows at the config's batch would not fit a laptop)."""

UNITS = {"seconds": "stage-one wall seconds, model load excluded", "teacher_tokens_per_s": "teacher tokens/s",
         "teacher_tokens_per_sample": "mean teacher tokens per sample (context + answer)",
         "step_time_s": "median seconds per optimizer step", "peak_rss_mb": "MiB, true peak RSS (ru_maxrss) of the "
         "condition's own process over its steps", "bytes_per_token": "bytes on disk per distilled token",
         "bytes_per_entry": "bytes on disk per distilled token / K: all of a position's arrays (ids, "
         "logprobs, label logprob, indices) over its K kept entries, so above cache_size's top-K-only figure"}


def _stage_one_row(settings: BenchSettings, name: str, extra: list[str]) -> dict[str, Any]:
    """One stage-one run (hf backend, in process) into a fresh scratch cache."""
    from stages.cache_teacher import cache_teacher

    path = Path(settings.work_dir) / "scaling" / name
    shutil.rmtree(path, ignore_errors=True)
    cfg = bench_config(settings, "teacher.backend=hf", f"cache.path={path}", *extra)
    summary = cache_teacher(cfg, workers=0, progress=False, echo=lambda *_: None)
    seconds = summary["seconds"] - summary["engine_start_seconds"]
    shutil.rmtree(path, ignore_errors=True)
    return {"samples": summary["samples"], "seconds": round(seconds, 3),
            "teacher_tokens_per_s": summary["teacher_tokens_per_s"],
            "teacher_tokens_per_sample": round(summary["teacher_tokens"] / max(summary["samples"], 1), 1)}


def stage_one_tables(settings: BenchSettings) -> dict[str, list[dict[str, Any]]]:
    by_samples = [{"num_samples": n, **_stage_one_row(settings, f"samples-{n}", [f"data.max_samples={n}"])}
                  for n in settings.extra.get("sample_counts", SAMPLE_COUNTS)]
    samples = settings.extra.get("context_samples", SAMPLE_COUNTS[0])
    by_context = [{"num_fewshot": shots, **_stage_one_row(settings, f"shots-{shots}",
                                                          [f"data.max_samples={samples}",
                                                           f"data.num_fewshot={shots}"])}
                  for shots in settings.extra.get("context_shots", CONTEXT_SHOTS)]
    return {"stage_one_vs_samples": by_samples, "stage_one_vs_context": by_context}


def _train(settings: BenchSettings, overrides: list[str], condition: str) -> dict[str, Any]:
    steps = settings.extra.get("scaling_steps", min(settings.steps, 3))
    warmup = settings.extra.get("scaling_warmup", 1)
    run = run_isolated(settings.isolate, "bench.stage_two", "measure_condition", settings.config_name,
                       [*settings.overrides, *overrides], condition, warmup, steps)
    return {"step_time_s": round(run["step_time_s"], 4), "peak_rss_mb": round(run["peak_rss_mb"], 1),
            "cuda_max_allocated_mb": run["cuda_max_allocated_mb"]}


def top_k_tables(settings: BenchSettings) -> dict[str, list[dict[str, Any]]]:
    """Stage two and bytes vs K (one cache per K, scored by the hf backend)."""
    from cache_schema import open_cache
    from cache_schema.cache_stats import cache_stats

    step_rows, byte_rows, paths = [], [], {}
    top_ks = settings.extra.get("top_ks", SCALING_TOP_KS)
    for k in top_ks:
        _, path = paths[k] = training_cache(settings, top_k=k)
        overrides = ["teacher.backend=hf", f"teacher.top_k={k}", f"cache.path={path}"]
        step_rows.append({"top_k": k, "condition": "kd", **_train(settings, overrides, "kd")})
        stats = cache_stats(open_cache(path))
        byte_rows.append({"top_k": k, "bytes_per_token": round(stats["bytes_per_position"], 2),
                          "bytes_per_entry": round(stats["bytes_per_position"] / k, 3)})
    _, path = paths[top_ks[0]]  # CE-only reads no top-K: any of the caches above serves
    ce = _train(settings, ["teacher.backend=hf", f"teacher.top_k={top_ks[0]}", f"cache.path={path}"], "ce")
    step_rows.append({"top_k": None, "condition": "ce", **ce})
    return {"stage_two_vs_top_k": step_rows, "bytes_vs_top_k": byte_rows}


def _documents_file(settings: BenchSettings, count: int) -> Path:
    """A ``text`` data file: the training rows joined into long documents (every window is full length)."""
    cfg = bench_config(settings)
    rows = [json.loads(line) for line in Path(cfg.data.train).read_text().splitlines() if line.strip()]
    problems = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    step = PROBLEMS_PER_DOCUMENT
    documents = ["\n\n".join(problems[i:i + step]) for i in range(0, count * step, step)]
    path = Path(settings.work_dir) / "scaling" / "documents.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return path


def sequence_tables(settings: BenchSettings) -> dict[str, list[dict[str, Any]]]:
    """Stage two vs sequence length: KD and CE-only on windows of exactly L tokens."""
    from cache_schema import CacheMismatchError
    from stages.cache_teacher import cache_teacher

    count = settings.extra.get("documents", DOCUMENTS)
    documents = _documents_file(settings, count)
    rows = []
    for length in settings.extra.get("sequence_lengths", SEQUENCE_LENGTHS):
        path = str(Path(settings.work_dir) / "caches" / f"windows-{length}")
        data = [f"data.train={documents}", "data.format=text", "data.num_fewshot=0",
                f"data.max_seq_len={length}", f"data.max_samples={count}",
                f"train.batch_size={SEQUENCE_BATCH}"]
        cfg = bench_config(settings, "teacher.backend=hf", f"cache.path={path}", *data)
        try:
            cache_teacher(cfg, workers=0, progress=False, echo=lambda *_: None)
        except CacheMismatchError:
            cache_teacher(cfg, workers=0, overwrite=True, progress=False, echo=lambda *_: None)
        overrides = ["teacher.backend=hf", f"cache.path={path}", *data]
        for condition in ("kd", "ce"):
            rows.append({"sequence_length": length, "condition": condition, **_train(settings, overrides, condition)})
    return {"stage_two_vs_sequence_length": rows}


def plot_tables(tables: dict[str, list[dict[str, Any]]], out_dir: str) -> list[str]:
    """One PNG per table, next to the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = {"stage_one_vs_samples": ("num_samples", ("seconds",), None),
             "stage_one_vs_context": ("num_fewshot", ("seconds",), None),
             "stage_two_vs_top_k": ("top_k", ("step_time_s", "peak_rss_mb"), "condition"),
             "stage_two_vs_sequence_length": ("sequence_length", ("step_time_s", "peak_rss_mb"), "condition"),
             "bytes_vs_top_k": ("top_k", ("bytes_per_token", "bytes_per_entry"), None)}
    written = []
    for name, (x_key, y_keys, group_key) in specs.items():
        rows = tables.get(name)
        if not rows:
            continue
        figure, axes = plt.subplots(1, len(y_keys), figsize=(5 * len(y_keys), 3.6), squeeze=False)
        groups = sorted({r.get(group_key) for r in rows}) if group_key else [None]
        for axis, y_key in zip(axes[0], y_keys):
            for group in groups:
                points = [r for r in rows if not group_key or r.get(group_key) == group]
                points = [r for r in points if r[x_key] is not None]
                if points:
                    axis.plot([r[x_key] for r in points], [r[y_key] for r in points], marker="o",
                              label=group or y_key)
                else:  # the K-free CE-only reference of the K table: a horizontal line
                    for r in rows:
                        if r.get(group_key) == group:
                            axis.axhline(r[y_key], linestyle="--", color="gray", label=f"{group} (any K)")
            axis.set_xlabel(x_key)
            axis.set_ylabel(UNITS.get(y_key, y_key), fontsize=7)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        figure.suptitle(name.replace("_", " "), fontsize=9)
        figure.tight_layout()
        path = Path(out_dir) / f"scaling_{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(str(path))
    return written


def run_scaling(settings: BenchSettings) -> BenchResult:
    started = time.perf_counter()
    tables: dict[str, list[dict[str, Any]]] = {}
    tables.update(stage_one_tables(settings))
    tables.update(top_k_tables(settings))
    tables.update(sequence_tables(settings))
    kd = [r for r in tables["stage_two_vs_top_k"] if r["condition"] == "kd"]
    ce = next(r for r in tables["stage_two_vs_top_k"] if r["condition"] == "ce")
    summary = {"kd_over_ce_step_time_by_k": {r["top_k"]: round(r["step_time_s"] / ce["step_time_s"], 3) for r in kd},
               "kd_over_ce_peak_by_k": {r["top_k"]: round(r["peak_rss_mb"] / ce["peak_rss_mb"], 3) for r in kd},
               "median_kd_step_time_s": statistics.median(r["step_time_s"] for r in kd)}
    pngs = plot_tables(tables, settings.out_dir)
    result = BenchResult("scaling", config_record(bench_config(settings)), settings.as_dict(),
                         results={**tables, "summary": summary, "plots": pngs}, units=UNITS,
                         notes=[("stage one: hf backend in process, one run per row; stage two: one fresh process per "
                                 "row, 1 warm-up + timed steps; sequence-length rows at batch size "
                                 f"{SEQUENCE_BATCH}, {DOCUMENTS} documents of {PROBLEMS_PER_DOCUMENT} problems cut "
                                 "into windows.")])
    result.seconds = round(time.perf_counter() - started, 1)
    return result
