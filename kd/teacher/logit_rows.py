"""From teacher hidden rows to what the cache stores: the one place logits are made and reduced.

Every backend that holds the teacher's final hidden states (hf today; vLLM's pooling runner on the span path)
projects only the scored rows through `LogitHead` and reduces them with `targets_from_hidden_rows`, in chunks
of `chunk` rows, so a full-width fp32 buffer exists for at most `chunk` rows at a time and never for context
positions.

Sampled targets (``cache.targets: sampled | both``): the same full rows give S draws per row from the teacher's
softmax at τ (``RowSampling``), by inverse CDF on uniforms that are a pure function of (seed, row key, position,
draw index) — a counter-based hash, so a row's draws do not depend on its batch, chunk or device — reduced to
the unique ids with their counts (cache_schema/sampled.py).
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


_MIX_1, _MIX_2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 values (wrapping arithmetic): a fast, well-mixed hash."""
    with np.errstate(over="ignore"):
        z = values + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        return z ^ (z >> np.uint64(31))


def sampling_uniforms(seed: int, row_keys: np.ndarray, row_positions: np.ndarray, draws: int) -> np.ndarray:
    """[N] row keys, [N] positions -> [N, S] uniforms in [0, 1), a pure function of (seed, key, position, draw)."""
    keys = np.asarray(row_keys).astype(np.uint64)[:, None]
    positions = np.asarray(row_positions).astype(np.uint64)[:, None]
    draw_index = np.arange(draws, dtype=np.uint64)[None, :]
    hashed = _splitmix64(_splitmix64(_splitmix64(np.uint64(seed) ^ keys) ^ positions) ^ draw_index)  # [N, S]
    return (hashed >> np.uint64(11)).astype(np.float64) * 2.0**-53


def unique_counts(drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, S] drawn ids -> (ids [N, S], counts [N, S]): per row the unique ids ascending with their counts,
    then padding slots (the last unique id, count 0). Vectorised: no loop per row."""
    rows, draws = drawn.shape
    ordered = np.sort(drawn, axis=1)
    first = np.ones_like(ordered, dtype=bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = np.cumsum(first, axis=1) - 1  # [N, S] slot of each draw's unique id
    row_index = np.repeat(np.arange(rows), draws).reshape(rows, draws)
    counts = np.zeros((rows, draws), np.int64)
    np.add.at(counts, (row_index, slot), 1)
    ids = np.full((rows, draws), -1, np.int64)
    ids[row_index[first], slot[first]] = ordered[first]
    return (np.maximum.accumulate(ids, axis=1) if ids.size else ids), counts


@dataclass(frozen=True)
class RowSampling:
    """What to draw per scored row: ``draws`` (S) tokens from the teacher's softmax at ``temperature``.

    row_keys [N]: a stable key of each row's sample (stage one: crc32 of the sample id); row_positions [N]: the
    row's position; with ``seed`` they fix the row's draws (:func:`sampling_uniforms`).
    """

    draws: int
    temperature: float
    seed: int
    row_keys: np.ndarray
    row_positions: np.ndarray


def _draw(logprobs: torch.Tensor, uniforms: np.ndarray, temperature: float) -> np.ndarray:
    """logprobs [c, V] at τ=1, uniforms [c, S] -> [c, S] ids drawn from softmax(logprobs / τ) by inverse CDF."""
    cdf = torch.cumsum(torch.softmax(logprobs / temperature, dim=-1), dim=-1)  # [c, V]
    targets = torch.from_numpy(uniforms).to(cdf.device, cdf.dtype) * cdf[:, -1:]
    # right=True: the first id whose cumulative mass exceeds the target; zero-probability ids are never drawn
    return torch.searchsorted(cdf, targets, right=True).clamp_(max=cdf.shape[1] - 1).cpu().numpy()


@dataclass
class RowTargets:
    """Cache targets for N scored rows.

    topk_ids: [N, K] int64, descending logprob.
    topk_logprobs: [N, K] float32, full-vocabulary log-softmax at temperature 1.
    label_logprobs: [N] float32, logprob of the row's label token.
    log_normalizers: [N, M] float32, log Σ_V p^(1/τ_m) of the same log-softmax, one column per τ_m (M may be 0).
    sampled_ids, sampled_counts: [N, S] int64 (:func:`unique_counts`) when sampling was asked for, else None.
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    label_logprobs: np.ndarray
    log_normalizers: np.ndarray
    sampled_ids: np.ndarray | None = None
    sampled_counts: np.ndarray | None = None

    def rows(self, start: int, stop: int) -> RowTargets:
        """The targets of rows [start, stop)."""
        sampled = (None, None) if self.sampled_ids is None else (self.sampled_ids[start:stop],
                                                                 self.sampled_counts[start:stop])
        return RowTargets(self.topk_ids[start:stop], self.topk_logprobs[start:stop],
                          self.label_logprobs[start:stop], self.log_normalizers[start:stop], *sampled)


@torch.inference_mode()
def targets_from_hidden_rows(
    hidden_rows: torch.Tensor, labels: torch.Tensor, head: LogitHead, top_k: int,
    temperatures: Sequence[float] = (), chunk: int = 256, sampling: RowSampling | None = None,
) -> RowTargets:
    """[N, H] hidden rows (each predicting its label) + [N] labels -> RowTargets.

    Chunks of `chunk` rows bound the fp32 [chunk, V] logits buffer. ``sampling``: also draw its S tokens per row.
    """
    ids_chunks, logprob_chunks, label_chunks, normalizer_chunks, drawn_chunks = [], [], [], [], []
    uniforms = None if sampling is None else sampling_uniforms(sampling.seed, sampling.row_keys,
                                                               sampling.row_positions, sampling.draws)  # [N, S]
    for start in range(0, hidden_rows.shape[0], chunk):
        logprobs = torch.log_softmax(head(hidden_rows[start : start + chunk]), dim=-1)  # [c, V]
        if sampling is not None:
            drawn_chunks.append(_draw(logprobs, uniforms[start : start + chunk], sampling.temperature))
        values, ids = torch.topk(logprobs, top_k, dim=-1, sorted=True)  # [c, K]
        label = logprobs.gather(1, labels[start : start + chunk, None]).squeeze(1)  # [c]
        normalizers = [torch.logsumexp(logprobs / tau, dim=-1) for tau in temperatures]  # M x [c]
        normalizer_chunks.append(torch.stack(normalizers, dim=1).cpu() if normalizers
                                 else torch.zeros((values.shape[0], 0)))
        ids_chunks.append(ids.cpu())
        logprob_chunks.append(values.cpu())
        label_chunks.append(label.cpu())
    sampled = (None, None) if sampling is None else unique_counts(
        np.concatenate(drawn_chunks) if drawn_chunks else np.zeros((0, sampling.draws), np.int64))
    if not ids_chunks:
        return RowTargets(np.zeros((0, top_k), np.int64), np.zeros((0, top_k), np.float32),
                          np.zeros((0,), np.float32), np.zeros((0, len(temperatures)), np.float32), *sampled)
    return RowTargets(
        torch.cat(ids_chunks).numpy().astype(np.int64),
        torch.cat(logprob_chunks).numpy().astype(np.float32),
        torch.cat(label_chunks).numpy().astype(np.float32),
        torch.cat(normalizer_chunks).numpy().astype(np.float32),
        *sampled,
    )
