from __future__ import annotations

import pytest

from tests.helpers.tiny_teacher import build_tiny_teacher


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A random tiny Qwen3 teacher (bf16 weights) + tokenizer saved to disk once per test session."""
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))
