"""Check that vLLM loads a shipped tiny model from its path and scores a prompt like transformers does.

    VLLM_CPU_KVCACHE_SPACE=1 python -m pipeline.assets.vllm_smoke [--model DIR]

Scores one 3-shot teacher sequence with ``prompt_logprobs`` and compares the actual tokens' logprobs with a
bf16 transformers forward of the same ids. Not part of the fast tests (an engine start takes ~25 s or more).
Prints one JSON line with the result; exits non-zero when the two disagree by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from kd.data.prompting import build_pair
from pipeline.assets.synthetic_task import read_jsonl

DEFAULT_MODEL = Path(__file__).resolve().parent / "tiny" / "teacher"


def _sample_ids(model_dir: Path) -> tuple[list[int], list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    data_dir = model_dir.parent / "data"
    train, test = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "test.jsonl")
    shots = [(row["question"], row["answer"]) for row in train[:3]]
    pair = build_pair(tokenizer, test[0]["question"], test[0]["answer"], shots)
    return pair.teacher_input_ids, pair.teacher_positions


def _transformers_token_logprobs(model_dir: Path, ids: list[int]) -> list[float]:
    """logprob of ids[i] given ids[:i], for i >= 1, from a bf16 forward (logits cast to fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # [T, V]
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tolerance", type=float, default=0.25, help="max |vLLM - transformers| on answer logprobs")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    ids, answer_positions = _sample_ids(args.model)
    started = time.perf_counter()
    llm = LLM(model=str(args.model), dtype="bfloat16", max_model_len=1024, max_logprobs=20, seed=0)
    engine_seconds = time.perf_counter() - started
    params = SamplingParams(max_tokens=1, prompt_logprobs=5, detokenize=False, temperature=0.0)
    output = llm.generate([{"prompt_token_ids": ids}], params)[0]
    vllm_logprobs = [entry[ids[i]].logprob for i, entry in enumerate(output.prompt_logprobs) if i >= 1]
    reference = _transformers_token_logprobs(args.model, ids)
    answer_gaps = [abs(vllm_logprobs[p - 1] - reference[p - 1]) for p in answer_positions]
    result = {
        "model": str(args.model),
        "engine_start_seconds": round(engine_seconds, 1),
        "prompt_tokens": len(ids),
        "answer_tokens": len(answer_positions),
        "answer_logprob_sum_vllm": round(sum(vllm_logprobs[p - 1] for p in answer_positions), 4),
        "answer_logprob_sum_transformers": round(sum(reference[p - 1] for p in answer_positions), 4),
        "max_abs_gap_answer": round(max(answer_gaps), 4),
        "generated_token": output.outputs[0].token_ids[0],
    }
    print(json.dumps(result), flush=True)
    return 0 if result["max_abs_gap_answer"] <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
