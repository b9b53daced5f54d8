"""HTTP calls to an OpenAI-compatible vLLM server (httpx), with timeouts and retries with backoff.

Retried: connection errors, timeouts and other transport failures, HTTP 408, 429 and 5xx — what a restarting,
overloaded or dying server answers. Not retried: other 4xx (the request itself is refused; resending it would
be refused again), reported with the server's own message. After ``retries`` failed retries the server is
given up for this run (:class:`ServerGone`); the caller moves its work elsewhere.

The endpoints used (vLLM's OpenAI-compatible server, checked against vLLM 0.32):

- ``GET /v1/models`` -> ``{"data": [{"id": served name, "root": model path, "max_model_len": int}, ...]}``;
- ``GET /version`` -> ``{"version": "0.32.0"}``;
- ``POST /tokenize`` ``{"model", "prompt", "add_special_tokens"}`` -> ``{"tokens": [ids], ...}``;
- ``POST /v1/completions`` with a token-id ``prompt`` and ``prompt_logprobs`` (see :mod:`server_backend`).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import httpx

from kd.config import ServerConfig
from kd.errors import TeacherServerError

SERVER_URL_SCHEMES = ("http://", "https://")
"""``teacher.server.urls``: the URL schemes a server address may use."""
MAX_BACKOFF_S = 30.0
RETRIED_STATUS = frozenset({408, 429})


class ServerGone(Exception):
    """A server failed a request ``retries + 1`` times in a row (transport errors, 408, 429 or 5xx)."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(f"{url}: {reason}")


class ServerRefused(Exception):
    """A server answered a request with a 4xx that retrying cannot fix; ``message`` is the server's own."""

    def __init__(self, url: str, status: int, message: str):
        self.url = url
        self.status = status
        self.message = message
        super().__init__(f"{url}: HTTP {status}: {message}")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one request is retried."""

    retries: int
    backoff_s: float
    timeout_s: float

    @classmethod
    def from_config(cls, server: ServerConfig) -> RetryPolicy:
        return cls(retries=server.retries, backoff_s=server.backoff_s, timeout_s=server.timeout_s)

    def wait_before(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (1-based): backoff_s, 2 backoff_s, 4 ..., capped."""
        return min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)

    def timeout(self) -> httpx.Timeout:
        # A dead host should fail fast; a busy server may take the whole timeout to answer.
        return httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s))


def auth_headers(server: ServerConfig) -> dict[str, str]:
    """``Authorization: Bearer`` from the environment variable named by ``api_key_env`` (none without one)."""
    if not server.api_key_env:
        return {}
    key = os.environ.get(server.api_key_env)
    if not key:
        raise TeacherServerError(f"teacher.server.api_key_env={server.api_key_env!r}: that environment variable "
                                 "is not set; export the servers' API key in it or set api_key_env=null")
    return {"Authorization": f"Bearer {key}"}


def base_url(url: str) -> str:
    """``http://host:8000/`` and ``http://host:8000/v1`` both mean the server at ``http://host:8000``."""
    return url.rstrip("/").removesuffix("/v1")


def _error_message(response: httpx.Response) -> str:
    """The server's one-line reason: vLLM answers ``{"error": {"message": ...}}`` (older: ``{"message"}``)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip().splitlines()[0] if response.text.strip() else response.reason_phrase
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message", error) if isinstance(error, dict) else error
    return str(message).strip().splitlines()[0] if str(message).strip() else response.reason_phrase


def _failure_of(response: httpx.Response) -> str | None:
    """None for a success; the reason for a retryable failure; raises ServerRefused for a final one."""
    if response.is_success:
        return None
    if response.status_code in RETRIED_STATUS or response.status_code >= 500:
        return f"HTTP {response.status_code}: {_error_message(response)}"
    raise ServerRefused(str(response.request.url), response.status_code, _error_message(response))


async def request_json(client: httpx.AsyncClient, method: str, url: str, policy: RetryPolicy,
                       body: dict[str, Any] | None = None) -> Any:
    """One call with retries; the decoded JSON body. Raises ServerGone (retries spent) or ServerRefused."""
    reason = "no attempt made"
    for attempt in range(policy.retries + 1):
        if attempt:
            await asyncio.sleep(policy.wait_before(attempt))
        try:
            response = await client.request(method, url, json=body, timeout=policy.timeout())
        except httpx.TransportError as error:
            reason = f"{type(error).__name__}: {error}"
            continue
        reason = _failure_of(response)
        if reason is None:
            return response.json()
    raise ServerGone(url, reason)
