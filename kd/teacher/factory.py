"""Building a teacher backend from the ``teacher:`` config section.

Backends are imported only when chosen: vLLM's import alone takes seconds and fails on machines without it.
"""

from __future__ import annotations

from kd.config import Config, TeacherConfig
from kd.errors import TeacherConfigError
from kd.teacher.types import TeacherBackend

TEACHER_BACKENDS = ("vllm", "hf", "server")
"""``teacher.backend``: ``vllm`` (offline LLM, prompt_logprobs), ``hf`` (transformers forward, relations too) or
``server`` (running vLLM servers' prompt logprobs over HTTP, ``teacher.server``)."""
TEACHER_SCORINGS = ("auto", "span", "prompt_logprobs")
"""``teacher.scoring`` (vllm backend): ``span`` (pooling-runner hidden states, lm_head at scored rows only),
``prompt_logprobs`` (vLLM's logprobs at every position) or ``auto`` (span where exact, else prompt_logprobs)."""
EXACT_TEMPERING_BACKENDS = ("hf",)
"""Backends that see the teacher's full logit row at each scored position, so they can store its
log-normalizer at any temperature (``cache.temperatures``); vLLM's prompt logprobs (in process or served) are
top-K at τ=1 only."""

SAMPLED_TARGET_BACKENDS = ("hf",)
"""Backends that can draw sampled targets (``cache.targets: sampled | both``): they hold the full logit row;
vLLM's prompt logprobs (in process or served) see only the top-K."""

DEFAULT_VERIFY_BACKEND = "hf"
"""``pipeline verify-cache``'s engine unless one is given: transformers runs anywhere (CPU too), no engine start."""


def requested_temperatures(cfg: Config) -> list[float]:
    """The temperatures stage one stores: 1.0 first, then ``cache.temperatures`` ascending, or by default
    ``train.temperature`` when it is not 1 and the backend can store it."""
    if cfg.cache.temperatures is not None:
        wanted = [float(t) for t in cfg.cache.temperatures]
    else:
        can_store = cfg.teacher.backend in EXACT_TEMPERING_BACKENDS
        wanted = [float(cfg.train.temperature)] if can_store else []
    return [1.0] + sorted(set(wanted) - {1.0})


def resolve_scoring(teacher: TeacherConfig, model_config: dict) -> tuple[str, str | None]:
    """The vllm scoring that runs (``span`` or ``prompt_logprobs``) and a one-line note when ``auto`` falls back.

    ``teacher.scoring=span`` for an architecture whose logits the span path cannot reproduce raises
    TeacherConfigError. ``model_config``: the teacher's config.json.
    """
    from kd.teacher.vllm_span import span_refusal

    refusal = span_refusal(model_config, teacher.model) if teacher.scoring in ("auto", "span") else None
    if teacher.scoring == "span" and refusal:
        raise TeacherConfigError(f"teacher.scoring=span: {teacher.model}: {refusal}; "
                                 "use teacher.scoring=prompt_logprobs (or auto)")
    if teacher.scoring == "auto" and refusal:
        return "prompt_logprobs", f"teacher.scoring=auto: {refusal}; scoring with prompt_logprobs instead"
    return ("prompt_logprobs" if teacher.scoring == "prompt_logprobs" else "span"), None


def load_backend(teacher: TeacherConfig, *, seed: int = 0, device: str = "auto") -> TeacherBackend:
    """The engine named by ``teacher.backend``, loaded with the model of ``teacher.model``.

    ``seed`` seeds the engine (vLLM); ``device`` is ``auto`` (CUDA when present) or a torch device (hf).
    The config is assumed validated (:func:`kd.config_checks.validate_config`).
    """
    assert teacher.backend in TEACHER_BACKENDS, teacher.backend
    if teacher.backend == "hf":
        from kd.teacher.hf_backend import HFTeacherBackend

        return HFTeacherBackend(teacher, device=device)
    if teacher.backend == "server":
        from kd.teacher.server_backend import ServerTeacherBackend

        return ServerTeacherBackend(teacher)
    from kd.teacher.vllm_span import VLLMSpanTeacherBackend, read_model_config

    scoring, _ = resolve_scoring(teacher, read_model_config(teacher.model))
    if scoring == "span":
        return VLLMSpanTeacherBackend(teacher, seed=seed)
    from kd.teacher.vllm_backend import VLLMTeacherBackend

    return VLLMTeacherBackend(teacher, seed=seed)
