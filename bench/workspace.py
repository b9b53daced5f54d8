"""Where the benchmarks keep their work (configs derived from the named config, the caches they score).

Every benchmark starts from one pipeline config (``tiny.yaml`` unless ``--config`` names another) plus
overrides, so a result file records exactly what ran (``config`` in the JSON is the resolved config).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kd.config import Config


@dataclass
class BenchSettings:
    """Knobs of a benchmark run (the defaults are what ``make bench`` runs on the tiny assets)."""

    config_name: str = "tiny.yaml"
    overrides: tuple[str, ...] = ()
    work_dir: str = "runs/bench"
    """Caches and scratch training runs (git-ignored); reused across runs when their inputs match."""
    out_dir: str = "bench/results"
    repeats: int = 3
    """Timed repeats of every condition, after one untimed warm-up round."""
    backends: tuple[str, ...] = ("hf", "vllm")
    shots: tuple[int, ...] = (0, 8)
    stage_one_samples: int = 64
    cache_samples: int = 256
    """Samples in the cache that stage two, online GKD and the loader read."""
    steps: int = 10
    """Timed optimizer steps per repeat (after warmup_steps untimed ones)."""
    warmup_steps: int = 2
    top_ks: tuple[int, ...] = (16, 32, 64, 128)
    cache_size_samples: int = 256
    loader_batches: int = 20
    threads: int | None = None
    """torch CPU threads (and OMP_NUM_THREADS of the processes the benchmarks start); None: library default."""
    note: str | None = None
    """Free text added to every result file's notes (e.g. what else was running on the machine)."""
    isolate: bool = True
    """Run each training condition in a fresh process (its own peak memory); False for quick tests."""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_threads(settings: BenchSettings) -> None:
    """Pin CPU threads for this process and the ones it spawns (before they import torch)."""
    import os

    if settings.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(settings.threads)
        torch.set_num_threads(settings.threads)


def bench_config(settings: BenchSettings, *extra: str) -> Config:
    """The named config with the run's overrides, then ``extra`` (later wins)."""
    from pipeline.config_loader import load_config

    return load_config(settings.config_name, list(settings.overrides) + list(extra))


def config_record(cfg: Config) -> dict[str, Any]:
    from kd.config import config_to_dict

    return config_to_dict(cfg)


def training_cache(settings: BenchSettings, top_k: int | None = None, encoding: str = "plain") -> tuple[Config, str]:
    """(config, cache path) of the hf-scored cache stage two, online GKD and the loader read; built if absent.

    A complete cache with matching fingerprints is reused (stage one says "nothing to do").
    """
    from cache_schema import CacheMismatchError
    from stages.cache_teacher import cache_teacher

    cfg = bench_config(settings)
    k = top_k or cfg.teacher.top_k
    suffix = "" if encoding == "plain" else f"-{encoding}"
    path = str(Path(settings.work_dir) / "caches" / f"train-k{k}{suffix}")
    cfg = bench_config(settings, "teacher.backend=hf", f"teacher.top_k={k}", f"cache.path={path}",
                       f"data.max_samples={settings.cache_samples}", f"cache.encoding={encoding}")
    try:
        cache_teacher(cfg, workers=0, progress=False, echo=_quiet)
    except CacheMismatchError:  # another config's cache at the bench path: replace it (scratch space)
        cache_teacher(cfg, workers=0, overwrite=True, progress=False, echo=_quiet)
    return cfg, path


def _quiet(*_: Any) -> None:
    """echo that prints nothing (the benchmark prints its own table)."""
