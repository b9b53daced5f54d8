"""Throughput of the teacher backends on the random tiny teacher (not a test; run by hand).

    .venv/bin/python -m tests.stages.teacher.benchmark_backends [--sequences 64 --length 256 --top-k 64]

Scores every position 1..T-1 of each sequence and prints scored tokens per second (engine start excluded;
one warm-up call per backend is excluded too).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from stages.teacher.scoring import BackendSettings, ScoreRequest, load_backend
from tests.stages.teacher.tiny_teacher import build_tiny_teacher


def timed_tokens_per_second(settings: BackendSettings, requests: list[ScoreRequest]) -> tuple[float, float]:
    started = time.perf_counter()
    backend = load_backend(settings)
    load_seconds = time.perf_counter() - started
    backend.score(requests[:2])  # warm-up (vLLM compiles / allocates on the first batch)
    started = time.perf_counter()
    backend.score(requests)
    seconds = time.perf_counter() - started
    backend.close()
    return sum(len(r.teacher_positions) for r in requests) / seconds, load_seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--backends", default="hf:float32,hf:bfloat16,vllm:bfloat16")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    requests = [
        ScoreRequest(rng.integers(4, 300, size=args.length).tolist(), np.arange(1, args.length))
        for _ in range(args.sequences)
    ]
    with tempfile.TemporaryDirectory() as directory:
        model = str(build_tiny_teacher(Path(directory) / "tiny"))
        for spec in args.backends.split(","):
            backend, dtype = spec.split(":")
            settings = BackendSettings(model=model, backend=backend, top_k=args.top_k, dtype=dtype)
            rate, load_seconds = timed_tokens_per_second(settings, requests)
            print(f"RESULT {backend} {dtype}: {rate:,.0f} scored tokens/s (load {load_seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
