"""Teacher scoring through vLLM's pooling runner: final hidden states, lm_head only at the scored rows.

The engine runs the teacher as a token-embedding model (``runner="pooling"``, ``convert="embed"``, task
``token_embed``, ``use_activation=False``): ``llm.encode`` returns, per prompt, the final-norm hidden states
[T', H] in fp32 (pooling models run their head in fp32), nothing of size [T, V]. The teacher's own lm_head
(the tied input embedding when ``tie_word_embeddings``) is read from the checkpoint with safetensors (that one
tensor, no second model) into a :class:`~kd.teacher.logit_rows.LogitHead` with the architecture's soft-cap;
:func:`~kd.teacher.logit_rows.targets_from_hidden_rows` then reduces only the rows at ``tp - 1`` (the same code
as the hf backend), in chunks, on the GPU when there is one.

Prefix caching: pooling requests read vLLM's prefix cache when ``skip_reading_prefix_cache=False``; the engine
then computes (and returns hidden states for) only the last ``T - num_cached_tokens`` positions. Row ``r`` of
the output is position ``num_cached_tokens + r``. A request whose predicting rows fall inside the cached part
(a duplicate sequence) is sent again with the cache read disabled. Shots shared between samples
(``data.fewshot_sets``) are therefore prefilled once per set.

Exactness: the logits are lm_head(+soft-cap) of the final hidden state only for the architectures listed in
:data:`SPAN_EXACT_ARCHITECTURES` with none of :data:`LOGIT_TRANSFORM_KEYS` set; others are refused
(:func:`span_refusal`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig

from kd.config import TeacherConfig
from kd.errors import TeacherConfigError
from kd.teacher.logit_rows import LogitHead, targets_from_hidden_rows
from kd.teacher.shared_prefix import prefix_leader_waves
from kd.teacher.types import ScoreRequest, ScoreResult, check_top_k_fits, checked_request_arrays, empty_result
from kd.teacher.vllm_backend import common_engine_args, import_vllm_for, shutdown_engine

SPAN_EXACT_ARCHITECTURES = (
    "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "LlamaForCausalLM",
    "MistralForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "Olmo2ForCausalLM",
)
"""Architectures whose final logits are ``lm_head(final_norm(h))`` (then ``final_logit_softcapping`` if set)."""
LOGIT_TRANSFORM_KEYS = ("logit_scale", "logits_scaling", "scale_emb", "dim_model_base", "output_multiplier_scale")
"""Config keys of architectures that rescale hidden states or logits after the final norm (Cohere, Granite,
MiniCPM, ...): a span path with the plain lm_head would return another distribution."""
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
SPAN_LOGPROB_CHUNK = 128
"""Most rows per lm_head / log-softmax / top-K chunk on the span path: it reduces the scored rows of a whole
encode call (up to SPAN_ENCODE_TOKENS tokens, ~1,600 rows for 64 8-shot samples) at once, where the hf backend
reduces one forward batch; [128, 151,936] fp32 is 78 MB (1,024 rows measured +1.4 GiB peak RSS at 8-shot)."""
SPAN_ENCODE_TOKENS = 65536
"""Prompt tokens per ``llm.encode`` call: bounds the fp32 hidden states held at once to [65536, H]."""


def span_refusal(model_config: dict, model_dir: str | None = None) -> str | None:
    """Why the span path cannot reproduce this teacher's logits (None: it can). ``model_config``: config.json;
    ``model_dir``: where the checkpoint is (the span path reads its lm_head from the safetensors files)."""
    text_config = model_config.get("text_config") or model_config
    architectures = model_config.get("architectures") or ["<none>"]
    if architectures[0] not in SPAN_EXACT_ARCHITECTURES:
        return (f"architecture {architectures[0]} is not one whose logits the span path is known to reproduce "
                f"({', '.join(SPAN_EXACT_ARCHITECTURES)})")
    transforms = [key for key in LOGIT_TRANSFORM_KEYS if text_config.get(key) not in (None, 1, 1.0)]
    if transforms:
        return f"its config scales logits beyond lm_head ({', '.join(transforms)})"
    if model_dir is not None and not any((Path(model_dir) / name).is_file() for name in SAFETENSORS_FILES):
        return "it is not a local directory with a safetensors checkpoint (the span path reads the lm_head there)"
    return None


def read_model_config(model: str) -> dict:
    """The teacher's config as a dict, as stage one reads it ({} when unreadable: the engine reports that)."""
    try:
        return AutoConfig.from_pretrained(model).to_dict()
    except (OSError, ValueError):
        return {}


def _checkpoint_tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}  # noqa: SIM118 - safe_open is not iterable


def load_logit_head(model: str, model_config: dict, device: torch.device) -> LogitHead:
    """The teacher's lm_head (or tied input embedding) as an fp32 LogitHead on ``device``, read alone from the
    checkpoint. fp32 like vLLM's pooling head: the hidden rows come back in fp32."""
    text_config = model_config.get("text_config") or model_config
    files = _checkpoint_tensor_files(Path(model))
    tied = bool(model_config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", False)))
    heads = [name for name in files if name.endswith("lm_head.weight")]
    embeddings = sorted((name for name in files if name.endswith("embed_tokens.weight")), key=len)
    names = embeddings if tied or not heads else heads
    if not names:
        raise TeacherConfigError(f"teacher.model={model!r}: no lm_head.weight or embed_tokens.weight in its "
                                 "safetensors checkpoint; use teacher.scoring=prompt_logprobs")
    with safe_open(str(files[names[0]]), framework="pt") as handle:
        weight = handle.get_tensor(names[0]).to(device=device, dtype=torch.float32)  # [V, H]
    lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lm_head.weight = torch.nn.Parameter(weight, requires_grad=False)
    return LogitHead(lm_head, text_config.get("final_logit_softcapping"))


def predicting_rows(hidden: torch.Tensor, num_cached: int, prompt_length: int,
                    positions: np.ndarray) -> torch.Tensor | None:
    """Rows of ``hidden`` [T - num_cached, H] (positions num_cached..T-1) that predict ``positions`` [n], i.e.
    those at tp - 1: [n, H]. None when some tp - 1 lies in the cached part (the caller re-runs uncached)."""
    if hidden.shape[0] != prompt_length - num_cached:
        raise RuntimeError(f"vLLM returned {hidden.shape[0]} hidden rows for a {prompt_length}-token prompt with "
                           f"{num_cached} cached tokens; refusing to store misaligned scores")
    rows = positions - 1 - num_cached
    if rows.size and rows.min() < 0:
        return None
    return hidden[torch.from_numpy(rows)]


class VLLMSpanTeacherBackend:
    """TeacherBackend over vLLM's pooling runner (hidden states) + the teacher's lm_head at scored rows only."""

    def __init__(self, teacher: TeacherConfig, *, seed: int = 0):
        vllm = import_vllm_for(teacher)
        from vllm import PoolingParams
        from vllm.config import PoolerConfig

        self.teacher, self.top_k = teacher, teacher.top_k
        model_config = read_model_config(teacher.model)
        refusal = span_refusal(model_config, teacher.model)
        if refusal:
            raise TeacherConfigError(f"teacher.scoring=span: {teacher.model} cannot be scored on the span path: "
                                     f"{refusal}; use teacher.scoring=prompt_logprobs")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.head = load_logit_head(teacher.model, model_config, self.device)
        engine_args = common_engine_args(teacher, seed)
        engine_args.update(runner="pooling", convert="embed", enable_prefix_caching=True,
                           pooler_config=PoolerConfig(task="token_embed", use_activation=False))
        self.llm = vllm.LLM(**engine_args)
        engine_config = self.llm.llm_engine.model_config
        self.vocab_size = self.head.vocab_size
        self.max_len = int(engine_config.max_model_len)
        check_top_k_fits(self.top_k, self.vocab_size, teacher.model)
        self.prompt_tokens = self.cached_prompt_tokens = 0  # what the prefix cache saved, summed over calls
        self.cached_params = PoolingParams(use_activation=False, skip_reading_prefix_cache=False)
        self.uncached_params = PoolingParams(use_activation=False, skip_reading_prefix_cache=True)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            shutdown_engine(self.llm)
            self.llm = self.head = None

    def _hidden_rows(self, prompts: list[list[int]], positions: list[np.ndarray]) -> list[torch.Tensor]:
        """[n_i, H] predicting rows per prompt, through the prefix cache (uncached again where it covers them)."""
        rows: list[torch.Tensor | None] = [None] * len(prompts)
        for wave in prefix_leader_waves(prompts):
            self._encode_into(rows, wave, prompts, positions, self.cached_params)
        pending = [index for index, found in enumerate(rows) if found is None]
        if pending:
            self._encode_into(rows, pending, prompts, positions, self.uncached_params)
        return rows  # type: ignore[return-value]

    def _encode_into(self, rows: list, indices: list[int], prompts: list[list[int]], positions: list[np.ndarray],
                     params) -> None:
        outputs = self.llm.encode([{"prompt_token_ids": prompts[i]} for i in indices], pooling_params=params,
                                  pooling_task="token_embed", use_tqdm=False)
        for index, output in zip(indices, outputs):
            cached = int(output.num_cached_tokens or 0) if params is self.cached_params else 0
            self.prompt_tokens += len(prompts[index])
            self.cached_prompt_tokens += cached
            rows[index] = predicting_rows(output.outputs.data, cached, len(prompts[index]), positions[index])

    def score(self, requests: list[ScoreRequest], temperatures: Sequence[float] = ()) -> list[ScoreResult]:
        """Hidden states for all requests (in encode calls of <= SPAN_ENCODE_TOKENS tokens), then the lm_head,
        log-softmax and top-K at the scored rows only; results in request order. The span path sees full
        logit rows, so ``temperatures`` log-normalizers are exact."""
        if self.llm is None:
            raise RuntimeError("VLLMSpanTeacherBackend.score called after close()")
        temperatures = tuple(float(t) for t in temperatures)
        checked = [checked_request_arrays(r, i, self.vocab_size, self.max_len) for i, r in enumerate(requests)]
        results: list[ScoreResult | None] = [None] * len(requests)
        group: list[int] = []
        group_tokens = 0
        for index, (ids, positions) in enumerate(checked):
            if positions.size == 0:
                results[index] = empty_result(self.top_k, False, 0, len(temperatures))
                continue
            length = int(positions.max()) + 1  # later tokens influence no requested distribution (causal)
            if group and group_tokens + length > SPAN_ENCODE_TOKENS:
                self._score_group(group, checked, temperatures, results)
                group, group_tokens = [], 0
            group.append(index)
            group_tokens += length
        if group:
            self._score_group(group, checked, temperatures, results)
        return results  # type: ignore[return-value]

    def _score_group(self, group: list[int], checked: list[tuple[np.ndarray, np.ndarray]],
                     temperatures: tuple[float, ...], results: list) -> None:
        prompts = [checked[i][0][: int(checked[i][1].max()) + 1].tolist() for i in group]
        positions = [checked[i][1] for i in group]
        hidden = torch.cat(self._hidden_rows(prompts, positions)).to(self.device)  # [N, H]
        labels = torch.from_numpy(np.concatenate([checked[i][0][checked[i][1]] for i in group])).to(self.device)
        targets = targets_from_hidden_rows(hidden, labels, self.head, self.top_k, temperatures,
                                           min(self.teacher.logprob_chunk, SPAN_LOGPROB_CHUNK))
        start = 0
        for index, scored in zip(group, positions):
            rows = targets.rows(start, start + scored.size)
            results[index] = ScoreResult(rows.topk_ids, rows.topk_logprobs, rows.label_logprobs, relations=None,
                                         log_normalizers=rows.log_normalizers if temperatures else None)
            start += scored.size
