"""Stage two's logging: metrics.jsonl, TensorBoard scalars, the progress bar, and true peak memory.

Only the main process writes (the loop reduces numbers across processes first). On resume, metrics.jsonl is
cut back to the checkpoint's step and TensorBoard purges later events, so a run killed after its last
checkpoint leaves no duplicate or stale records.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any

import psutil
import torch

from kd.files import atomic_write

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _parsed_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for every parseable line of a metrics file; a line torn by a kill mid-write is skipped."""
    parsed = []
    for line in path.read_text().splitlines():
        try:
            parsed.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue
    return parsed


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step (rewritten atomically); drop an unparseable torn last line."""
    if not path.exists():
        return
    kept = [line for line, record in _parsed_lines(path) if int(record.get("step", 0)) <= last_step]
    atomic_write(path, "".join(f"{line}\n" for line in kept))


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl, in order ([] when absent; a torn last line is ignored)."""
    path = Path(output_dir) / METRICS_FILE
    return [record for _, record in _parsed_lines(path)] if path.is_file() else []


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays parseable (and the problem visible)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """metrics.jsonl + TensorBoard + tqdm for the main process; every method is a no-op elsewhere."""

    def __init__(self, output_dir: Path, *, enabled: bool, progress: bool, start_step: int, max_steps: int):
        self.enabled = enabled
        self._writer = None
        self._bar = None
        self._file = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        path = output_dir / METRICS_FILE
        truncate_metrics(path, start_step)
        self._file = path.open("a", buffering=1)  # line-buffered: every record reaches the disk whole
        # purge_step drops events a killed run wrote after the checkpoint we resume from.
        self._writer = SummaryWriter(str(output_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step
                                     else None)
        self._bar = tqdm(total=max_steps, initial=start_step, unit="step", desc="stage two", disable=not progress,
                         dynamic_ncols=True)

    def record(self, record: dict[str, Any]) -> None:
        """One JSON line, and each numeric field as a TensorBoard scalar ``<split>/<field>``."""
        if not self.enabled:
            return
        record = {key: _clean(value) for key, value in record.items()}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        split, step = record.get("split", "train"), int(record["step"])
        for key, value in record.items():
            if key not in ("split", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{split}/{key}", value, step)
        self._writer.flush()

    def advance(self, steps: int, **postfix: str) -> None:
        if self.enabled:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._writer.close()
            self._file.close()
            self.enabled = False


MIB = 2**20
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _max_rss_bytes() -> int:
    """The kernel's high-water mark of this process's resident set (getrusage reports KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _reset_rss_high_water_mark() -> bool:
    """Set the high-water mark back to the current RSS (Linux >= 4.0: "5" to /proc/self/clear_refs)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """The true peak memory of a run: the kernel's high-water marks, not samples taken between steps.

    CPU: ``ru_maxrss`` (the peak resident set size; it catches the peak inside a step's backward that a sample
    between steps misses). It is reset to the current RSS when the run starts, so the peak is the run's own
    (models already loaded count, as they are resident) even in a process that ran other things first (tests,
    model loading); where the kernel refuses the reset (not Linux), ``reset_ok`` is False and the peak includes
    everything the process did before. GPU: ``torch.cuda.max_memory_allocated`` after a reset of its statistics.
    """

    def __init__(self) -> None:
        self.process_peak_before_bytes = _max_rss_bytes()
        self.rss_at_start_bytes = psutil.Process().memory_info().rss
        self.reset_ok = _reset_rss_high_water_mark()
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()

    @property
    def peak_bytes(self) -> int:
        """Peak RSS since the start of the run (since the process started when ``reset_ok`` is False)."""
        return _max_rss_bytes()

    def process_peak_bytes(self) -> int:
        """Peak RSS over the whole life of the process (before the run included)."""
        return max(self.process_peak_before_bytes, self.peak_bytes)

    def cuda_peak_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated()) if self._cuda else None

    def record(self) -> dict[str, float | None]:
        """The peaks in MiB, for metrics records and summaries."""
        cuda = self.cuda_peak_bytes()
        return {"peak_rss_mb": round(self.peak_bytes / MIB, 1),
                "peak_rss_over_start_mb": round((self.peak_bytes - self.rss_at_start_bytes) / MIB, 1),
                "cuda_peak_allocated_mb": None if cuda is None else round(cuda / MIB, 1)}

    def summary(self) -> dict[str, float | bool | None]:
        """:meth:`record` plus whether the peak is the run's own and the process's lifetime peak."""
        return {**self.record(), "peak_rss_reset_at_start": self.reset_ok,
                "process_max_rss_mb": round(self.process_peak_bytes() / MIB, 1)}
