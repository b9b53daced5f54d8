"""The span path's pieces that need no engine: which architectures it refuses, the lm_head it reads from the
checkpoint, the hidden-row alignment under the prefix cache, and the order of the work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kd.config import TeacherConfig
from kd.errors import TeacherConfigError
from kd.teacher.factory import resolve_scoring
from kd.teacher.shared_prefix import PREFIX_KEY_TOKENS, prefix_leader_waves
from kd.teacher.vllm_span import load_logit_head, predicting_rows, read_model_config, span_refusal
from pipeline.config_loader import ASSETS_DIR

QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "tie_word_embeddings": True}


def test_span_refuses_architectures_it_cannot_reproduce():
    assert span_refusal(QWEN3) is None
    assert span_refusal({**QWEN3, "final_logit_softcapping": 30.0, "architectures": ["Gemma2ForCausalLM"]}) is None
    assert "CohereForCausalLM is not one whose logits" in span_refusal({"architectures": ["CohereForCausalLM"]})
    assert "scales logits beyond lm_head (logits_scaling)" in span_refusal({**QWEN3, "logits_scaling": 8.0})


def test_resolve_scoring_refuses_span_and_falls_back_from_auto_saying_so():
    scaled, local = {**QWEN3, "logits_scaling": 8.0}, str(ASSETS_DIR / "tiny" / "teacher")
    with pytest.raises(TeacherConfigError, match=r"teacher.scoring=span: .*logits_scaling.*use teacher.scoring="
                                                 r"prompt_logprobs"):
        resolve_scoring(TeacherConfig(model=local, scoring="span"), scaled)
    scoring, note = resolve_scoring(TeacherConfig(model=local, scoring="auto"), scaled)
    assert scoring == "prompt_logprobs" and "scoring with prompt_logprobs instead" in note
    assert resolve_scoring(TeacherConfig(model=local), QWEN3) == ("span", None)
    assert resolve_scoring(TeacherConfig(model=local, scoring="prompt_logprobs"), scaled) == ("prompt_logprobs", None)
    # a hub id (no local checkpoint to read the lm_head from): auto scores with prompt_logprobs
    assert resolve_scoring(TeacherConfig(model="Qwen/Qwen3-8B"), QWEN3)[0] == "prompt_logprobs"


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_logit_head_is_the_models_own(which, tiny_teacher_dir):
    """Tied (the shipped tiny teacher: the input embedding) and untied (lm_head.weight) checkpoints."""
    model_dir = str(ASSETS_DIR / "tiny" / "teacher") if which == "tied" else str(tiny_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    head = load_logit_head(model_dir, read_model_config(model_dir), torch.device("cpu"))
    hidden = torch.randn(5, model.config.hidden_size)
    expected = model.get_output_embeddings()(hidden)
    torch.testing.assert_close(head(hidden), expected, rtol=0, atol=1e-5)
    assert head.vocab_size == model.config.vocab_size


def test_predicting_rows_follow_the_cached_offset():
    hidden = torch.arange(10.0)[:, None].repeat(1, 3)  # rows for positions 6..15 of a 16-token prompt
    rows = predicting_rows(hidden, num_cached=6, prompt_length=16, positions=np.array([12, 15, 7]))
    torch.testing.assert_close(rows[:, 0], torch.tensor([5.0, 8.0, 0.0]))  # positions 11, 14, 6 (tp - 1)
    assert predicting_rows(hidden, 6, 16, np.array([6])) is None  # tp - 1 = 5 was cached: re-run uncached
    with pytest.raises(RuntimeError, match="refusing to store misaligned scores"):
        predicting_rows(hidden, 5, 16, np.array([12]))


def test_prefix_leaders_run_before_their_followers():
    shared = list(range(PREFIX_KEY_TOKENS))
    prompts = [shared + [1], [9] * 40, shared + [2], shared + [3], [9] * 40 + [4]]
    assert prefix_leader_waves(prompts) == [[0, 1], [2, 3, 4]]
    assert prefix_leader_waves([[1, 2], [3, 4]]) == [[0, 1]]
