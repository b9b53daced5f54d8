"""Render pipeline/assets/tiny/README.md from the build_info dictionary written by build_tiny."""

from __future__ import annotations

from pathlib import Path


def _shot_mix(training: dict) -> str:
    if training["max_shots"] == 0 or training["zero_shot_fraction"] >= 1.0:
        return "all sequences 0-shot"
    return f"{training['zero_shot_fraction']:.0%} of sequences 0-shot, the rest 1..{training['max_shots']} shots"


def _vllm_section(info: dict) -> list[str]:
    check = info.get("vllm_check")
    if check is None:
        return ["## vLLM", "", "Not checked in this build (`python -m pipeline.assets.vllm_smoke`).", ""]
    return [
        "## vLLM",
        "",
        f"`python -m pipeline.assets.vllm_smoke` (vllm {check.get('vllm_version', '?')}, CPU, bf16): "
        + ("loaded the teacher from its path and scored a 3-shot prompt; "
           f"engine start {check['engine_start_seconds']} s, {check['prompt_tokens']} prompt tokens, answer "
           f"logprob sum {check['answer_logprob_sum_vllm']} (vLLM) vs {check['answer_logprob_sum_transformers']} "
           f"(transformers bf16), max per-token gap {check['max_abs_gap_answer']}."
           if check.get("ok") else f"FAILED: {check.get('error', 'see build log')}"),
        "",
    ]


def _model_section(name: str, model_info: dict) -> list[str]:
    shape = model_info["shape"]
    training = model_info["training"]
    return [
        f"### {name}",
        "",
        f"- Qwen3ForCausalLM: hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads x head_dim {shape['head_dim']}, {shape['num_key_value_heads']} KV heads, "
        f"intermediate {shape['intermediate_size']}, tied embeddings, vocab_size {model_info['vocab_size']} (padded).",
        f"- Parameters: {model_info['parameters']:,} (tied lm_head counted once).",
        f"- Init seed {model_info['init_seed']}; trained on {training['rows']:,} rows for {training['steps']} AdamW steps "
        f"(batch {training['batch_size']}, "
        f"peak lr {training['learning_rate']}, {training['tokens_seen']:,} tokens, {training['seconds']:.0f} s, "
        f"final loss {training['final_loss']:.3f}); {_shot_mix(training)}.",
        f"- Test exact match (greedy): 0-shot {model_info['test_exact_match_0shot']:.1%} "
        f"({model_info['test_correct_0shot']}/200), 3-shot {model_info['test_exact_match_3shot']:.1%} "
        f"({model_info['test_correct_3shot']}/200).",
        "",
    ]


def write_readme(info: dict, path: Path) -> None:
    sizes = info["file_sizes_bytes"]
    lines = [
        "# Tiny embedded assets",
        "",
        "Everything needed to run the pipeline offline on a fresh clone: a synthetic GSM8K-format task, a trained",
        "byte-level BPE tokenizer, a tiny *trained* teacher and a weaker tiny student (both Qwen3ForCausalLM).",
        "Written by the build script from the numbers in `build_info.json`; do not edit by hand.",
        "",
        f"Rebuild: `{info['command']} [--out DIR]` ({info['build_seconds']:.0f} s with {info['threads']} CPU thread(s) on a shared 2-core machine).",
        "",
        "## Determinism",
        "",
        "Fixed seeds everywhere, `torch.use_deterministic_algorithms(True)`, and a fixed thread count "
        f"({info['threads']}). The data files and tokenizer files are identical byte for byte on every rebuild. "
        "The model weights are reproducible on the same machine and library versions, but may differ in the last "
        "bits on other CPUs or library versions (floating-point kernels differ), and so may the accuracies below.",
        "",
        "## Task",
        "",
        f"Synthetic word problems (seed {info['data']['seed']}), rows: "
        + ", ".join(f"{name} {count}" for name, count in info["data"]["rows"].items())
        + "; splits are disjoint by question text. Each answer is a short worked solution ending in `#### <int>`, "
        "e.g. `Mia starts with 7 apples. 7 + 5 = 12. 12 - 3 = 9. #### 9`. Seven problem kinds (add, subtract, "
        "multiply, divide, and two-step mixes) over small non-negative integers; see `synthetic_task.py`.",
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE trained on the train split, {info['tokenizer']['length']} tokens (incl. specials), digits "
        "split individually. Specials: `<|endoftext|>` (eos/pad), `<|im_start|>`, `<|im_end|>`. ChatML chat "
        "template (Qwen style); `enable_thinking` is accepted and ignored. The model dirs carry a copy.",
        "",
        "## Models",
        "",
        "Saved as bf16 safetensors with config.json, generation_config.json (eos = `<|im_end|>`, `<|endoftext|>`; "
        "pad = `<|endoftext|>`) and tokenizer files; each dir loads from its path alone in transformers and vLLM.",
        "The teacher is trained on the train split plus extra problems from the same generator stream (drawn "
        "after the shipped splits, so disjoint from validation/test; regenerated by the build, not shipped), with "
        "prompts from `kd/data/prompting.py` (mix of 0-shot and k-shot, loss on all tokens). The student is randomly initialised and then given a *short* 0-shot LM run "
        "on the train split so it knows the answer format but not the arithmetic (weak on purpose: room for KD).",
        "",
        *_model_section("Teacher", info["teacher"]),
        *_model_section("Student", info["student"]),
        "Evaluation: " + info["evaluation"]["decoding"] + "; answer regex `" + info["evaluation"]["answer_regex"]
        + "`; shots drawn from train with `draw_shots(seed=" + str(info["evaluation"]["shot_seed"]) + ")`; "
        + info["evaluation"]["weights"] + ".",
        "",
        *_vllm_section(info),
        "## Files",
        "",
        "| file | bytes |",
        "|---|---:|",
        *[f"| {name} | {size:,} |" for name, size in sizes.items()],
        f"| **total** (excluding README.md, build_info.json) | {sum(sizes.values()):,} |",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
