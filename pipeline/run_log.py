"""Library noise goes to a log file in the run directory; the terminal shows the project's own lines and bars.

A stage-one run prints, before its first useful line, Triton's "doesn't include CPU backend", torch
FutureWarnings from vLLM's dispatcher, a NUMA binding warning from vLLM's C++ code, safetensors loading bars and
vLLM worker warnings under dask. None of it is something a user can act on, so :func:`library_output_to_log`
sends it to ``<run dir>/logs/<command>.log``:

- file descriptors 1 and 2 point at the log, so C/C++ writes and every child process (dask workers, vLLM's
  engine core) land there; ``sys.stdout`` / ``sys.stderr`` are rebound to copies of the terminal's
  descriptors, so the project's ``click.echo`` lines, its tqdm bars and tracebacks still reach the user;
- Python warnings and the records of libraries' loggers go to the same file (``logging.captureWarnings`` and
  a root handler; vLLM is told not to install its own stdout handler);
- transformers' and huggingface_hub's own progress bars and advisory messages are switched off by their
  documented environment variables.

``--verbose`` leaves everything on the terminal. Where the streams have no descriptors (click's test runner),
only the logging part applies.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kd.config import Config

# Read by vLLM, transformers and huggingface_hub when they are imported (here or in a child process).
QUIET_LIBRARY_ENV = {
    "VLLM_CONFIGURE_LOGGING": "0",          # no vLLM stdout handler: its records reach the root logger
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def run_log_path(cfg: Config, command: str) -> Path:
    """``<parent of train.output_dir>/logs/<command>.log``: the run directory every stage of a config shares
    (``runs/tiny/logs/run-all.log`` for configs/tiny.yaml)."""
    return Path(cfg.train.output_dir).resolve().parent / "logs" / f"{command}.log"


def _terminal_stream(fd: int, like: io.TextIOBase) -> io.TextIOWrapper:
    """A text stream over a copy of descriptor ``fd``, line-buffered, in ``like``'s encoding."""
    return io.TextIOWrapper(os.fdopen(os.dup(fd), "wb", buffering=0), encoding=like.encoding or "utf-8",
                            errors="backslashreplace", line_buffering=True, write_through=True)


def _has_descriptors() -> bool:
    try:
        sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False
    return True


@contextmanager
def _descriptors_to(log_file) -> Iterator[None]:
    """Within the block fds 1 and 2 write to ``log_file``; sys.stdout / sys.stderr keep the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {1: os.dup(1), 2: os.dup(2)}
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _terminal_stream(1, streams[0]), _terminal_stream(2, streams[1])
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[1], 1)
        os.dup2(saved[2], 2)
        for fd in saved.values():
            os.close(fd)
        terminal = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = streams
        for stream in terminal:
            stream.close()


@contextmanager
def _records_to(log_file) -> Iterator[None]:
    """Within the block, warnings and library log records go to ``log_file``."""
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level, old_handlers = root.level, root.handlers[:]
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.handlers = old_handlers
        root.setLevel(old_level)


@contextmanager
def library_output_to_log(log_path: Path, command: str, verbose: bool = False,
                          echo=print) -> Iterator[None]:
    """Run the block with library noise in ``log_path`` (appended, one header per run); ``verbose``: as is.

    At the end one line names the log, so a user who needs the libraries' messages knows where they are."""
    if verbose:
        yield
        return
    for name, value in QUIET_LIBRARY_ENV.items():
        os.environ.setdefault(name, value)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8", buffering=1) as log_file:
        log_file.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} pipeline {command} (pid {os.getpid()})\n")
        log_file.flush()
        start = log_file.tell()
        with _records_to(log_file):
            if _has_descriptors():
                with _descriptors_to(log_file):
                    yield
            else:
                yield
        log_file.flush()
        wrote = os.path.getsize(log_path) > start
    if wrote:
        echo(f"(library messages: {log_path}; --verbose shows them here)")
