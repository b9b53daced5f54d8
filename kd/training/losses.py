"""Sparse distillation losses on cached top-K teacher targets.

Notation: N distilled positions (flattened over the batch), K cached ids per position, V vocabulary,
S = the teacher's top-K ids at a position, p = teacher probabilities (full-vocab softmax), q = student.

Cached targets are the teacher's full-vocabulary log-softmax at τ=1 gathered at S (rows sorted descending,
Σ exp ≤ 1 up to fp16 rounding), and, for each τ ≠ 1 in the cache's temperatures, log Σ_V p^(1/τ), which makes
tempering exact (:func:`temper_teacher`). Two ways of turning them into a proper distribution (``handling``):

- ``"tail"``: K+1 buckets, S plus one "tail" bucket holding the remaining mass 1 − Σ_S (on both sides).
  This is a coarsening of the full distributions, so every divergence here is a lower bound of the
  full-vocabulary one (data processing inequality), and equals it when the tail is empty. At τ ≠ 1 this holds
  only because the teacher's tail is tempered exactly, from its stored log-normalizer.
- ``"renormalize"``: both sides restricted to S and renormalized; student mass outside S is never penalized.

Losses are returned per position ([N]) so the caller masks and averages; :func:`distillation_loss` combines
them with the cross-entropy on the actual tokens.

The student side never builds a [B, T, V] tensor: :func:`student_logprobs_at` computes logits only for the N
distilled rows, ``chunk_size`` rows at a time, each chunk under activation checkpointing so the [chunk, V]
logits are recomputed in backward rather than kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "mse_topk")
"""``train.kd_kind``: the divergence between the teacher's cached top-K and the student."""
TOPK_HANDLINGS = ("tail", "renormalize")
"""``train.topk_handling``: keep the teacher's missing mass as a tail bucket, or renormalize both sides over S."""
KD_TARGETS = ("topk", "sampled")
"""``train.kd_targets``: the cached top-K logprobs, or the cached sampled ids + counts (:func:`sampled_cross_entropy`)."""
SAMPLED_KD_KINDS = ("forward_kl",)
"""The KD kinds sampled targets serve without bias: the cross-entropy is linear in the target distribution, so
count/S in place of p keeps its expectation; reverse KL, JSD and MSE are not linear in p."""


# ---------------------------------------------------------------------------------------------- student side

@dataclass(frozen=True)
class StudentGather:
    """The student's numbers at the distilled positions."""

    topk_logprobs: Tensor
    """[N, K] log_softmax(logits / τ) over the full vocabulary, gathered at the teacher's top-K ids."""
    label_logprobs: Tensor
    """[N] log_softmax(logits) at τ=1 of the actual next token (for the cross-entropy)."""
    topk_logits: Tensor
    """[N, K] logits (after the soft-cap, if any) at the top-K ids (for ``mse_topk``)."""
    temperature: float = 1.0
    """The τ used for ``topk_logprobs``; :func:`distillation_loss` refuses a different one."""
    relations: list[Tensor] | None = None
    """Per batch row [3, A_r, n_i, n_i]: the student's attention relations over its distilled tokens (only
    when the attention-relation term is on; see :func:`attention_relation_loss`)."""


def _chunk_logprobs(hidden: Tensor, topk_ids: Tensor, label_ids: Tensor, *, lm_head: Callable[[Tensor], Tensor],
                    temperature: float, logit_softcap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [C, H], topk_ids [C, K], label_ids [C] -> (topk_logprobs [C, K], label_logprobs [C],
    topk_logits [C, K]). The only place a [C, V] tensor exists."""
    logits = lm_head(hidden)
    # log-softmax over a large vocabulary in bf16 loses several bits; at least float32 (float64 stays).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    topk_logits = logits.gather(-1, topk_ids)
    # logsumexp + gather instead of log_softmax: no second [C, V] tensor.
    lse = torch.logsumexp(logits, dim=-1)
    label_logprobs = logits.gather(-1, label_ids[:, None]).squeeze(-1) - lse
    if temperature == 1.0:
        topk_logprobs = topk_logits - lse[:, None]
    else:
        lse_t = torch.logsumexp(logits / temperature, dim=-1)
        topk_logprobs = topk_logits / temperature - lse_t[:, None]
    return topk_logprobs, label_logprobs, topk_logits


def _check_gather_inputs(hidden: Tensor, topk_ids: Tensor, label_ids: Tensor, temperature: float,
                         chunk_size: int, logit_softcap: float | None) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    n = hidden.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n:
        raise ValueError(f"topk_ids must be [N={n}, K], got shape {tuple(topk_ids.shape)}")
    if tuple(label_ids.shape) != (n,):
        raise ValueError(f"label_ids must be [N={n}], got shape {tuple(label_ids.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap!r}")


def student_logprobs_at(hidden: Tensor, lm_head: nn.Module | Callable[[Tensor], Tensor], topk_ids: Tensor,
                        label_ids: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024,
                        logit_softcap: float | None = None) -> StudentGather:
    """Student log-probabilities at the cached ids, without a dense [B, T, V] tensor.

    hidden [N, H]: the student's final hidden rows at the positions that predict each distilled token.
    lm_head: maps [C, H] -> [C, V] (an ``nn.Linear`` or any callable closing over trainable weights).
    topk_ids [N, K] int64, label_ids [N] int64. ``logit_softcap`` c applies c·tanh(logits/c) first
    (Gemma-2-style models). Differentiable w.r.t. ``hidden`` and the lm_head weights; peak extra memory is
    O(chunk_size · V) in forward and in backward.
    """
    _check_gather_inputs(hidden, topk_ids, label_ids, temperature, chunk_size, logit_softcap)
    fn = partial(_chunk_logprobs, lm_head=lm_head, temperature=float(temperature), logit_softcap=logit_softcap)
    n = hidden.shape[0]
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    # max(n, 1): an empty batch still runs once so the outputs have the right shapes and dtypes.
    for start in range(0, max(n, 1), chunk_size):
        args = (hidden[start:start + chunk_size], topk_ids[start:start + chunk_size],
                label_ids[start:start + chunk_size])
        if torch.is_grad_enabled():
            # Non-reentrant checkpoint: keeps only the chunk's inputs, recomputes [C, V] logits in backward,
            # and handles weights captured by the lm_head closure.
            parts.append(checkpoint(fn, *args, use_reentrant=False))
        else:
            parts.append(fn(*args))
    topk_lp, label_lp, topk_logits = (torch.cat(cols, dim=0) for cols in zip(*parts))
    return StudentGather(topk_lp, label_lp, topk_logits, float(temperature))


# ---------------------------------------------------------------------------------------------- tail bucket

def _log_floor(dtype: torch.dtype) -> float:
    """log of the smallest normal number: stands for "log 0" (finite, and 1/floor is finite too)."""
    return math.log(torch.finfo(dtype).tiny)


def tail_logprob(logprobs: Tensor) -> Tensor:
    """logprobs [N, K] -> [N]: log(1 − Σ_K exp(lp)), the log-mass outside the K ids.

    Computed as log(-expm1(logsumexp(lp))), which keeps precision when the kept mass is close to 1. A kept mass
    of 1 or more (exact, or over by fp16 rounding) gives log(tiny) ≈ -87 (float32) / -708 (float64) instead
    of -inf/NaN, and a zero gradient there (the clamp), so nothing downstream turns into NaN.
    """
    tail_mass = -torch.expm1(torch.logsumexp(logprobs, dim=-1))
    return tail_mass.clamp(min=torch.finfo(logprobs.dtype).tiny).log()


def _cap_mass(logprobs: Tensor) -> Tensor:
    """[N, K] -> [N, K]: rows whose kept mass exceeds 1 (fp16 rounding of cached targets, up to ~4e-3) are
    scaled down to mass 1, so the K+1 buckets stay a distribution and KL stays ≥ 0. Other rows unchanged."""
    lse = torch.logsumexp(logprobs, dim=-1, keepdim=True)
    return logprobs - lse.clamp(min=0.0)


def _buckets(logprobs: Tensor, handling: str, tail: Tensor | None = None) -> Tensor:
    """[N, K] -> [N, K+1] (``tail``: S plus the tail bucket) or [N, K] (``renormalize``: log p̃ over S)."""
    if handling == "renormalize":
        return logprobs - torch.logsumexp(logprobs, dim=-1, keepdim=True)
    if handling != "tail":
        raise ValueError(f"handling must be one of {TOPK_HANDLINGS}, got {handling!r}")
    capped = _cap_mass(logprobs)
    if tail is None:
        tail = tail_logprob(capped)
    return torch.cat([capped, tail.to(capped.dtype)[:, None]], dim=-1)


def _teacher_buckets(teacher: Tensor, handling: str, tail: Tensor | None) -> Tensor:
    # A -inf teacher logprob (fp16 underflow) would make 0·(-inf) = NaN in the KL; the floor is "log 0".
    # Only the teacher is floored: flooring the student would zero the gradient that should lift its mass.
    return _buckets(teacher.clamp(min=_log_floor(teacher.dtype)), handling, tail)


def _kl_from_log(log_a: Tensor, log_b: Tensor) -> Tensor:
    """[N, M], [N, M] log-distributions -> [N]: KL(a‖b) = Σ a (log a − log b)."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


# ---------------------------------------------------------------------------------------------- teacher τ

def needs_log_normalizer(kind: str, handling: str, temperature: float) -> bool:
    """True when a KD loss tempers the teacher's tail bucket: it then needs the teacher's log Σ_V p^(1/τ)
    (stored by stage one at ``cache.temperatures``), because the top-K alone cannot say how the tail tempers."""
    return kind != "mse_topk" and handling == "tail" and temperature != 1.0


def temper_teacher(teacher_topk_logprobs: Tensor, temperature: float, handling: str,
                   log_normalizer: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """[N, K] cached τ=1 logprobs -> (logprobs at τ [N, K], tail log-mass at τ [N] for ``tail``, else None).

    ``renormalize``: log_softmax(lp/τ) over S. Exact: restricting the tempered full distribution to S and
    renormalizing gives p_i^(1/τ) / Σ_S p_j^(1/τ) either way.

    ``tail``: ``log_normalizer`` [N] is log Σ_V p_v^(1/τ) over the teacher's full vocabulary (the cache's
    ``log_normalizers`` column for τ). Then lp/τ − log_normalizer is exactly log of the tempered probability
    p_i^(1/τ) / Σ_V p_v^(1/τ) of each top-K id, and the tempered tail is the rest of the mass — both exact, so
    the K+1-bucket divergences are again lower bounds of the full-vocabulary ones. τ = 1 needs no normalizer
    (it is 0) and returns the logprobs unchanged. Any other τ without one raises ValueError: tempering the
    tail from the top-K alone (as if it were one token) is wrong by up to 90× at τ=5.
    """
    if handling not in TOPK_HANDLINGS:
        raise ValueError(f"handling must be one of {TOPK_HANDLINGS}, got {handling!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    lp = teacher_topk_logprobs
    if temperature == 1.0:
        return lp, (tail_logprob(_cap_mass(lp)) if handling == "tail" else None)
    if handling == "renormalize":
        return F.log_softmax(lp / temperature, dim=-1), None
    if log_normalizer is None:
        raise ValueError(f"tail handling at temperature {temperature} needs the teacher's log-normalizer at that "
                         "temperature (cache.temperatures); use handling='renormalize' otherwise")
    if tuple(log_normalizer.shape) != (lp.shape[0],):
        raise ValueError(f"log_normalizer must be [N={lp.shape[0]}], got shape {tuple(log_normalizer.shape)}")
    floor = _log_floor(lp.dtype)
    tempered = _cap_mass(lp.clamp(min=floor) / temperature - log_normalizer.to(lp.dtype)[:, None])
    return tempered.clamp(min=floor), tail_logprob(tempered)


# ---------------------------------------------------------------------------------------------- KD losses

def forward_kl(student: Tensor, teacher: Tensor, handling: str = "tail", *,
               teacher_tail: Tensor | None = None) -> Tensor:
    """student [N, K], teacher [N, K] logprobs at the same ids -> [N] KL(p‖q) (teacher ‖ student).

    ``tail``: over S ∪ {tail}; ``renormalize``: over S, both renormalized. ``teacher_tail`` [N]: a
    precomputed teacher tail log-mass (from :func:`temper_teacher`), else it is derived from ``teacher``.
    """
    return _kl_from_log(_teacher_buckets(teacher, handling, teacher_tail), _buckets(student, handling))


def reverse_kl(student: Tensor, teacher: Tensor, handling: str = "tail", *,
               teacher_tail: Tensor | None = None) -> Tensor:
    """student [N, K], teacher [N, K] -> [N] KL(q‖p) (student ‖ teacher), same buckets as :func:`forward_kl`.

    Mode-seeking. With ``tail`` and a teacher whose tail is empty, a student tail mass q_t is charged
    q_t·(log q_t − log tiny): large but finite.
    """
    return _kl_from_log(_buckets(student, handling), _teacher_buckets(teacher, handling, teacher_tail))


def generalized_jsd(student: Tensor, teacher: Tensor, handling: str = "tail", beta: float = 0.5, *,
                    teacher_tail: Tensor | None = None) -> Tensor:
    """student [N, K], teacher [N, K] -> [N] generalized Jensen-Shannon divergence (GKD, Agarwal et al.).

    M = β p + (1−β) q; JSD_β = β KL(p‖M) + (1−β) KL(q‖M), with log M by logsumexp (no exp of tiny logprobs).
    As in TRL, the endpoints are defined as β=0 → KL(p‖q) and β=1 → KL(q‖p) exactly. This is a convention,
    not continuity: the formula itself goes to 0 at both ends (JSD_β ≈ β·KL(p‖q) for small β), so β near 0
    or 1 gives a loss far smaller than at the endpoint.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if beta == 0.0:
        return forward_kl(student, teacher, handling, teacher_tail=teacher_tail)
    if beta == 1.0:
        return reverse_kl(student, teacher, handling, teacher_tail=teacher_tail)
    log_p = _teacher_buckets(teacher, handling, teacher_tail)
    log_q = _buckets(student, handling)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    return beta * _kl_from_log(log_p, log_m) + (1.0 - beta) * _kl_from_log(log_q, log_m)


def mse_topk(student_topk_logits: Tensor, teacher_topk_logprobs: Tensor) -> Tensor:
    """student logits [N, K], teacher logprobs [N, K] -> [N] mean over K of (logit − teacher logprob)².

    The teacher's logprobs are used as its logits (a shift per row, which softmax ignores but MSE does not:
    the student is pulled toward logits whose log-sum-exp over the full vocabulary is about 0).
    """
    teacher = teacher_topk_logprobs.clamp(min=_log_floor(teacher_topk_logprobs.dtype))
    return (student_topk_logits - teacher).pow(2).mean(dim=-1)


def kept_mass_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """student [N, K], teacher [N, K] τ=1 logprobs -> [N] forward KL over S ∪ {tail}.

    What validation reports as "KL to the teacher on the kept mass": a lower bound of the full-vocabulary KL.
    """
    return forward_kl(student, teacher, "tail")


# ---------------------------------------------------------------------------------------------- combination

@dataclass(frozen=True)
class LossParts:
    """total = ce_weight · ce + kd_weight · kd (scalars). A term whose weight is 0 is not computed: None."""

    total: Tensor
    kd: Tensor | None
    """Averaged KD term, including the τ² factor when it applies."""
    ce: Tensor | None
    """Averaged cross-entropy on the actual tokens (τ=1)."""
    attention: Tensor | None = None
    """Attention-relation term (:func:`attention_relation_loss`, unweighted) when the caller adds one."""


def _weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """values [N], weights [N] | None -> scalar. Empty input (or all-zero weights) gives 0, not NaN."""
    if weights is None:
        return values.sum() / max(values.shape[0], 1)
    if tuple(weights.shape) != tuple(values.shape):
        raise ValueError(f"weights must be [N={values.shape[0]}], got shape {tuple(weights.shape)}")
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=torch.finfo(values.dtype).tiny)


def _kd_per_position(gather: StudentGather, teacher: Tensor, kind: str, handling: str, beta: float,
                     temperature: float, log_normalizer: Tensor | None) -> Tensor:
    """-> [N] the KD loss per position."""
    if kind == "mse_topk":
        return mse_topk(gather.topk_logits, teacher)
    if gather.temperature != temperature:
        raise ValueError(f"student logprobs were gathered at temperature {gather.temperature}, "
                         f"the loss asks for {temperature}; pass the same temperature to student_logprobs_at")
    t_lp, t_tail = temper_teacher(teacher, temperature, handling, log_normalizer)
    if kind == "forward_kl":
        return forward_kl(gather.topk_logprobs, t_lp, handling, teacher_tail=t_tail)
    if kind == "reverse_kl":
        return reverse_kl(gather.topk_logprobs, t_lp, handling, teacher_tail=t_tail)
    return generalized_jsd(gather.topk_logprobs, t_lp, handling, beta, teacher_tail=t_tail)


def _check_loss_args(gather: StudentGather, teacher: Tensor, kind: str, handling: str, temperature: float,
                     kd_weight: float, ce_weight: float) -> None:
    if kind not in KD_KINDS:
        raise ValueError(f"kind must be one of {KD_KINDS}, got {kind!r}")
    if handling not in TOPK_HANDLINGS:
        raise ValueError(f"handling must be one of {TOPK_HANDLINGS}, got {handling!r}")
    if kd_weight < 0 or ce_weight < 0 or (kd_weight == 0 and ce_weight == 0):
        raise ValueError(f"kd_weight and ce_weight must be >= 0, not both 0 (got {kd_weight}, {ce_weight})")
    if tuple(teacher.shape) != tuple(gather.topk_logprobs.shape):
        raise ValueError(f"teacher logprobs {tuple(teacher.shape)} and student top-K "
                         f"{tuple(gather.topk_logprobs.shape)} must have the same [N, K] shape")
    if kind == "mse_topk" and temperature != 1.0 and kd_weight > 0:
        # MSE compares raw logits; silently ignoring a set temperature would hide a config mistake.
        raise ValueError(f"mse_topk compares raw logits and takes no temperature (got {temperature})")


def distillation_loss(gather: StudentGather, teacher_topk_logprobs: Tensor, *, kind: str = "forward_kl",
                      handling: str = "tail", beta: float = 0.5, temperature: float = 1.0,
                      temperature_squared: bool = True, kd_weight: float = 1.0, ce_weight: float = 0.0,
                      weights: Tensor | None = None, teacher_log_normalizer: Tensor | None = None) -> LossParts:
    """The training loss: ce_weight · CE + kd_weight · KD, each averaged over the N distilled positions.

    gather: from :func:`student_logprobs_at` at ``temperature``; teacher_topk_logprobs [N, K] cached τ=1
    logprobs at the same ids; weights [N] (optional) turns both averages into weighted averages (per-source
    reweighting); teacher_log_normalizer [N]: the teacher's log Σ_V p^(1/τ) at ``temperature``, required for
    ``tail`` handling at τ ≠ 1 (:func:`temper_teacher`). KD is multiplied by τ² when ``temperature_squared`` (Hinton: keeps gradient scale
    comparable across τ; TRL and Liger do not). CE = −mean(label_logprobs) at τ=1. A term with weight 0 is
    not computed at all (the CE-only baseline never touches the teacher targets).
    """
    teacher = teacher_topk_logprobs
    _check_loss_args(gather, teacher, kind, handling, temperature, kd_weight, ce_weight)
    teacher = teacher.to(torch.promote_types(teacher.dtype, gather.topk_logprobs.dtype))
    kd = ce = None
    terms: list[Tensor] = []
    if kd_weight > 0:
        per_position = _kd_per_position(gather, teacher, kind, handling, beta, temperature, teacher_log_normalizer)
        kd = _weighted_mean(per_position, weights)
        if temperature_squared and kind != "mse_topk":
            kd = kd * temperature ** 2
        terms.append(kd_weight * kd)
    if ce_weight > 0:
        ce = _weighted_mean(-gather.label_logprobs, weights)
        terms.append(ce_weight * ce)
    total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return LossParts(total, kd, ce)


# ---------------------------------------------------------------------------------------------- sampled targets

def sampled_cross_entropy(student_logprobs: Tensor, target_probs: Tensor) -> Tensor:
    """student_logprobs [N, S] log q_τ at the sampled ids, target_probs [N, S] -> [N] −Σ_s w_s · log q_τ(id_s).

    Random-Sampling KD (Anshumann et al., 2025): with w = count/S of S draws from the teacher's p_τ (the
    proposal is the teacher itself, so every importance weight is 1), E[w_s] sums to p_τ(v) per id v, and since
    the loss is linear in w its expectation over draws is the full-vocabulary cross-entropy H(p_τ, q_τ) — the
    forward KL(p_τ‖q_τ) plus the teacher's entropy, a constant of the student: same gradient in expectation.
    Fed the exact distribution (all V ids, w = p_τ) it is H(p_τ, q_τ) exactly. Slots with w = 0 (padding)
    contribute 0 whatever the student's logprob there.
    """
    if student_logprobs.shape != target_probs.shape or student_logprobs.dim() != 2:
        raise ValueError(f"student_logprobs {tuple(student_logprobs.shape)} and target_probs "
                         f"{tuple(target_probs.shape)} must both be [N, S]")
    weights = target_probs.to(student_logprobs.dtype)
    terms = torch.where(weights > 0, weights * student_logprobs, torch.zeros_like(student_logprobs))
    return -terms.sum(dim=-1)


def sampled_distillation_loss(gather: StudentGather, sampled_counts: Tensor, *, temperature: float = 1.0,
                              temperature_squared: bool = True, kd_weight: float = 1.0, ce_weight: float = 0.0,
                              weights: Tensor | None = None) -> LossParts:
    """ce_weight · CE + kd_weight · (sampled forward cross-entropy), each averaged over the N positions.

    gather: from :func:`student_logprobs_at` at the sampled ids [N, S] and ``temperature`` (the τ the cache drew
    at); sampled_counts [N, S]: draws per id (0 = padding), summing to S per row. The KD term is
    :func:`sampled_cross_entropy` with target count/S (× τ² when ``temperature_squared``).
    """
    if kd_weight < 0 or ce_weight < 0 or (kd_weight == 0 and ce_weight == 0):
        raise ValueError(f"kd_weight and ce_weight must be >= 0, not both 0 (got {kd_weight}, {ce_weight})")
    if gather.temperature != temperature:
        raise ValueError(f"student logprobs were gathered at temperature {gather.temperature}, the loss asks for "
                         f"{temperature}; pass the same temperature to student_logprobs_at")
    kd = ce = None
    terms: list[Tensor] = []
    if kd_weight > 0:
        counts = sampled_counts.to(gather.topk_logprobs.dtype)
        target = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1.0)
        kd = _weighted_mean(sampled_cross_entropy(gather.topk_logprobs, target), weights)
        kd = kd * temperature ** 2 if temperature_squared else kd
        terms.append(kd_weight * kd)
    if ce_weight > 0:
        ce = _weighted_mean(-gather.label_logprobs, weights)
        terms.append(ce_weight * ce)
    return LossParts(terms[0] if len(terms) == 1 else terms[0] + terms[1], kd, ce)


# ---------------------------------------------------------------------------------------- attention relations

def relation_kl(student_relations: Tensor, teacher_relations: Tensor) -> Tensor:
    """student, teacher [3, A_r, n, n] relation softmaxes (rows sum to 1) of one sample -> scalar.

    MiniLMv2's relation loss: Σ over the three relation types (Q-Q, K-K, V-V) of the mean over relation heads
    and rows of KL(teacher row ‖ student row). Teacher rows are renormalized (fp16 storage leaves row sums
    1 ± 1e-2) and 0·log 0 counts as 0; student probabilities are floored at the smallest normal number before
    the log (a softmax row underflowing to 0 would otherwise give inf). n = 0 gives 0.
    """
    if student_relations.shape != teacher_relations.shape or student_relations.dim() != 4 \
            or student_relations.shape[-1] != student_relations.shape[-2]:
        raise ValueError(f"student and teacher relations must both be [3, A_r, n, n], got "
                         f"{tuple(student_relations.shape)} and {tuple(teacher_relations.shape)}")
    student = student_relations.to(torch.promote_types(student_relations.dtype, torch.float32))
    teacher = teacher_relations.to(student.dtype)
    if student.shape[-1] == 0:
        return student.sum()  # 0 with a gradient path
    teacher = teacher / teacher.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(teacher.dtype).tiny)
    log_student = student.clamp(min=torch.finfo(student.dtype).tiny).log()
    row_kl = (torch.xlogy(teacher, teacher) - teacher * log_student).sum(dim=-1)  # [3, A_r, n]
    return row_kl.mean(dim=(1, 2)).sum()


def attention_relation_loss(student_relations: list[Tensor], teacher_relations: list[Tensor]) -> Tensor:
    """Per-sample lists of [3, A_r, n_i, n_i] -> scalar: :func:`relation_kl` averaged over the samples, each
    weighted by its n_i (its share of the batch's distilled positions, like the logit term). All n_i = 0: 0."""
    if len(student_relations) != len(teacher_relations) or not student_relations:
        raise ValueError(f"need one student and one teacher relation tensor per sample, got "
                         f"{len(student_relations)} and {len(teacher_relations)}")
    sizes = [s.shape[-1] for s in student_relations]
    total = sum(sizes)
    terms = [relation_kl(s, t) * n for s, t, n in zip(student_relations, teacher_relations, sizes)]
    return torch.stack(terms).sum() / max(total, 1)
