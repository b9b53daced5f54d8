"""``python -m bench.gpu_scale``: the stage-two and online-GKD rows at the real models' sizes, on one GPU, offline.

Run as it is on a machine with one GPU and no internet (vLLM may be absent): it builds what it needs locally
(the task data, the real Qwen tokenizer and randomly initialised Qwen3-8B- and Qwen3-1.7B-shaped models from
the shipped shapes; throughput and memory do not depend on the weights), scores a small hf cache with the
8B-shaped teacher, then runs ``stage_two`` (cached KD vs CE-only) and ``online_gkd`` (TRL GKD with the 8B
teacher in the loop vs cached KD) on ``configs/scale_gpu.yaml`` with the 1.7B-shaped LoRA student, each
condition in its own process (own ``torch.cuda.max_memory_allocated``). Sized for <= 8 minutes on one H100/H200
class GPU; results go to bench/results/scale_gpu/<name>.json with the machine (GPU name) recorded.

    python -m bench.gpu_scale [--repeats 2] [--steps 5] [--note TEXT]
"""

from __future__ import annotations

import sys
import time

import click
import torch

from bench.run import run_benchmarks
from bench.workspace import BenchSettings
from pipeline.assets.build_scale import build_shapes
from pipeline.assets.scale import SCALE_BUILD_DIR

SHAPES = ("qwen3-8b", "qwen3-1.7b")  # teacher, student (scale_gpu.yaml)
CONFIG = "scale_gpu.yaml"


def _ensure_shapes() -> None:
    """Build the shaped models and data once (reused when every model dir has its weights)."""
    missing = [name for name in SHAPES if not (SCALE_BUILD_DIR / "shaped" / name / "config.json").is_file()]
    if missing or not (SCALE_BUILD_DIR / "data" / "train.jsonl").is_file():
        build_shapes(SCALE_BUILD_DIR, list(SHAPES))
        torch.cuda.empty_cache()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True, help="Timed steps per repeat.")
@click.option("--samples", type=click.IntRange(min=16), default=128, show_default=True, help="Cached samples.")
@click.option("--note", default=None, help="Text added to every result file's notes.")
def main(repeats: int, steps: int, samples: int, note: str | None) -> None:
    """Stage two and online GKD at 8B -> 1.7B shapes on one GPU."""
    if not torch.cuda.is_available():
        raise click.UsageError("no CUDA GPU visible: bench.gpu_scale measures GPU memory and step time only")
    started = time.perf_counter()
    _ensure_shapes()
    click.echo(f"gpu_scale: shaped models ready after {time.perf_counter() - started:.0f} s")
    settings = BenchSettings(config_name=CONFIG, backends=("hf",), repeats=repeats, steps=steps, warmup_steps=2,
                             cache_samples=samples, out_dir="bench/results/scale_gpu", work_dir="runs/bench/scale_gpu",
                             note=note or f"bench.gpu_scale on {torch.cuda.get_device_name(0)}")
    written = run_benchmarks(settings, ("stage_two", "online_gkd"), echo=click.echo)
    click.echo(f"gpu_scale: done in {time.perf_counter() - started:.0f} s: {', '.join(written.values())}")


if __name__ == "__main__":
    sys.exit(main.main(standalone_mode=True))
