"""Evaluation metrics: exact match of generated answers, answer perplexity and calibration (ECE), held-out KL to
the cached teacher.

Pure measurement functions; :mod:`stages.evaluate` decides which model and which samples they see.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from kd.evaluation.answers import extract_answer, is_correct, reference_answer
from kd.student.model import DistillStudent, causal_lm_of
from kd.training.loader import iterate_once
from kd.training.losses import forward_kl, student_logprobs_at


def score_completions(completions: Sequence[str], references: Sequence[str], fallback: str
                      ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Exact match of each completion's extracted answer against the reference solution's ``####`` number.

    Returns (summary, per-sample records). The summary counts how answers were found: ``marked`` (after
    ``####``), ``fallback`` (last number) and ``no_answer`` (nothing extractable), each also as a rate.
    """
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions for {len(references)} references")
    records, methods = [], {"mark": 0, "last_number": 0, "none": 0}
    for completion, reference in zip(completions, references):
        gold = reference_answer(reference)
        found = extract_answer(completion, fallback)
        methods[found.method] += 1
        records.append({"gold": gold, "predicted": found.value, "extraction": found.method,
                        "correct": is_correct(found, gold)})
    count = len(records)
    correct = sum(r["correct"] for r in records)
    summary = {"samples": count, "num_correct": correct, "exact_match": correct / count if count else None,
               "marked": methods["mark"], "fallback": methods["last_number"], "no_answer": methods["none"],
               "no_answer_rate": methods["none"] / count if count else None,
               "fallback_rate": methods["last_number"] / count if count else None}
    return summary, records


def _right_padded(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask, right-padded (positions stay those of the unpadded sequence)."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask


ECE_BINS = 15
"""Equal-width confidence bins of :func:`expected_calibration_error` (Guo et al. 2017 use 15)."""


def expected_calibration_error(confidences: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """confidences [N] (the top next-token probability), correct [N] bool (top token == actual token) -> ECE.

    Σ_b |B_b|/N · |accuracy(B_b) − mean confidence(B_b)| over ``bins`` equal-width confidence bins (the top bin
    closed at 1): 0 for a calibrated model; top-K distillation's over-confidence raises it. N = 0 gives 0.
    """
    if confidences.shape != correct.shape or confidences.dim() != 1:
        raise ValueError(f"confidences {tuple(confidences.shape)} and correct {tuple(correct.shape)} must be [N]")
    if confidences.numel() == 0:
        return 0.0
    conf = confidences.double()
    which = (conf * bins).long().clamp_(0, bins - 1)  # [N] bin of each prediction
    confidence_sum = torch.bincount(which, weights=conf, minlength=bins)
    correct_sum = torch.bincount(which, weights=correct.double(), minlength=bins)
    return float((confidence_sum - correct_sum).abs().sum() / conf.numel())


def _top_predictions(lm, hidden_rows: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden_rows [N, H] -> (top probability [N], top id [N]) of the full next-token softmax, in chunks."""
    head, softcap = lm.get_output_embeddings(), _softcap(lm)
    tops, ids = [], []
    for start in range(0, hidden_rows.shape[0], chunk_size):
        logits = head(hidden_rows[start:start + chunk_size]).float()  # [c, V]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        top_logit, top_id = logits.max(dim=-1)
        tops.append((top_logit - torch.logsumexp(logits, dim=-1)).exp())
        ids.append(top_id)
    return torch.cat(tops), torch.cat(ids)


@torch.no_grad()
def answer_perplexity(model, prompts: Sequence[list[int]], answers: Sequence[list[int]], *, pad_id: int,
                      batch_size: int = 16, chunk_size: int = 1024) -> dict[str, float]:
    """exp(mean NLL) of the answer tokens (end of turn included) given each prompt, and the student's calibration
    there: ``ece`` (:func:`expected_calibration_error` of its next-token probabilities) and ``answer_top1``.

    model: a transformers causal LM (or a module wrapping one, e.g. a PeftModel). prompts, answers: token ids;
    sequence i is prompts[i] + answers[i]. Only answer rows go through the lm_head (no [B, T, V] tensor).
    """
    lm = causal_lm_of(model)
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    total_nll, total_tokens = 0.0, 0
    confidences: list[torch.Tensor] = []
    hits: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts, batch_answers = prompts[start:start + batch_size], answers[start:start + batch_size]
        sequences = [p + a for p, a in zip(batch_prompts, batch_answers)]
        input_ids, attention_mask = _right_padded(sequences, pad_id)
        rows, positions = [], []
        for row, (prompt, answer) in enumerate(zip(batch_prompts, batch_answers)):
            rows += [row] * len(answer)
            positions += range(len(prompt), len(prompt) + len(answer))
        row_index = torch.tensor(rows, device=device)
        label_positions = torch.tensor(positions, device=device)
        hidden = lm.get_decoder()(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  use_cache=False).last_hidden_state  # [B, T, H]
        label_ids = input_ids.to(device)[row_index, label_positions]  # [N]
        gathered = student_logprobs_at(hidden[row_index, label_positions - 1], lm.get_output_embeddings(),
                                       label_ids[:, None], label_ids, chunk_size=chunk_size,
                                       logit_softcap=_softcap(lm))
        total_nll -= float(gathered.label_logprobs.double().sum())
        total_tokens += int(label_ids.numel())
        top_probability, top_id = _top_predictions(lm, hidden[row_index, label_positions - 1], chunk_size)
        confidences.append(top_probability.cpu())
        hits.append((top_id == label_ids).cpu())
    if was_training:
        lm.train()
    mean_nll = total_nll / max(total_tokens, 1)
    confidence, correct = (torch.cat(c) if c else torch.zeros(0) for c in (confidences, hits))
    return {"perplexity": math.exp(min(mean_nll, 700.0)), "answer_nll": mean_nll, "answer_tokens": total_tokens,
            "ece": expected_calibration_error(confidence, correct.bool()),
            "answer_top1": float(correct.double().mean()) if correct.numel() else None}


def _softcap(lm) -> float | None:
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    return getattr(config, "final_logit_softcapping", None)


@torch.no_grad()
def held_out_kl(student: DistillStudent, cache: Any, indices: Sequence[int], *, pad_id: int,
                batch_size: int = 16) -> dict[str, float]:
    """Mean forward KL(teacher ‖ student) at τ=1 over the distilled positions of held-out cache samples.

    ``kl_tail_bucket``: over the teacher's top-K ids plus one bucket for the rest of the vocabulary (a lower
    bound of the full KL; what stage two's validation reports). ``kl_top_k``: both distributions renormalized
    over the top-K ids only. ``teacher_kept_mass``: mean Σ exp(top-K teacher logprobs), how much the cache keeps.
    """
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    sums = {"kl_tail_bucket": 0.0, "kl_top_k": 0.0, "teacher_kept_mass": 0.0}
    positions = 0
    for batch in iterate_once(cache, indices, batch_size, pad_id):
        batch = batch.to(device)
        gathered = student(batch.input_ids, batch.attention_mask, batch.row_index, batch.label_positions,
                           batch.topk_ids, batch.label_ids)
        student_lp, teacher_lp = gathered.topk_logprobs.float(), batch.topk_logprobs.float()  # [N, K]
        sums["kl_tail_bucket"] += float(forward_kl(student_lp, teacher_lp, "tail").double().sum())
        sums["kl_top_k"] += float(forward_kl(student_lp, teacher_lp, "renormalize").double().sum())
        sums["teacher_kept_mass"] += float(teacher_lp.double().exp().sum(dim=-1).clamp(max=1.0).sum())
        positions += batch.num_positions
    if was_training:
        student.train()
    return {**{key: value / max(positions, 1) for key, value in sums.items()}, "kl_positions": positions}
