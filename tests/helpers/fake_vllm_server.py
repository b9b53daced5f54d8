"""A fake vLLM OpenAI server behind httpx.MockTransport: the endpoints the server backend calls, in process.

Its "model" is a bigram table: the distribution predicting token tp depends on token tp - 1 only (a seeded
random logit row per previous token), so expected scores are easy to compute densely. Answers follow vLLM's
JSON (checked against vLLM 0.32's serving code): ``prompt_logprobs`` entry tp maps token-id strings to
``{"logprob", "rank", "decoded_token"}`` for the top-K plus the actual token (merged when it is in the top-K).
Servers can be made to refuse connections, to fail with 503 a number of times, or to die after N completions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
import numpy as np

from kd.teacher import server_backend


def bigram_logprobs(previous_token: int, vocab_size: int) -> np.ndarray:
    """[V] float64 log-softmax of a seeded random logit row (scaled so the top-K is well separated)."""
    logits = np.random.default_rng(previous_token).normal(size=vocab_size) * 4.0
    return logits - np.logaddexp.reduce(logits)


def dense_scores(ids: np.ndarray, positions: np.ndarray, vocab_size: int, top_k: int):
    """(topk_ids [n, K], topk_logprobs [n, K], label_logprobs [n]) the fake model gives."""
    rows = np.stack([bigram_logprobs(int(ids[p - 1]), vocab_size) for p in positions])  # [n, V]
    order = np.argsort(-rows, axis=1, kind="stable")[:, :top_k]
    labels = rows[np.arange(len(positions)), ids[positions]]
    return order, np.take_along_axis(rows, order, axis=1), labels


@dataclass
class FakeServer:
    """One fake server's behaviour; ``completions`` counts answered completion requests."""

    url: str
    model_name: str
    tokenizer: object
    vocab_size: int
    max_logprobs: int = 20
    max_model_len: int = 2048
    version: str = "0.32.0"
    refuse_connections: bool = False
    failures_before_success: int = 0
    die_after: int | None = None
    """Refuse connections once this many completions were answered (a server killed mid-run)."""
    completions: int = 0
    attempts: int = 0
    tokenize_offset: int = 0
    """Added to every /tokenize id: a server with another tokenizer."""
    prompts: list[list[int]] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if self.refuse_connections or (self.die_after is not None and self.completions >= self.die_after):
            raise httpx.ConnectError("connection refused", request=request)
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": self.model_name, "root": self.model_name,
                                                       "max_model_len": self.max_model_len}]})
        if path == "/version":
            return httpx.Response(200, json={"version": self.version})
        body = json.loads(request.content)
        if body.get("model") != self.model_name:
            return httpx.Response(404, json={"error": {"message": f"The model `{body.get('model')}` does not exist."}})
        if path == "/tokenize":
            ids = self.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
            return httpx.Response(200, json={"tokens": [i + self.tokenize_offset for i in ids], "count": len(ids)})
        if path == "/v1/completions":
            return self._complete(body)
        return httpx.Response(404, json={"error": {"message": f"no route {path}"}})

    def _complete(self, body: dict) -> httpx.Response:
        self.attempts += 1
        if self.failures_before_success > 0:
            self.failures_before_success -= 1
            return httpx.Response(503, json={"error": {"message": "engine busy"}})
        top_k = body["prompt_logprobs"]
        if top_k > self.max_logprobs:
            return httpx.Response(400, json={"error": {"message": f"Requested prompt logprobs of {top_k}, which is "
                                                                  f"greater than max allowed: {self.max_logprobs}"}})
        ids = np.asarray(body["prompt"], np.int64)
        entries: list[dict | None] = [None]
        for position in range(1, len(ids)):
            row = bigram_logprobs(int(ids[position - 1]), self.vocab_size)
            order = np.argsort(-row, kind="stable")
            entry = {str(int(token)): {"logprob": float(row[token]), "rank": rank + 1, "decoded_token": "w"}
                     for rank, token in enumerate(order[:top_k])}
            actual = int(ids[position])
            actual_rank = int((row > row[actual]).sum()) + 1
            entry.setdefault(str(actual), {"logprob": float(row[actual]), "rank": actual_rank, "decoded_token": "w"})
            entries.append(entry)
        self.completions += 1
        self.prompts.append(ids.tolist())
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "w", "prompt_logprobs": entries}]})


def install_fake_servers(monkeypatch, servers: list[FakeServer]) -> None:
    """Route the server backend's HTTP client to these fake servers (by host:port of their URL)."""
    by_host = {httpx.URL(s.url).netloc: s for s in servers}

    def handler(request: httpx.Request) -> httpx.Response:
        server = by_host.get(request.url.netloc)
        if server is None:
            raise httpx.ConnectError("no such host", request=request)
        return server.handle(request)

    def fake_client(teacher, connections=None):
        return httpx.AsyncClient(transport=httpx.MockTransport(handler))

    monkeypatch.setattr(server_backend, "new_client", fake_client)
