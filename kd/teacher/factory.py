"""Building a teacher backend from the ``teacher:`` config section.

Backends are imported only when chosen: vLLM's import alone takes seconds and fails on machines without it.
"""

from __future__ import annotations

from kd.config import TeacherConfig
from kd.teacher.types import TeacherBackend

TEACHER_BACKENDS = ("vllm", "hf", "server")
"""``teacher.backend``: ``vllm`` (offline LLM, prompt_logprobs), ``hf`` (transformers forward, relations too) or
``server`` (running vLLM servers' prompt logprobs over HTTP, ``teacher.server``)."""

DEFAULT_VERIFY_BACKEND = "hf"
"""``pipeline verify-cache``'s engine unless one is given: transformers runs anywhere (CPU too), no engine start."""


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
    from kd.teacher.vllm_backend import VLLMTeacherBackend

    return VLLMTeacherBackend(teacher, seed=seed)
