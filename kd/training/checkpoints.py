"""Stage two's run directory: the identity guard (run.json) and crash-safe checkpoints.

Layout of ``train.output_dir``::

    run.json                      config fingerprint, cache fingerprints, the resolved config
    metrics.jsonl                 one JSON line per train log / validation
    tensorboard/                  TensorBoard event files
    checkpoints/step-000020/      accelerate state (optimizer, RNG per process, scheduler), trainable weights,
                                  stream_rank<r>.json (each process's stream position), scheduler.json,
                                  trainer_state.json — every state is data (JSON or tensors), none is pickled
    final/                        the HF-format result (adapter/, merged/ or model/)
    summary.json                  the closing numbers of the last finished run

A checkpoint is written to ``checkpoints/.tmp-step-NNNNNN`` and renamed when complete; ``trainer_state.json``
is its last file. A kill mid-save leaves only a ``.tmp-`` directory, which resume never picks and the next run
deletes.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cache_schema import json_fingerprint
from kd.config import Config, config_to_dict
from kd.errors import UserError
from kd.files import atomic_write

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
WEIGHTS_FILE = "trainable_weights.pt"
SCHEDULER_FILE = "scheduler.json"
_LEGACY_SCHEDULER = "custom_checkpoint_0.pkl"  # accelerate's pickle of the scheduler, in older checkpoints
_LEGACY_SCHEDULER_KEPT = "scheduler_legacy.pt"  # the same file renamed, so accelerate no longer unpickles it
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_TMP_PREFIX = ".tmp-"
# Artifacts this stage writes; --overwrite removes these and nothing else.
OWN_ENTRIES = (RUN_FILE, "metrics.jsonl", "tensorboard", CHECKPOINTS, "final", "final.tmp", "summary.json")

# Keys that do not change the trajectory of steps 1..N, so a run may be resumed with them changed.
# train.max_steps changes the cosine horizon: resuming with another value continues, but the lr jumps.
_NON_IDENTITY_TRAIN_KEYS = ("output_dir", "max_steps", "eval_every", "save_every", "log_every",
                            "keep_checkpoints")


# ------------------------------------------------------------------------------------------- run identity


def run_identity(cfg: Config, cache_meta: dict[str, Any]) -> dict[str, Any]:
    """What run.json records: fingerprints of everything that decides the training trajectory.

    The teacher, data and cache sections act on stage two only through the cache, so the cache's own
    fingerprints stand for them (a moved cache.path with the same content is the same run).
    """
    resolved = config_to_dict(cfg)
    train = {k: v for k, v in resolved["train"].items() if k not in _NON_IDENTITY_TRAIN_KEYS}
    trajectory = {"student": resolved["student"], "train": train, "seed": resolved["seed"]}
    cache_fingerprints = dict(cache_meta.get("fingerprints") or {})
    cache_fingerprints["top_k"] = cache_meta.get("top_k")
    return {"config_fingerprint": json_fingerprint(trajectory), "cache_fingerprints": cache_fingerprints,
            "max_steps": cfg.train.max_steps, "cache_path": cfg.cache.path, "config": resolved}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable names of what differs between two run identities (config keys where possible)."""
    diffs = [f"cache {k} fingerprint" for k in sorted(set(old.get("cache_fingerprints", {}))
                                                       | set(new["cache_fingerprints"]))
             if old.get("cache_fingerprints", {}).get(k) != new["cache_fingerprints"].get(k)]
    old_cfg, new_cfg = old.get("config") or {}, new["config"]
    for section in ("student", "train"):
        for key in sorted(set(old_cfg.get(section, {})) | set(new_cfg[section])):
            if section == "train" and key in _NON_IDENTITY_TRAIN_KEYS:
                continue
            if old_cfg.get(section, {}).get(key) != new_cfg[section].get(key):
                diffs.append(f"{section}.{key}")
    if old_cfg.get("seed") != new_cfg["seed"]:
        diffs.append("seed")
    if not diffs and old.get("config_fingerprint") != new["config_fingerprint"]:
        diffs.append("config fingerprint")
    return diffs


def read_run_file(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / RUN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); pass --overwrite to start over in this directory") from None


def write_run_file(output_dir: Path, identity: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(output_dir / RUN_FILE, json.dumps(identity, indent=2, sort_keys=True) + "\n")


@dataclass
class RunDecision:
    """What to do with train.output_dir."""

    action: str
    """``fresh`` (nothing of ours there), ``restart`` (same run, no checkpoint yet: start over),
    ``overwrite`` (remove our artifacts, start over) or ``resume``."""
    checkpoint: Path | None = None
    """The checkpoint to resume from (``resume`` only)."""


def decide_run(output_dir: Path, identity: dict[str, Any], *, resume: bool, overwrite: bool) -> RunDecision:
    """Refuse to mix runs: another config's run needs --overwrite, a checkpointed run needs --resume."""
    key = f"train.output_dir={str(output_dir)!r}"
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{key} is a file, not a directory; choose a directory for the run (the file was not touched)")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return RunDecision("fresh")
    existing = read_run_file(output_dir)
    if existing is None:
        foreign = sorted(p.name for p in output_dir.iterdir() if p.name not in OWN_ENTRIES)
        if foreign:
            raise UserError(f"{key} holds other files ({', '.join(foreign[:3])}) and no {RUN_FILE}; "
                            "choose a new or empty directory")
        if complete_checkpoints(output_dir) and not overwrite:
            raise UserError(f"{key} holds checkpoints but no {RUN_FILE} to tell whose; "
                            "pass --overwrite to start over or choose another train.output_dir")
        return RunDecision("overwrite")
    if overwrite:
        return RunDecision("overwrite")
    same = (existing.get("config_fingerprint") == identity["config_fingerprint"]
            and existing.get("cache_fingerprints") == identity["cache_fingerprints"])
    if not same:
        raise UserError(f"{key} holds a run with another {', '.join(_differences(existing, identity)[:4])}; "
                        "pass --overwrite to replace it or choose another train.output_dir")
    latest = latest_checkpoint(output_dir)
    if latest is None:
        return RunDecision("restart")
    if not resume:
        raise UserError(f"{key} already holds this run's checkpoints (latest {latest.name}); "
                        "pass --resume to continue or --overwrite to start over")
    return RunDecision("resume", latest)


def clear_run(output_dir: Path) -> None:
    """Remove this stage's own artifacts (never anything else) before starting over."""
    for name in OWN_ENTRIES:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ----------------------------------------------------------------------------------------------- checkpoints


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """[(step, path)] of complete checkpoints, oldest first (a complete one has its trainer state)."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete ``.tmp-`` directories a killed save left behind (main process only)."""
    root = output_dir / CHECKPOINTS
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)


def stream_file(path: Path, process_index: int) -> Path:
    return path / f"stream_rank{process_index}.json"


def save_checkpoint(accelerator, output_dir: Path, step: int, trainer_state: dict[str, Any],
                    stream_state: dict[str, Any], keep: int, scheduler=None) -> Path:
    """Write checkpoint ``step`` on every process (each saves its RNG and stream state), then commit it.

    The weights go through the save hook of :func:`register_weight_hooks` (trainable parameters only); the
    stream position and the lr scheduler are written as JSON, so resuming never unpickles anything.
    """
    root = output_dir / CHECKPOINTS
    final = root / step_dir_name(step)
    staging = root / f"{_TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    atomic_write(stream_file(staging, accelerator.process_index), json.dumps(stream_state, sort_keys=True) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if scheduler is not None:
            atomic_write(staging / SCHEDULER_FILE, json.dumps(scheduler.state_dict(), sort_keys=True) + "\n")
        state = {**trainer_state, "step": step, "num_processes": accelerator.num_processes}
        atomic_write(staging / TRAINER_STATE, json.dumps(state, indent=2, sort_keys=True) + "\n")
        if final.exists():  # a checkpoint of the same step from a run that died after it: same content
            shutil.rmtree(final)
        staging.rename(final)
        _prune(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _prune(output_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


class CheckpointDamaged(UserError):
    """A checkpoint's files are missing or unreadable; the message names the file and the previous checkpoint."""


def _damaged(output_dir: Path, path: Path, file: Path, problem: str) -> CheckpointDamaged:
    earlier = [p for _, p in complete_checkpoints(output_dir) if p != path and p.name < path.name]
    offer = (f"move {path} out of {path.parent} and resume again to continue from the previous checkpoint "
             f"{earlier[-1].name}" if earlier else "no earlier checkpoint is kept: pass --overwrite to start over")
    return CheckpointDamaged(f"{file}: {problem}; the checkpoint is damaged — {offer}")


def _read_json(output_dir: Path, path: Path, file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise _damaged(output_dir, path, file, "missing") from None
    except (OSError, ValueError) as exc:
        raise _damaged(output_dir, path, file, f"unreadable ({str(exc).splitlines()[0]})") from None


def _read_stream_state(output_dir: Path, path: Path, process_index: int) -> dict[str, Any]:
    legacy = path / f"stream_rank{process_index}.pt"  # checkpoints written before the JSON stream state
    if not stream_file(path, process_index).exists() and legacy.exists():
        try:  # plain ints/bools only: the restricted unpickler, which refuses anything that could run code
            return torch.load(legacy, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise _damaged(output_dir, path, legacy, f"unreadable ({str(exc).splitlines()[0][:200]})") from None
    return _read_json(output_dir, path, stream_file(path, process_index))


def _load_scheduler(accelerator, output_dir: Path, path: Path, scheduler) -> None:
    legacy = path / _LEGACY_SCHEDULER
    if accelerator.is_main_process and legacy.exists() and not (path / SCHEDULER_FILE).exists():
        legacy.rename(path / _LEGACY_SCHEDULER_KEPT)  # accelerate would unpickle it with weights_only=False
    accelerator.wait_for_everyone()
    if scheduler is None:
        return
    if (path / _LEGACY_SCHEDULER_KEPT).exists() and not (path / SCHEDULER_FILE).exists():
        scheduler.load_state_dict(torch.load(path / _LEGACY_SCHEDULER_KEPT, weights_only=True))
    else:
        scheduler.load_state_dict(_read_json(output_dir, path, path / SCHEDULER_FILE))


def load_checkpoint(accelerator, path: Path, scheduler=None) -> tuple[dict[str, Any], Any]:
    """Restore accelerate state (and ``scheduler``) from ``path``; return (trainer_state, this process's stream
    state). A missing or unreadable file is a CheckpointDamaged naming it and the checkpoint to fall back to."""
    output_dir = path.parent.parent
    state = _read_json(output_dir, path, path / TRAINER_STATE)
    if state.get("num_processes") != accelerator.num_processes:
        raise UserError(f"{path}: saved by {state.get('num_processes')} process(es), this run has "
                        f"{accelerator.num_processes}; resume with the same number of processes")
    stream_state = _read_stream_state(output_dir, path, accelerator.process_index)
    _load_scheduler(accelerator, output_dir, path, scheduler)
    try:
        accelerator.load_state(str(path))
    except FileNotFoundError as exc:
        raise _damaged(output_dir, path, Path(exc.filename or path), "missing") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise _damaged(output_dir, path, path, f"unreadable ({str(exc).splitlines()[0][:200]})") from None
    return state, stream_state


def register_weight_hooks(accelerator, trainable_state_dict, load_trainable_state_dict) -> None:
    """Make accelerate's save_state/load_state store only trainable weights (the adapter for lora).

    accelerate would otherwise write the whole model, frozen base included, into every checkpoint.
    """

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for index, model in enumerate(models):
                torch.save(trainable_state_dict(accelerator.unwrap_model(model)),
                           Path(output_dir) / _weights_name(index))
        weights.clear()  # nothing left for accelerate to save itself

    def load_hook(models, input_dir):
        for index, model in enumerate(models):
            weights = Path(input_dir) / _weights_name(index)
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise _damaged(Path(input_dir).parent.parent, Path(input_dir), weights, "missing") from None
            except (OSError, RuntimeError, EOFError, ValueError) as exc:
                raise _damaged(Path(input_dir).parent.parent, Path(input_dir), weights,
                               f"unreadable ({str(exc).splitlines()[0][:200]})") from None
            load_trainable_state_dict(accelerator.unwrap_model(model), state, input_dir)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _weights_name(index: int) -> str:
    return WEIGHTS_FILE if index == 0 else WEIGHTS_FILE.replace(".pt", f"_{index}.pt")

