"""Greedy-generation exact-match accuracy on GSM8K-format rows (used by the asset build and its README numbers).

Prompts come from kd.data.prompting, so the evaluated text is exactly what the pipeline trains and caches on.
The predicted answer is the number after "####" in the generated text, read by the evaluation's own extractor
(:func:`kd.evaluation.answers.extract_answer`, no fallback to the last number).
"""

from __future__ import annotations

from kd.data.prompting import draw_shots, prompt_ids
from kd.evaluation.answers import extract_answer, is_correct, reference_answer
from kd.evaluation.generation import greedy_generate


def exact_match_accuracy(
    model,
    tokenizer,
    rows: list[dict[str, str]],
    shot_pool: list[dict[str, str]],
    num_fewshot: int,
    stop_ids: list[int],
    seed: int = 0,
    max_new_tokens: int = 64,
) -> dict:
    """Share of rows whose generated final answer equals the reference's; shots drawn from ``shot_pool``."""
    prompts = []
    for index, row in enumerate(rows):
        shot_indices = draw_shots(len(shot_pool), num_fewshot, seed, index, exclude=None)
        shots = [(shot_pool[i]["question"], shot_pool[i]["answer"]) for i in shot_indices]
        prompts.append(prompt_ids(tokenizer, row["question"], shots))
    completions = greedy_generate(model, tokenizer, prompts, stop_ids, max_new_tokens)
    correct = [is_correct(extract_answer(completion, fallback="none"), reference_answer(row["answer"]))
               for completion, row in zip(completions, rows, strict=True)]
    return {
        "num_fewshot": num_fewshot,
        "num_rows": len(rows),
        "num_correct": int(sum(correct)),
        "exact_match": sum(correct) / len(rows),
        "correct": correct,
        "completions": completions,
    }
