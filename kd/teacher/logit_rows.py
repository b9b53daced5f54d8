"""From teacher hidden rows to what the cache stores: the one place logits are made and reduced.

Every backend that holds the teacher's final hidden states (hf today; vLLM's pooling runner on the span path)
projects only the scored rows through `LogitHead` and reduces them with `targets_from_hidden_rows`, in chunks
of `chunk` rows, so a full-width fp32 buffer exists for at most `chunk` rows at a time and never for context
positions.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


class LogitHead:
    """The teacher's final projection: lm_head, then the architecture's soft-cap (Gemma 2/3) when it has one."""

    def __init__(self, lm_head: torch.nn.Module, softcap: float | None = None):
        self.lm_head = lm_head
        self.softcap = softcap

    @property
    def vocab_size(self) -> int:
        """Logit row width V (the padded lm_head rows, e.g. 151,936 for Qwen)."""
        return int(self.lm_head.weight.shape[0])

    def __call__(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """[N, H] hidden rows -> [N, V] fp32 logits (softcapping applied as the model's forward does)."""
        logits = self.lm_head(hidden_rows).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass
class RowTargets:
    """Cache targets for N scored rows.

    topk_ids: [N, K] int64, descending logprob.
    topk_logprobs: [N, K] float32, full-vocabulary log-softmax at temperature 1.
    label_logprobs: [N] float32, logprob of the row's label token.
    log_normalizers: [N, M] float32, log Σ_V p^(1/τ_m) of the same log-softmax, one column per τ_m (M may be 0).
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    label_logprobs: np.ndarray
    log_normalizers: np.ndarray

    def rows(self, start: int, stop: int) -> RowTargets:
        """The targets of rows [start, stop)."""
        return RowTargets(self.topk_ids[start:stop], self.topk_logprobs[start:stop],
                          self.label_logprobs[start:stop], self.log_normalizers[start:stop])


@torch.inference_mode()
def targets_from_hidden_rows(
    hidden_rows: torch.Tensor, labels: torch.Tensor, head: LogitHead, top_k: int,
    temperatures: Sequence[float] = (), chunk: int = 256,
) -> RowTargets:
    """[N, H] hidden rows (each predicting its label) + [N] labels -> RowTargets.

    Chunks of `chunk` rows bound the fp32 [chunk, V] logits buffer.
    """
    ids_chunks, logprob_chunks, label_chunks, normalizer_chunks = [], [], [], []
    for start in range(0, hidden_rows.shape[0], chunk):
        logprobs = torch.log_softmax(head(hidden_rows[start : start + chunk]), dim=-1)  # [c, V]
        values, ids = torch.topk(logprobs, top_k, dim=-1, sorted=True)  # [c, K]
        label = logprobs.gather(1, labels[start : start + chunk, None]).squeeze(1)  # [c]
        normalizers = [torch.logsumexp(logprobs / tau, dim=-1) for tau in temperatures]  # M x [c]
        normalizer_chunks.append(torch.stack(normalizers, dim=1).cpu() if normalizers
                                 else torch.zeros((values.shape[0], 0)))
        ids_chunks.append(ids.cpu())
        logprob_chunks.append(values.cpu())
        label_chunks.append(label.cpu())
    if not ids_chunks:
        return RowTargets(np.zeros((0, top_k), np.int64), np.zeros((0, top_k), np.float32),
                          np.zeros((0,), np.float32), np.zeros((0, len(temperatures)), np.float32))
    return RowTargets(
        torch.cat(ids_chunks).numpy().astype(np.int64),
        torch.cat(logprob_chunks).numpy().astype(np.float32),
        torch.cat(label_chunks).numpy().astype(np.float32),
        torch.cat(normalizer_chunks).numpy().astype(np.float32),
    )
