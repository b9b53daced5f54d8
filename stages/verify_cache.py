"""Recipe ``pipeline verify-cache``: re-score a random sample of a cache and check it holds the teacher's scores.

``validate`` checks a cache's structure; this checks its numbers. Sections, in the order they run:

1. **setup** — open the cache (through :mod:`cache_schema`'s reader only, read-only), rebuild the teacher it
   records (its stage-one config; backend, model or server URLs may be replaced), draw the samples (seeded).
2. **run** — score each drawn sample's stored teacher sequence at its stored positions and at their neighbours
   (tp - 1, tp + 1), and compare per position: label logprob, top-K logprobs rank by rank, same-id
   probabilities (top-K ids up to near ties) and the top-1 id. A position outside tolerance whose cached row
   does agree with the teacher at a neighbouring position is counted as misaligned (an off-by-one).
3. **finish** — a report: holds (exit 0) or not (exit 1); user errors exit 2 in the CLI.

Attention relations (if the cache has them) are not re-scored. Nothing is written anywhere.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cache_schema import KDCache, open_cache
from kd.config import TeacherConfig
from kd.config_checks import config_from_dict
from kd.errors import UserError
from kd.teacher.agreement import AgreementTolerances, PositionAgreement, position_agreement
from kd.teacher.factory import DEFAULT_VERIFY_BACKEND, load_backend
from kd.teacher.types import ScoreRequest, ScoreRequestError, ScoreResult

# ---------------------------------------------------------------------------------------------------- setup


@dataclass
class VerifyPlan:
    """The cache, the teacher to re-score with and the drawn sample indices."""

    cache: KDCache
    teacher: TeacherConfig
    engine_seed: int
    """The run's seed, given to the engine (vLLM) as stage one did."""
    indices: list[int]
    tolerances: AgreementTolerances = field(default_factory=AgreementTolerances)


def verification_teacher(cache: KDCache, backend: str | None = None, model: str | None = None,
                         server_urls: tuple[str, ...] = ()) -> tuple[TeacherConfig, int]:
    """The recorded teacher (and seed) with ``backend`` / ``model`` / ``server_urls`` replaced, validated."""
    recorded = cache.meta.get("config")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("teacher"), dict):
        raise UserError(f"{cache.path}: the cache records no stage-one config, so it names no teacher to verify "
                        "against; only caches written by `pipeline cache-teacher` can be verified")
    config = copy.deepcopy(recorded)
    teacher = config["teacher"]
    teacher["backend"] = backend or DEFAULT_VERIFY_BACKEND
    teacher["top_k"] = cache.top_k
    # Only the top-K scores are verified: relations would need hf and cost a forward pass of their own.
    teacher.setdefault("attention", {})["enabled"] = False
    config.setdefault("train", {})["attention_weight"] = 0.0
    if model:
        teacher["model"] = model
    if server_urls:
        teacher.setdefault("server", {})["urls"] = list(server_urls)
    cfg = config_from_dict(config, source=f"{cache.path} (recorded config, teacher as verified)")
    return cfg.teacher, cfg.seed


def setup(path: str, *, samples: int = 16, seed: int = 0, backend: str | None = None, model: str | None = None,
          server_urls: tuple[str, ...] = (), tolerances: AgreementTolerances | None = None) -> VerifyPlan:
    """Open the cache read-only, rebuild its teacher and draw ``samples`` sample indices with ``seed``."""
    cache = open_cache(path)
    teacher, teacher_seed = verification_teacher(cache, backend, model, server_urls)
    if samples < 1:
        raise UserError(f"--samples must be at least 1 (got {samples})")
    count = min(samples, len(cache))
    indices = sorted(np.random.default_rng(seed).choice(len(cache), size=count, replace=False).tolist())
    return VerifyPlan(cache, teacher, teacher_seed, indices, tolerances or AgreementTolerances())


# ------------------------------------------------------------------------------------------------------ run


def scored_positions(teacher_positions: np.ndarray, length: int) -> np.ndarray:
    """[m] sorted unique positions to re-score: the cached ones and their neighbours inside [1, length - 1]."""
    around = np.concatenate([teacher_positions - 1, teacher_positions, teacher_positions + 1])
    return np.unique(around[(around >= 1) & (around < length)])


def _rows(result: ScoreResult, order: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, ...]:
    """The fresh rows at positions ``wanted`` [n] out of a result scored at sorted positions ``order``."""
    rows = np.searchsorted(order, wanted)
    return result.topk_ids[rows], result.topk_logprobs[rows], result.label_logprobs[rows]


def _compare_sample(sample: dict[str, Any], fresh: ScoreResult, order: np.ndarray,
                    tolerances: AgreementTolerances) -> tuple[PositionAgreement, np.ndarray]:
    """Agreement at the cached positions, and [n] bool: outside tolerance there but within it at tp ± 1."""
    positions = np.asarray(sample["teacher_positions"], np.int64)
    cached = (sample["topk_ids"], sample["topk_logprobs"], sample["label_logprobs"])
    agreement = position_agreement(*cached, *_rows(fresh, order, positions))
    misaligned = np.zeros(len(positions), bool)
    failing = ~agreement.within(tolerances)
    for shift in (-1, 1):
        neighbours = positions + shift
        usable = failing & np.isin(neighbours, order)
        if usable.any():
            shifted = position_agreement(*(a[usable] for a in cached), *_rows(fresh, order, neighbours[usable]))
            misaligned[np.flatnonzero(usable)[shifted.within(tolerances)]] = True
    return agreement, misaligned


def run(plan: VerifyPlan) -> dict[str, Any]:
    """Re-score the drawn samples and summarize the per-position agreement."""
    samples = [plan.cache[i] for i in plan.indices]
    orders = [scored_positions(np.asarray(s["teacher_positions"], np.int64), len(s["teacher_input_ids"]))
              for s in samples]
    backend = load_backend(plan.teacher, seed=plan.engine_seed)
    try:
        fresh = backend.score([ScoreRequest(s["teacher_input_ids"], order) for s, order in zip(samples, orders)])
    except ScoreRequestError as error:  # ids outside this teacher's vocabulary, a sequence longer than it takes
        raise UserError(f"{plan.cache.path}: {plan.teacher.model} cannot re-score the cached samples ({error}); "
                        "verify with the teacher that wrote the cache") from None
    finally:
        backend.close()
    per_sample = [_compare_sample(s, r, o, plan.tolerances) for s, r, o in zip(samples, fresh, orders)]
    return summarize(plan, samples, per_sample)


def summarize(plan: VerifyPlan, samples: list[dict], per_sample: list[tuple[PositionAgreement, np.ndarray]]
              ) -> dict[str, Any]:
    """The report: maxima, counts, the worst position and whether the cache holds."""
    def joined(name: str) -> np.ndarray:
        return np.concatenate([getattr(agreement, name) for agreement, _ in per_sample])

    tolerances = plan.tolerances
    within = np.concatenate([agreement.within(tolerances) for agreement, _ in per_sample])
    positions = int(within.size)
    top1 = float(joined("top1_same").mean()) if positions else 1.0
    worst = _worst_position(samples, per_sample)
    return {
        "cache": str(plan.cache.path), "backend": plan.teacher.backend, "teacher": plan.teacher.model,
        "samples": len(samples), "sample_indices": plan.indices, "positions": positions,
        "max_label_delta": float(joined("label_delta").max(initial=0.0)),
        "max_rank_delta": float(joined("rank_delta").max(initial=0.0)),
        "max_prob_delta": float(joined("prob_delta").max(initial=0.0)),
        "top1_agreement": top1,
        "failed_positions": int((~within).sum()),
        "misaligned_positions": int(sum(int(m.sum()) for _, m in per_sample)),
        "worst": worst, "tolerances": tolerances.as_dict(),
        "holds": bool(within.all() and top1 >= tolerances.min_top1_agreement),
    }


def _worst_position(samples: list[dict], per_sample: list[tuple[PositionAgreement, np.ndarray]]) -> str | None:
    """'sample ID position tp' with the largest label-logprob difference, for the report."""
    best, where = -1.0, None
    for sample, (agreement, _) in zip(samples, per_sample):
        if agreement.label_delta.size and agreement.label_delta.max() > best:
            row = int(agreement.label_delta.argmax())
            best = float(agreement.label_delta[row])
            where = f"sample {sample['sample_id']} position {int(sample['teacher_positions'][row])}"
    return where


# --------------------------------------------------------------------------------------------------- finish


def format_report(report: dict[str, Any]) -> str:
    t = report["tolerances"]
    verdict = ("holds: the cache's scores are the teacher's within tolerance" if report["holds"] else
               "DOES NOT HOLD: the cache's scores are not this teacher's (see above)")
    return "\n".join([
        f"verify-cache: {report['samples']} samples, {report['positions']} positions of {report['cache']} "
        f"re-scored with {report['backend']} ({report['teacher']})",
        f"  label logprob max |Δ| {report['max_label_delta']:.4f} (tolerance {t['label_atol']}); top-K "
        f"logprobs by rank max |Δ| {report['max_rank_delta']:.4f} ({t['rank_atol']}); same-id probability "
        f"max |Δ| {report['max_prob_delta']:.4f} ({t['prob_atol']})",
        f"  top-1 agreement {report['top1_agreement']:.1%} (at least {t['min_top1_agreement']:.0%}); positions "
        f"outside tolerance {report['failed_positions']}, of which misaligned (agree at tp ± 1) "
        f"{report['misaligned_positions']}; largest label difference at {report['worst']}",
        f"verify-cache: {verdict}",
    ])


def verify_cache(path: str, *, samples: int = 16, seed: int = 0, backend: str | None = None,
                 model: str | None = None, server_urls: tuple[str, ...] = (), echo=print) -> dict[str, Any]:
    """All three sections; returns the report (``report["holds"]`` decides the exit code)."""
    report = run(setup(path, samples=samples, seed=seed, backend=backend, model=model, server_urls=server_urls))
    echo(format_report(report))
    return report
