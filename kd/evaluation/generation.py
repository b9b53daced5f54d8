"""Greedy generation for evaluation: transformers ``generate`` or a vLLM engine, over token-id prompts.

Both engines take the prompts as token ids built by :mod:`kd.data.prompting` (so evaluation sees exactly the
text the pipeline trains and caches on), decode greedily, stop at the template's end of turn / eos token or at
any configured stop string, and return the continuation text without special tokens.

vLLM serves one base model per engine; LoRA checkpoints of the same base are passed as LoRA requests, so a
sweep over adapter checkpoints starts one engine (engine start costs tens of seconds, more than generating a
test split on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kd.data.prompting import end_of_turn_ids
from kd.tokenizer import pad_token_id

EVAL_BACKENDS = ("auto", "vllm", "hf")
"""``eval.backend``: vLLM, transformers ``generate``, or ``auto`` (:func:`resolve_backend`)."""


def resolve_backend(setting: str) -> str:
    """``auto``: vllm when importable and a GPU is present, else transformers (on CPU an engine start costs
    more than generating a small test split)."""
    if setting != "auto":
        return setting
    if not torch.cuda.is_available():
        return "hf"
    try:
        import vllm  # noqa: F401
    except Exception:  # vllm fails with ImportError, OSError or RuntimeError when its build does not fit
        return "hf"
    return "vllm"


@dataclass(frozen=True)
class GenerationSettings:
    """What every engine must honour."""

    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    batch_size: int = 32
    """transformers: prompts per generate call (length-sorted); vLLM schedules all prompts itself."""


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: the last id of the template's end of turn, and eos."""
    ids = [end_of_turn_ids(tokenizer)[-1]]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def _left_padded_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask with left padding (generation continues from the right edge)."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def _cut_at_stop_strings(text: str, stop_strings: tuple[str, ...]) -> str:
    """The text before the first stop string (transformers stops *after* generating it; vLLM drops it)."""
    cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int = 64,
                    batch_size: int = 32, stop_strings: tuple[str, ...] = ()) -> list[str]:
    """transformers: greedy continuations (special tokens dropped) for each prompt, in the prompts' order."""
    was_training = model.training
    model.eval()
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    # Length-sorted batches keep left padding small.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch_indices = order[start:start + batch_size]
        input_ids, attention_mask = _left_padded_batch([prompts[i] for i in batch_indices], pad_id)
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                   pad_token_id=pad_id, use_cache=True, **extra)
        new_tokens = generated[:, input_ids.shape[1]:].cpu()
        for row, index in enumerate(batch_indices):
            text = tokenizer.decode(new_tokens[row].tolist(), skip_special_tokens=True)
            completions[index] = _cut_at_stop_strings(text, stop_strings)
    if was_training:
        model.train()
    return completions


class HFGenerator:
    """Generation with an already loaded transformers model (any student mode's module, or the teacher)."""

    def __init__(self, model, tokenizer, settings: GenerationSettings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings

    def generate(self, prompts: list[list[int]]) -> list[str]:
        s = self.settings
        return greedy_generate(self.model, self.tokenizer, prompts, stop_token_ids(self.tokenizer),
                               s.max_new_tokens, s.batch_size, s.stop_strings)


class VllmGenerator:
    """One vLLM engine over ``model_dir``; ``generate(prompts, lora_dir=...)`` for adapters of that base."""

    def __init__(self, model_dir: str, tokenizer, settings: GenerationSettings, *, engine_args: dict[str, Any],
                 max_lora_rank: int | None = None):
        from vllm import LLM

        lora_args = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": 1} if max_lora_rank else {}
        self.engine = LLM(model=model_dir, tokenizer=model_dir, **engine_args, **lora_args)
        self.tokenizer, self.settings = tokenizer, settings
        self._lora_ids: dict[str, int] = {}

    def generate(self, prompts: list[list[int]], lora_dir: str | None = None) -> list[str]:
        from vllm import SamplingParams

        s = self.settings
        params = SamplingParams(temperature=0.0, max_tokens=s.max_new_tokens, stop=list(s.stop_strings) or None,
                                stop_token_ids=stop_token_ids(self.tokenizer), skip_special_tokens=True)
        request = None
        if lora_dir is not None:
            from vllm.lora.request import LoRARequest

            lora_id = self._lora_ids.setdefault(lora_dir, len(self._lora_ids) + 1)
            request = LoRARequest(f"adapter-{lora_id}", lora_id, lora_dir)
        outputs = self.engine.generate([{"prompt_token_ids": ids} for ids in prompts], params,
                                       lora_request=request, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]

    def close(self) -> None:
        """Free the engine (its worker processes and memory) before the next one starts."""
        engine = getattr(self, "engine", None)
        self.engine = None
        if engine is not None:
            shutdown = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            del engine
