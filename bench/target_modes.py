"""Target modes of the cache: bytes per distilled token, and the student each one trains (issue 14).

Arms, each from its own hf-scored cache of the same samples: ``topk-plain`` and ``topk-compact`` (K =
``settings.extra["top_k"]``, default 64) and ``sampled`` (S = ``settings.extra["samples"]`` draws at
train.temperature, default 32). Every arm trains the same student with the same seed and steps (forward KL;
top-K arms with the tail bucket), then on the same held-out samples we measure, with the teacher model itself:
``full_kl`` the full-vocabulary KL(teacher ‖ student) at τ=1 over the distilled positions (not the top-K lower
bound), and ``ece`` the expected calibration error of the student's next-token probabilities there. Training
time is information only (one run per arm on a shared machine).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.records import BenchResult, ratio
from bench.workspace import BenchSettings, bench_config, config_record

ARMS = {"topk-plain": ("cache.encoding=plain",), "topk-compact": ("cache.encoding=compact",),
        "sampled": ("cache.targets=sampled", "train.kd_targets=sampled")}


def _arm_config(settings: BenchSettings, arm: str):
    extra = settings.extra
    work = Path(settings.work_dir) / "target_modes"
    return bench_config(settings, "teacher.backend=hf", f"teacher.top_k={extra.get('top_k', 64)}",
                        f"cache.samples_per_position={extra.get('samples', 32)}", *ARMS[arm],
                        f"cache.path={work / arm / 'cache'}", f"train.output_dir={work / arm / 'run'}",
                        f"data.max_samples={extra.get('cache_samples', settings.cache_samples)}",
                        f"train.max_steps={max(1, extra.get('train_steps', settings.steps))}", "train.eval_every=0",
                        "train.save_every=0", "student.save_merged=true", "train.topk_handling=tail",
                        f"train.num_validation_samples={extra.get('held_out', min(32, settings.cache_samples // 5))}")


@torch.no_grad()
def held_out_quality(cfg, student_dir: str) -> dict[str, float]:
    """Full-vocabulary KL(teacher ‖ student) at τ=1 and the student's ECE on the held-out cache samples."""
    from transformers import AutoModelForCausalLM

    from cache_schema import open_cache
    from kd.evaluation.metrics import expected_calibration_error
    from kd.training.training_data import split_indices

    cache = open_cache(cfg.cache.path)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher.model, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    _, held_out = split_indices(len(cache), cfg.train.num_validation_samples, cfg.seed)
    kl_sum, confidences, hits = 0.0, [], []
    for index in held_out.tolist():
        sample = cache[int(index)]
        rows_t = torch.as_tensor(sample["teacher_positions"]) - 1
        rows_s = torch.as_tensor(sample["label_positions"]) - 1
        teacher_lp = torch.log_softmax(teacher(torch.as_tensor(sample["teacher_input_ids"])[None]).logits[0][rows_t]
                                       .double(), dim=-1)  # [n, V]
        student_lp = torch.log_softmax(student(torch.as_tensor(sample["input_ids"])[None]).logits[0][rows_s]
                                       .double(), dim=-1)  # [n, V]
        kl_sum += float((teacher_lp.exp() * (teacher_lp - student_lp)).sum())
        top, top_id = student_lp.max(dim=-1)
        confidences.append(top.exp())
        hits.append(top_id == torch.as_tensor(sample["input_ids"])[rows_s + 1])
    positions = sum(len(c) for c in confidences)
    return {"full_kl": kl_sum / max(positions, 1), "ece": expected_calibration_error(torch.cat(confidences),
                                                                                     torch.cat(hits)),
            "top1": float(torch.cat(hits).double().mean()), "held_out_positions": positions}


def measure_arm(settings: BenchSettings, arm: str) -> dict[str, Any]:
    """One arm's row; kept in its work folder (``row.json``, keyed by the resolved config) so a run cut short
    by a time limit resumes with the arms it finished."""
    from cache_schema import json_fingerprint

    cfg = _arm_config(settings, arm)
    saved = Path(cfg.train.output_dir).parent / "row.json"
    key = json_fingerprint(config_record(cfg))
    if saved.exists() and json.loads(saved.read_text()).get("key") == key:
        return json.loads(saved.read_text())["row"]
    row = _measure(settings, cfg)
    saved.write_text(json.dumps({"key": key, "row": row}))
    return row


def _measure(settings: BenchSettings, cfg) -> dict[str, Any]:
    from cache_schema import cache_stats, open_cache
    from stages.cache_teacher import cache_teacher
    from stages.train_student import train_student

    started = time.perf_counter()
    cache_teacher(cfg, workers=0, progress=False, echo=lambda *_: None)
    cache_seconds = time.perf_counter() - started
    stats = cache_stats(open_cache(cfg.cache.path))
    row = {"bytes_per_distilled_token": stats["bytes_per_position"], "bytes_per_kept_entry":
           stats["bytes_per_kept_entry"], "distilled_positions": stats["distilled_positions"],
           "sampled": stats["sampled"], "cache_seconds": round(cache_seconds, 1)}
    if settings.extra.get("train_steps", settings.steps) > 0:
        started = time.perf_counter()
        summary = train_student(cfg, overwrite=True, progress=False, echo=lambda *_: None)
        row["train_seconds"] = round(time.perf_counter() - started, 1)
        row["steps"] = summary["steps"]
        row.update(held_out_quality(cfg, summary["final"].get("merged") or summary["final"]["model"]))
    return row


def run_target_modes(settings: BenchSettings) -> BenchResult:
    started = time.perf_counter()
    cfg = _arm_config(settings, "topk-plain")
    result = BenchResult(
        "target_modes", config_record(cfg), settings.as_dict(),
        units={"bytes_per_distilled_token": "bytes on disk (all arrays and metadata) per distilled answer token",
               "bytes_per_kept_entry": "bytes of the top-K arrays per kept (id, logprob) entry (top-K arms)",
               "sampled": "S, sampling τ, unique ids per position (mean, p50, p95), sampled arrays' bytes/position",
               "full_kl": "full-vocabulary KL(teacher ‖ student) at τ=1 on the held-out distilled positions (nats)",
               "ece": "expected calibration error of the student's next-token probabilities there (15 bins)",
               "top1": "student's top-1 next-token accuracy there",
               "compact_over_plain_kl": "full_kl of topk-compact / topk-plain (goal: within 1%)",
               "sampled_over_plain_kl": "full_kl of sampled / topk-plain"},
        notes=[("One training run per arm, same seed, steps and samples; the held-out samples are the same in "
                "every arm (split_indices on the same sample order)."),
               "Timings are information only (shared 2-core machine)."])
    arms = {arm: measure_arm(settings, arm) for arm in settings.extra.get("arms", tuple(ARMS))}
    result.results = {"arms": arms}
    if set(arms) == set(ARMS) and "full_kl" in arms["topk-plain"]:
        plain = arms["topk-plain"]["full_kl"]
        result.results["compact_over_plain_kl"] = ratio(arms["topk-compact"]["full_kl"], plain)
        result.results["sampled_over_plain_kl"] = ratio(arms["sampled"]["full_kl"], plain)
    result.seconds = round(time.perf_counter() - started, 1)
    return result
