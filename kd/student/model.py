"""The student as stage two and evaluation use it: loading its weights, the distillation forward, trainable state.

Which weights train and how the result is exported depends on ``student.mode`` (:mod:`kd.student.modes`).

The forward never asks the causal LM for logits: :class:`DistillStudent` runs the decoder (no lm_head) to get
hidden states [B, T, H], keeps only the N rows that predict a distilled token, and hands them to
:func:`kd.training.losses.student_logprobs_at`, which applies the lm_head in chunks. No [B, T, V] tensor exists.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import Tensor, nn

from kd.config import StudentConfig
from kd.errors import TeacherConfigError, UserError
from kd.relations import capture_projections, decoder_layers, projection_modules, relation_matrices
from kd.training.losses import StudentGather, student_logprobs_at

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STUDENT_DTYPES = ("auto", *_DTYPES)
"""``student.dtype``: ``auto`` (float32 on CPU and for ``full``; a bf16 frozen LoRA base on bf16 GPUs) or explicit."""


# ---------------------------------------------------------------------------------------------------- load


def weights_dtype(cfg: StudentConfig, device_type: str) -> torch.dtype:
    """The dtype the student's weights are loaded in (see ``student.dtype``)."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    # A frozen LoRA base needs no fp32 master copy; full fine-tuning does (AdamW updates in bf16 stall).
    if cfg.mode == "lora" and device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_causal_lm(cfg: StudentConfig, dtype: torch.dtype):
    """The student's initial weights as an AutoModelForCausalLM in ``dtype`` (eager-free default attention)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"student.model={cfg.model!r}: cannot load it as a causal LM "
                        f"({str(exc).splitlines()[0]})") from None


def checkpoint_dtype(model: str) -> torch.dtype:
    """The dtype the student's checkpoint was saved in (the export is written back in it)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model), "dtype", None)
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a mode's module (a PeftModel wraps it; ``full`` is the LM itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# ------------------------------------------------------------------------------------------------ forward


class DistillStudent(nn.Module):
    """The student as stage two calls it: distilled rows in, :class:`StudentGather` out.

    One module (rather than calling the decoder and lm_head from the loop) so accelerate's wrappers (DDP,
    autocast) see every forward: DDP only syncs gradients of parameters used inside its own forward call.
    """

    def __init__(self, model: nn.Module, *, chunk_size: int, relation_layer: int | None = None,
                 relation_heads: int = 0):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.relation_layer = relation_layer
        """Layer whose q/k/v give the student's attention relations (None: no relations computed)."""
        self.relation_heads = relation_heads
        if relation_layer is not None:
            student_projection_modules(causal_lm_of(model), relation_layer, relation_heads)  # fail early
        config = causal_lm_of(model).config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        # Gemma-2-style final logit soft-capping is part of the model's distribution; keep it.
        self.logit_softcap = getattr(text_config, "final_logit_softcapping", None)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, row_index: Tensor, label_positions: Tensor,
                topk_ids: Tensor, label_ids: Tensor, temperature: float = 1.0) -> StudentGather:
        """input_ids, attention_mask [B, T]; row_index, label_positions, label_ids [N]; topk_ids [N, K].

        The token at position p is predicted by the hidden state at p - 1 (p >= 1 in every cache).
        """
        lm = causal_lm_of(self.model)
        with_relations = self.relation_layer is not None
        capture = capture_projections(student_projection_modules(lm, self.relation_layer, self.relation_heads)) \
            if with_relations else nullcontext({})
        with capture as captured:
            hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                      use_cache=False).last_hidden_state  # [B, T, H]
        rows = hidden[row_index, label_positions - 1]  # [N, H]
        gather = student_logprobs_at(rows, lm.get_output_embeddings(), topk_ids, label_ids,
                                     temperature=temperature, chunk_size=self.chunk_size,
                                     logit_softcap=self.logit_softcap)
        if with_relations:
            gather = replace(gather, relations=self._relations(captured, row_index, label_positions,
                                                               input_ids.shape[0]))
        return gather

    def _relations(self, captured: dict[str, Tensor], row_index: Tensor, label_positions: Tensor,
                   batch_size: int) -> list[Tensor]:
        """Per row [3, A_r, n_i, n_i] over the distilled tokens themselves (positions p, as the teacher's
        relations are over its tokens at tp), from the q/k/v outputs [B, T, width] captured in forward."""
        out = []
        for row in range(batch_size):
            positions = label_positions[row_index == row]  # [n_i], the cache's order
            q, k, v = (captured[name][row, positions] for name in ("q_proj", "k_proj", "v_proj"))
            out.append(relation_matrices(q, k, v, self.relation_heads))
        return out


def student_projection_modules(lm: nn.Module, layer: int, num_heads: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(q_proj, k_proj, v_proj) of the student's relation layer, or a UserError naming the student's keys."""
    count = len(decoder_layers(lm))
    if not -count <= layer < count:
        raise UserError(f"student.relation_layer={layer} is out of range for a student with {count} layers; "
                        f"use -{count}..{count - 1}")
    try:
        return projection_modules(lm, layer, num_heads)
    except TeacherConfigError as exc:
        raise UserError(f"student.relation_layer={layer} with teacher.attention.num_heads={num_heads}: "
                        f"{str(exc).splitlines()[0]}") from None


# --------------------------------------------------------------------------------------- trainable state


def trainable_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint must hold of the weights: only parameters that train (the adapter for lora).

    A frozen base is reloaded from student.model on resume; saving it every checkpoint would cost its full
    size on disk each time.
    """
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Copy a :func:`trainable_state_dict` back; refuse one whose names or shapes differ (another model)."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise UserError(f"{where}: checkpoint weights do not fit this student (missing {missing[:2]}, "
                        f"unexpected {extra[:2]}); pass --overwrite to start over")
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != state[name].shape:
                raise UserError(f"{where}: checkpoint weight {name} has shape {tuple(state[name].shape)}, the "
                                f"student's is {tuple(param.shape)}; pass --overwrite to start over")
            param.copy_(state[name].to(param.device, param.dtype))
