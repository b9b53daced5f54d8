"""Stage one's teacher scoring backends (transformers `hf`, `vllm`) and attention relations.

Public API: load_backend(BackendSettings) -> TeacherBackend; ScoreRequest / ScoreResult; relation_matrices.
"""
from stages.teacher.scoring import (
    BackendSettings,
    BackendUnavailableError,
    RelationSettings,
    ScoreRequest,
    ScoreRequestError,
    ScoreResult,
    TeacherBackend,
    TeacherConfigError,
    load_backend,
)

__all__ = [
    "BackendSettings",
    "BackendUnavailableError",
    "RelationSettings",
    "ScoreRequest",
    "ScoreRequestError",
    "ScoreResult",
    "TeacherBackend",
    "TeacherConfigError",
    "load_backend",
]
