"""Greedy-generation exact-match accuracy on GSM8K-format rows (used by the asset build and its README numbers).

Prompts come from stages.prompting, so the evaluated text is exactly what the pipeline trains and caches on.
The predicted answer is the integer after "####" in the generated text (regex ``####\\s*(-?[\\d,]+)``).
"""

from __future__ import annotations

import torch

from stages.prompting import draw_shots, extract_final_answer, prompt_ids


def _left_padded_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask with left padding (generation continues from the right edge)."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


@torch.no_grad()
def greedy_generate(
    model, tokenizer, prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int = 64, batch_size: int = 32
) -> list[str]:
    """Greedy continuations (special tokens dropped) for each prompt, in the prompts' order."""
    model.eval()
    pad_id = tokenizer.pad_token_id
    # Length-sorted batches keep left padding small.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch_indices = order[start : start + batch_size]
        input_ids, attention_mask = _left_padded_batch([prompts[i] for i in batch_indices], pad_id)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
        )
        new_tokens = generated[:, input_ids.shape[1] :]
        for row, index in enumerate(batch_indices):
            completions[index] = tokenizer.decode(new_tokens[row].tolist(), skip_special_tokens=True)
    return completions


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
    correct = [
        extract_final_answer(completion) is not None
        and extract_final_answer(completion) == extract_final_answer(row["answer"])
        for completion, row in zip(completions, rows, strict=True)
    ]
    return {
        "num_fewshot": num_fewshot,
        "num_rows": len(rows),
        "num_correct": int(sum(correct)),
        "exact_match": sum(correct) / len(rows),
        "correct": correct,
        "completions": completions,
    }
