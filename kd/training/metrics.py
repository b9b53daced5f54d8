"""Stage two's logging: metrics.jsonl, TensorBoard scalars, the progress bar, and memory measurement.

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


class PeakMemory:
    """Peak resident memory of this process during a run, sampled at each call of :meth:`sample`.

    ``ru_maxrss`` is the lifetime peak of the process (it cannot go down), so in one process running several
    trainings (tests) it would report the largest one for all; sampling the current RSS gives each run its
    own peak. Both are reported.
    """

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.peak_bytes = 0
        self.sample()

    def sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    @staticmethod
    def lifetime_peak_bytes() -> int:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
