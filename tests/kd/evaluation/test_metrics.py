"""Evaluation metrics against dense references: answer perplexity, held-out KL, completion scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cache_schema import open_cache
from kd.evaluation.metrics import answer_perplexity, expected_calibration_error, held_out_kl, score_completions
from kd.student.model import DistillStudent
from pipeline.config_loader import ASSETS_DIR


@pytest.fixture(scope="module")
def tiny_student():
    path = ASSETS_DIR / "tiny" / "student"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def test_score_completions_counts_methods_and_matches():
    references = ["... #### 7", "... #### 1,000", "... #### -2", "... #### 5"]
    completions = ["3 + 4 = 7 #### 7", "it is 1000", "#### 2", "no idea"]
    summary, records = score_completions(completions, references, "last_number")
    assert [r["correct"] for r in records] == [True, True, False, False]
    assert [r["extraction"] for r in records] == ["mark", "last_number", "mark", "none"]
    assert summary == {"samples": 4, "num_correct": 2, "exact_match": 0.5, "marked": 2, "fallback": 1,
                       "no_answer": 1, "no_answer_rate": 0.25, "fallback_rate": 0.25}
    strict, _ = score_completions(completions, references, "none")
    assert strict["num_correct"] == 1 and strict["no_answer"] == 2
    with pytest.raises(ValueError, match="2 completions for 1 references"):
        score_completions(["a", "b"], ["#### 1"], "none")


def test_answer_perplexity_matches_a_dense_forward(tiny_student):
    model, tokenizer = tiny_student
    prompts = [tokenizer.encode("Ruby has 4 apples."), tokenizer.encode("Leo has 5 candies. How many?")]
    answers = [tokenizer.encode(" 4 / 2 = 2. #### 2"), tokenizer.encode(" 5 + 6 = 11. #### 11 done")]
    # batch_size 1 and 2: padding must not change the numbers; chunk_size 3 splits the lm_head rows
    got = [answer_perplexity(model, prompts, answers, pad_id=0, batch_size=b, chunk_size=3) for b in (1, 2)]
    nll, count, confidences, hits = 0.0, 0, [], []
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            ids = torch.tensor([prompt + answer])
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # [T, V]
            for k, token in enumerate(answer):
                row = logprobs[len(prompt) + k - 1]
                nll -= float(row[token])
                count += 1
                confidences.append(float(row.max().exp()))
                hits.append(int(row.argmax()) == token)
    # dense ECE by hand: 15 equal-width bins, |accuracy - confidence| weighted by the bin's share
    bins = [min(int(c * 15), 14) for c in confidences]
    want_ece = sum(abs(sum(h for h, b in zip(hits, bins) if b == k) - sum(c for c, b in zip(confidences, bins)
                                                                         if b == k)) for k in range(15)) / count
    for result in got:
        assert result["ece"] == pytest.approx(want_ece, abs=1e-6)
        assert result["answer_top1"] == pytest.approx(sum(hits) / count)
        assert result["answer_tokens"] == count
        assert result["answer_nll"] == pytest.approx(nll / count, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_expected_calibration_error_on_known_bins():
    confidences = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.25, 0.25])
    correct = torch.tensor([True, True, True, False, False, True])
    # bin of 0.95: accuracy 0.75 vs 0.95 (4 of 6); bin of 0.25: accuracy 0.5 vs 0.25 (2 of 6)
    assert expected_calibration_error(confidences, correct) == pytest.approx(4 / 6 * 0.2 + 2 / 6 * 0.25)
    assert expected_calibration_error(torch.ones(3), torch.ones(3, dtype=torch.bool)) == 0.0  # the top bin is closed
    assert expected_calibration_error(torch.zeros(0), torch.zeros(0, dtype=torch.bool)) == 0.0


def _dense_tail_kl(teacher_lp: np.ndarray, student_lp: np.ndarray) -> float:
    """KL over the K kept ids plus one bucket for the rest, from probabilities (float64)."""
    p, q = np.exp(teacher_lp), np.exp(student_lp)
    p_tail, q_tail = max(1.0 - p.sum(), 0.0), max(1.0 - q.sum(), 1e-300)
    kl = float(np.sum(p * (teacher_lp - student_lp)))
    return kl + (p_tail * math.log(p_tail / q_tail) if p_tail > 0 else 0.0)


def test_held_out_kl_matches_a_dense_reference(tiny_student, tiny_hf_cache):
    model, tokenizer = tiny_student
    cache = open_cache(tiny_hf_cache.cache.path)
    indices = [1, 4, 7, 10]
    result = held_out_kl(DistillStudent(model, chunk_size=5), cache, indices, pad_id=tokenizer.pad_token_id,
                         batch_size=3)
    tail_kls, topk_kls, kept = [], [], []
    with torch.no_grad():
        for index in indices:
            sample = cache[index]
            logits = model(torch.tensor(sample["input_ids"][None], dtype=torch.long)).logits[0].double()
            logprobs = torch.log_softmax(logits, dim=-1).numpy()  # [T, V]
            for row, position in enumerate(sample["label_positions"]):
                teacher = sample["topk_logprobs"][row].astype(np.float64)
                student = logprobs[position - 1, sample["topk_ids"][row]]
                tail_kls.append(_dense_tail_kl(teacher, student))
                p = np.exp(teacher) / np.exp(teacher).sum()
                q = np.exp(student) / np.exp(student).sum()
                topk_kls.append(float(np.sum(p * np.log(p / q))))
                kept.append(float(np.exp(teacher).sum()))
    assert result["kl_positions"] == len(tail_kls)
    assert result["kl_tail_bucket"] == pytest.approx(np.mean(tail_kls), rel=2e-3)
    assert result["kl_top_k"] == pytest.approx(np.mean(topk_kls), rel=2e-3)
    assert result["teacher_kept_mass"] == pytest.approx(np.mean(kept), rel=1e-4)
    assert result["kl_tail_bucket"] > result["kl_top_k"] > 0  # an untrained student: far from the teacher
