"""Teacher scoring with a transformers causal LM (also the only backend that captures attention relations).

Per batch: run the base model (no lm_head) to get last hidden states [B, T, H], gather only the rows at the
predicting positions tp - 1 of every request ([N, H]), then reduce them with kd.teacher.logit_rows (lm_head in
chunks of `logprob_chunk` rows: fp32 logits -> log_softmax -> topk). The full [B, T, V] logit tensor is never built.
Requests sharing a long prefix (``data.fewshot_sets``; found by kd.teacher.shared_prefix) run it once and their
suffixes in batches on a copy of its ``past_key_values`` (not with relations, which need the prefix's Q/K/V).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from kd.config import TeacherConfig
from kd.errors import TeacherConfigError
from kd.relations import capture_projections, projection_modules, relation_matrices
from kd.teacher.logit_rows import LogitHead, RowSampling, targets_from_hidden_rows
from kd.teacher.shared_prefix import shared_prefix_groups
from kd.teacher.types import (
    SamplingSpec,
    ScoreRequest,
    ScoreResult,
    check_top_k_fits,
    checked_request_arrays,
    empty_result,
)

# fp32 probe tolerance when checking that lm_head(+softcap) reproduces model(...).logits at load time.
LOGIT_PROBE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.05}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_hf_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy for a reference teacher)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def length_sorted_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Group request indices, longest first, so that len(batch) * longest <= max_batch_tokens.

    A single sequence longer than the budget forms a batch of its own (it is never cut).
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1) * longest > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class HFTeacherBackend:
    """TeacherBackend over transformers AutoModelForCausalLM (sdpa attention, eval, inference mode)."""

    def __init__(self, teacher: TeacherConfig, *, device: str = "auto"):
        from transformers import AutoModelForCausalLM

        self.teacher = teacher
        self.device = resolve_device(device)
        self.dtype = resolve_hf_dtype(teacher.dtype, self.device)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                teacher.model, dtype=self.dtype, attn_implementation="sdpa"
            )
        except OSError as error:
            raise TeacherConfigError(
                f"teacher.model={teacher.model!r} cannot be loaded by transformers ({error}); point it at a "
                "local model directory"
            ) from error
        self.model.to(self.device).eval()
        self.decoder = self.model.get_decoder()
        self.head = LogitHead(self.model.get_output_embeddings(),
                              getattr(self.model.config, "final_logit_softcapping", None))
        self.vocab_size = self.head.vocab_size
        self.top_k = teacher.top_k
        check_top_k_fits(self.top_k, self.vocab_size, teacher.model)
        self.max_len = getattr(self.model.config, "max_position_embeddings", None)
        self.relation_modules = None
        if teacher.attention.enabled:
            self.relation_modules = projection_modules(
                self.model, teacher.attention.layer, teacher.attention.num_heads
            )
        self._check_logit_path()

    def close(self) -> None:
        self.model = self.decoder = self.head = self.relation_modules = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def _check_logit_path(self) -> None:
        """Fail loudly if this architecture transforms logits in a way lm_head(+softcap) does not reproduce.

        Some models scale logits inside forward (Cohere logit_scale, Granite logits_scaling); scoring them with
        the plain lm_head would silently return wrong distributions.
        """
        probe = torch.arange(8, device=self.device).remainder(self.vocab_size).unsqueeze(0)  # [1, 8]
        expected = self.model(input_ids=probe).logits.float()  # [1, 8, V]
        hidden = self.decoder(input_ids=probe).last_hidden_state
        actual = self.head(hidden[0])
        error = (expected[0] - actual).abs().max().item()
        if error > LOGIT_PROBE_TOLERANCE.get(self.dtype, 0.1) * max(1.0, expected.abs().max().item()):
            raise TeacherConfigError(
                f"{type(self.model).__name__} ({self.teacher.model}) transforms its logits beyond lm_head and "
                f"final_logit_softcapping (max deviation {error:.3g}); the hf teacher backend does not support it"
            )

    def score(self, requests: list[ScoreRequest], temperatures: Sequence[float] = (),
              sampling: SamplingSpec | None = None) -> list[ScoreResult]:
        """Score requests in length-sorted batches; results come back in request order. With ``temperatures``
        each result also holds log Σ_V p^(1/τ) per position and τ (``log_normalizers`` [n, M]); with ``sampling``
        its sampled targets (``sampled_ids`` / ``sampled_counts`` [n, S])."""
        if self.model is None:
            raise RuntimeError("HFTeacherBackend.score called after close()")
        temperatures = tuple(float(t) for t in temperatures)
        checked = [checked_request_arrays(r, i, self.vocab_size, self.max_len) for i, r in enumerate(requests)]
        results: list[ScoreResult | None] = [None] * len(requests)
        # Tokens after max(tp) influence no requested distribution (causal); relations need the token at tp.
        needed = [int(positions.max()) + 1 if positions.size else 0 for _, positions in checked]
        for index, length in enumerate(needed):
            if length == 0:
                results[index] = empty_result(
                    self.top_k, self.relation_modules is not None, self._relation_heads(), len(temperatures),
                    sampling.draws if sampling else 0)
        scored = [index for index, length in enumerate(needed) if length > 0]
        if self.relation_modules is None:  # relations need the prefix's projections: no reuse with them
            for group, prefix_length in shared_prefix_groups(checked, scored):
                group_results = self._score_on_prefix([checked[i] for i in group], [needed[i] for i in group],
                                                      prefix_length, temperatures,
                                                      [requests[i] for i in group], sampling)
                for index, result in zip(group, group_results):
                    results[index] = result
            scored = [index for index in scored if results[index] is None]
        for batch in length_sorted_batches([needed[i] for i in scored], self.teacher.max_batch_tokens):
            indices = [scored[b] for b in batch]
            batch_results = self._score_batch([checked[i] for i in indices], [needed[i] for i in indices],
                                              temperatures, _row_sampling(sampling, [requests[i] for i in indices],
                                                                          [checked[i][1] for i in indices]))
            for index, result in zip(indices, batch_results):
                results[index] = result
        return results  # type: ignore[return-value]

    def _relation_heads(self) -> int:
        return self.teacher.attention.num_heads if self.teacher.attention.enabled else 0

    @torch.inference_mode()
    def _score_on_prefix(self, arrays: list[tuple[np.ndarray, np.ndarray]], lengths: list[int], prefix_length: int,
                         temperatures: tuple[float, ...], requests: list[ScoreRequest],
                         sampling: SamplingSpec | None = None) -> list[ScoreResult]:
        """Requests sharing their first ``prefix_length`` tokens: the prefix runs once, then length-sorted
        batches of the suffixes run on a copy of its ``past_key_values``; scored rows all lie in the suffixes."""
        prefix = torch.from_numpy(arrays[0][0][:prefix_length])[None].to(self.device)  # [1, L]
        prefix_cache = self.decoder(input_ids=prefix, use_cache=True).past_key_values
        results: list[ScoreResult | None] = [None] * len(arrays)
        suffix_lengths = [length - prefix_length for length in lengths]
        budget = max(1, self.teacher.max_batch_tokens - prefix_length)
        for batch in length_sorted_batches(suffix_lengths, budget):
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(batch))
            longest = max(suffix_lengths[b] for b in batch)
            input_ids = torch.zeros((len(batch), longest), dtype=torch.long)  # [B, S]
            attention_mask = torch.zeros((len(batch), prefix_length + longest), dtype=torch.long)  # [B, L + S]
            attention_mask[:, :prefix_length] = 1
            for row, b in enumerate(batch):
                ids = arrays[b][0]
                input_ids[row, : suffix_lengths[b]] = torch.from_numpy(ids[prefix_length : lengths[b]])
                attention_mask[row, prefix_length : lengths[b]] = 1
            hidden = self.decoder(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                  past_key_values=cache, use_cache=True).last_hidden_state  # [B, S, H]
            positions = [arrays[b][1] for b in batch]
            row_index = torch.cat([torch.full((p.size,), r, dtype=torch.long) for r, p in enumerate(positions)])
            target_pos = torch.from_numpy(np.concatenate(positions)).long()  # [N] positions tp
            labels = torch.from_numpy(np.concatenate([arrays[b][0][arrays[b][1]] for b in batch]))  # [N]
            rows = hidden[row_index.to(self.device), (target_pos - 1 - prefix_length).to(self.device)]  # [N, H]
            targets = targets_from_hidden_rows(rows, labels.to(self.device), self.head, self.top_k, temperatures,
                                               self.teacher.logprob_chunk,
                                               _row_sampling(sampling, [requests[b] for b in batch], positions))
            start = 0
            for b, scored in zip(batch, positions):
                results[b] = _result(targets.rows(start, start + scored.size), None, temperatures)
                start += scored.size
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_batch(
        self, arrays: list[tuple[np.ndarray, np.ndarray]], lengths: list[int], temperatures: tuple[float, ...],
        sampling: RowSampling | None = None,
    ) -> list[ScoreResult]:
        """One right-padded forward over `arrays` (ids [Tt], positions [n]) cut to `lengths` tokens each."""
        batch_size, longest = len(arrays), max(lengths)
        input_ids = torch.zeros((batch_size, longest), dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)  # [B, T]
        for row, ((ids, _), length) in enumerate(zip(arrays, lengths)):
            input_ids[row, :length] = torch.from_numpy(ids[:length])
            attention_mask[row, :length] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)

        row_index = torch.cat([torch.full((p.size,), r, dtype=torch.long) for r, (_, p) in enumerate(arrays)])
        target_pos = torch.from_numpy(np.concatenate([p for _, p in arrays])).long()  # [N] positions tp
        row_index, target_pos = row_index.to(self.device), target_pos.to(self.device)

        if self.relation_modules is None:
            hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            projections = None
        else:
            with capture_projections(self.relation_modules) as captured:
                hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            projections = dict(captured)
        predicting_rows = hidden[row_index, target_pos - 1]  # [N, H] rows at tp - 1
        labels = input_ids[row_index, target_pos]  # [N]
        targets = targets_from_hidden_rows(predicting_rows, labels, self.head, self.top_k, temperatures,
                                           self.teacher.logprob_chunk, sampling)

        results = []
        start = 0
        for row, (_, positions) in enumerate(arrays):
            stop = start + positions.size
            relations = None
            if projections is not None:
                # answer tokens themselves (tp), fp32 so bf16 teachers still store fp32 relations
                q, k, v = (
                    projections[name][row, target_pos[start:stop]].float() for name in ("q_proj", "k_proj", "v_proj")
                )
                relations = relation_matrices(q, k, v, self.teacher.attention.num_heads).cpu().numpy()
            results.append(_result(targets.rows(start, stop), relations, temperatures))
            start = stop
        return results


def _row_sampling(spec: SamplingSpec | None, requests: list[ScoreRequest],
                  positions: list[np.ndarray]) -> RowSampling | None:
    """The per-row draw keys of one batch: each request's sample key at each of its scored positions tp."""
    if spec is None:
        return None
    keys = np.concatenate([np.full(p.size, r.sample_key, np.int64) for r, p in zip(requests, positions)])
    return RowSampling(spec.draws, spec.temperature, spec.seed, keys, np.concatenate(positions))


def _result(rows, relations: np.ndarray | None, temperatures: tuple[float, ...]) -> ScoreResult:
    """One request's ScoreResult from its RowTargets (log-normalizers only when temperatures were asked)."""
    return ScoreResult(topk_ids=rows.topk_ids, topk_logprobs=rows.topk_logprobs,
                       label_logprobs=rows.label_logprobs, relations=relations,
                       log_normalizers=rows.log_normalizers if temperatures else None,
                       sampled_ids=rows.sampled_ids, sampled_counts=rows.sampled_counts)
