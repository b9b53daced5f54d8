"""Plain PyTorch causal-LM training of the tiny models on the synthetic task (fp32, CPU, AdamW).

Sequences are the teacher-side sequences of kd.data.prompting.build_pair: a mix of 0-shot and k-shot prompts
(k up to ``max_shots``) so the model answers both ways. The loss covers every token (questions, shot answers
and the final answer); padding is masked out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kd.data.prompting import build_pair, draw_shots
from kd.training.online_gkd import right_padded


@dataclass(frozen=True)
class TrainingPlan:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    zero_shot_fraction: float  # share of sequences with no shots; the rest get 1..max_shots uniformly
    max_shots: int
    seed: int
    weight_decay: float = 0.01


def epoch_sequences(tokenizer, rows: list[dict[str, str]], plan: TrainingPlan, epoch: int) -> list[list[int]]:
    """One token sequence per row; shot counts and shots are deterministic in (plan.seed, epoch, row index)."""
    rng = np.random.default_rng([plan.seed, epoch])
    if plan.max_shots == 0:
        shot_counts = np.zeros(len(rows), dtype=np.int64)
    else:
        shot_counts = np.where(
            rng.random(len(rows)) < plan.zero_shot_fraction, 0, rng.integers(1, plan.max_shots + 1, len(rows))
        )
    sequences = []
    for index, row in enumerate(rows):
        # Shot seed mixes in the epoch so every epoch shows different shots for the same row.
        shot_indices = draw_shots(len(rows), int(shot_counts[index]), plan.seed * 1000 + epoch, index, exclude=index)
        shots = [(rows[i]["question"], rows[i]["answer"]) for i in shot_indices]
        sequences.append(build_pair(tokenizer, row["question"], row["answer"], shots).teacher_input_ids)
    return sequences


def _length_bucketed_batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle, sort within windows of 16 batches by length (less padding), then shuffle the batches."""
    order = rng.permutation(len(lengths))
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window].tolist(), key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] input ids, attention mask and labels (-100 on padding), right padded."""
    input_ids, attention_mask = right_padded(sequences, pad_id)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def _learning_rate(step: int, plan: TrainingPlan) -> float:
    """Linear warmup then cosine decay to 10% of the peak."""
    if step < plan.warmup_steps:
        return plan.learning_rate * (step + 1) / plan.warmup_steps
    progress = (step - plan.warmup_steps) / max(1, plan.steps - plan.warmup_steps)
    return plan.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_causal_lm(
    model,
    tokenizer,
    rows: list[dict[str, str]],
    plan: TrainingPlan,
    log_every: int = 50,
    on_log: Callable[[int], None] | None = None,
) -> dict:
    """Train ``model`` in place for ``plan.steps`` optimizer steps; returns step/token counts and timing.

    on_log: called with the step number at every log point (e.g. a quick held-out check); the model is put
    back in train mode afterwards.
    """
    torch.manual_seed(plan.seed)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=plan.learning_rate, weight_decay=plan.weight_decay, betas=(0.9, 0.98)
    )
    pad_id = tokenizer.pad_token_id
    batch_rng = np.random.default_rng([plan.seed, 99])
    step, epoch, tokens_seen = 0, 0, 0
    losses: list[float] = []
    started = time.perf_counter()
    while step < plan.steps:
        sequences = epoch_sequences(tokenizer, rows, plan, epoch)
        for batch in _length_bucketed_batches([len(s) for s in sequences], plan.batch_size, batch_rng):
            if step >= plan.steps:
                break
            input_ids, attention_mask, labels = _padded([sequences[i] for i in batch], pad_id)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, plan)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            tokens_seen += int(attention_mask.sum())
            step += 1
            if step % log_every == 0 or step == plan.steps:
                elapsed = time.perf_counter() - started
                recent = sum(losses[-log_every:]) / len(losses[-log_every:])
                print(f"step {step}/{plan.steps} epoch {epoch} loss {recent:.4f} {tokens_seen / elapsed:.0f} tok/s", flush=True)
                if on_log is not None:
                    on_log(step)
                    model.train()
        epoch += 1
    model.eval()
    return {
        "steps": step,
        "epochs_started": epoch,
        "tokens_seen": tokens_seen,
        "seconds": time.perf_counter() - started,
        "final_loss": sum(losses[-log_every:]) / max(1, len(losses[-log_every:])),
    }
