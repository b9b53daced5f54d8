"""Scale teacher and student: Qwen3ForCausalLM at Qwen's padded vocabulary (151,936 rows), and how they train.

The shapes are the tiny assets' (pipeline.assets.tiny_models): the teacher's non-embedding compute is ~6x the
student's. At this vocabulary the tied embedding / lm_head is most of each model (38.9M of the teacher's 41M
parameters), so a full-vocabulary softmax costs ~15x the decoder per training token. Training therefore runs in
two phases, both through pipeline.assets.lm_training.train_causal_lm:

1. the task phase: a compact model (the teacher warm-started from the shipped tiny teacher, same shape) whose vocabulary is the task's own token ids (:class:`TaskVocabularyLM`,
   ~150 rows), which is where the model learns the task at the tiny models' cost; its rows are then written
   into the real-vocabulary model at their real ids;
2. a short full-vocabulary phase (the model's own loss over all 151,936 rows), which pushes the probability of
   every other row down, so the distributions are peaked over the real vocabulary as a trained model's are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from pipeline.assets.scale.real_tokenizer import ENDOFTEXT, QWEN_VOCAB_SIZE
from pipeline.assets.tiny_models import TinyShape, make_config

MAX_POSITIONS = 4096  # 8-shot prompts of the rewritten task are ~700 tokens; room for the context-length rows


def make_scale_config(shape: TinyShape, tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    config = make_config(shape, tokenizer)
    config.vocab_size = QWEN_VOCAB_SIZE
    config.max_position_embeddings = MAX_POSITIONS
    return config


def make_scale_model(shape: TinyShape, tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen3ForCausalLM:
    """A freshly initialised fp32 model at the real vocabulary; the seed fixes the init."""
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(make_scale_config(shape, tokenizer)).to(torch.float32)


def task_token_ids(sequences: list[list[int]], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """[S] the sorted distinct token ids of the task sequences plus pad/eos (the task phase's softmax rows)."""
    ids = {token for sequence in sequences for token in sequence}
    ids |= {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(ENDOFTEXT)}
    return torch.tensor(sorted(ids), dtype=torch.long)


class TaskVocabularyLM(torch.nn.Module):
    """The task phase: a compact Qwen3 model whose vocabulary is only ``task_ids`` (id ``task_ids[i]`` is row i).

    Called like a transformers model by train_causal_lm (``input_ids``, ``attention_mask``, ``labels`` [B, T] in
    real Qwen ids; returns the model output, whose ``.loss`` is the softmax over the task rows only). The decoder
    is the full model's; :meth:`expanded` writes the trained rows into a model of the real vocabulary.
    """

    def __init__(self, shape: TinyShape, tokenizer: PreTrainedTokenizerFast, task_ids: torch.Tensor, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        config = make_scale_config(shape, tokenizer)
        config.vocab_size = len(task_ids)
        row = {int(token): index for index, token in enumerate(task_ids)}
        config.pad_token_id, config.bos_token_id = row[config.pad_token_id], row[config.bos_token_id]
        config.eos_token_id = row[config.eos_token_id]
        self.model = Qwen3ForCausalLM(config).to(torch.float32)
        self.register_buffer("task_ids", task_ids, persistent=False)
        row_of_id = torch.full((QWEN_VOCAB_SIZE,), -1, dtype=torch.long)
        row_of_id[task_ids] = torch.arange(len(task_ids))
        self.register_buffer("row_of_id", row_of_id, persistent=False)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.where(ids == -100, ids, self.row_of_id[ids.clamp(min=0)])
        if bool((rows == -1).any()):
            raise ValueError("a token id is not among the task ids")
        return rows

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        return self.model(input_ids=self._rows(input_ids), attention_mask=attention_mask, labels=self._rows(labels))

    @torch.no_grad()
    def warm_start(self, donor_dir: Path, tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
        """Start from a trained model of the same shape (the shipped tiny teacher): its decoder, and its
        embedding row for every task token whose text is one token of the donor's tokenizer (digits, " with",
        "<|im_start|>", ...); the other rows (the rewrite's names, objects, operators) keep their init."""
        donor = AutoModelForCausalLM.from_pretrained(str(donor_dir), dtype=torch.float32)
        donor_tokenizer = AutoTokenizer.from_pretrained(str(donor_dir))
        state = {k: v for k, v in donor.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
        self.model.load_state_dict(state, strict=False)
        donor_rows, copied = donor.get_input_embeddings().weight, 0
        for row, token_id in enumerate(self.task_ids.tolist()):
            donor_ids = donor_tokenizer.encode(tokenizer.decode([token_id]), add_special_tokens=False)
            if len(donor_ids) == 1:
                self.model.model.embed_tokens.weight[row] = donor_rows[donor_ids[0]]
                copied += 1
        return {"donor": donor_dir.name, "rows_copied": copied, "task_rows": len(self.task_ids)}

    def expanded(self, full: Qwen3ForCausalLM) -> Qwen3ForCausalLM:
        """``full`` (real vocabulary, freshly initialised) with this decoder and the task rows of the embedding;
        every other row keeps its initialisation (the full-vocabulary phase then pushes those rows down)."""
        state = {k: v for k, v in self.model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
        missing, unexpected = full.load_state_dict(state, strict=False)
        if unexpected or any("embed_tokens" not in k and "lm_head" not in k for k in missing):
            raise RuntimeError(f"decoder mismatch: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            full.model.embed_tokens.weight[self.task_ids] = self.model.model.embed_tokens.weight
        return full


def non_embedding_parameters(model: Qwen3ForCausalLM) -> int:
    """Parameters outside the (tied) embedding / lm_head: what sets the decoder's compute per token."""
    return sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lm_head" not in name)
