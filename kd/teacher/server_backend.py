"""Teacher scoring by running vLLM servers (``teacher.backend: server``): prompt logprobs over HTTP.

Each scored sequence is one ``POST /v1/completions`` with the token ids as ``prompt`` (no tokenization on the
server), ``max_tokens=1`` and ``prompt_logprobs=K``. The answer's ``choices[0].prompt_logprobs`` has one entry
per prompt token: entry 0 is null, entry ``tp`` maps token ids (JSON strings) to ``{"logprob", "rank"}`` for
the top-K of the distribution predicting token ``tp`` plus the actual token ``ids[tp]`` — merged into its top-K
entry when it is one of them (K keys), a separate key otherwise (K + 1 keys). These are the values the
in-process vllm backend reads: the server must run vLLM's default ``--logprobs-mode raw_logprobs``.

Before anything is scored every server is asked what it serves (:func:`describe_servers`): the model name
(``GET /v1/models``), its context length, the vLLM version (``GET /version``), whether it tokenizes like
``teacher.model`` (``POST /tokenize`` of a probe text) and whether it grants ``prompt_logprobs=K`` (a one-token
probe; vLLM refuses K above its ``--max-logprobs``). A mismatch is a one-line TeacherConfigError.

Work sharing: a batch of requests is a queue drained by ``max_in_flight`` workers per live server. A server
that fails a request ``retries + 1`` times is given up for the rest of the run and that request goes back to
the queue for the others; only when every server is gone does scoring stop (TeacherServerError). Stage one
then keeps every committed part, and a rerun redoes just the rest. A stock vLLM server has no counterpart of a
span path (hidden states of the scored positions only), so this backend always reads prompt logprobs.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from kd.config import TeacherConfig
from kd.errors import TeacherConfigError, TeacherServerError
from kd.teacher.server_client import (
    RetryPolicy,
    ServerGone,
    ServerRefused,
    auth_headers,
    base_url,
    request_json,
)
from kd.teacher.types import (
    ScoreRequest,
    ScoreResult,
    check_no_temperatures,
    check_top_k_fits,
    checked_request_arrays,
    empty_result,
)
from kd.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

# Tokenizer probe: words, digits, punctuation, whitespace runs and non-ASCII text, where tokenizers differ.
PROBE_TEXT = "Question: Natalia sold 48 clips, then 3.5 more?  #### 72\n\tÜber naïve café – 東京 🙂 x=y+1;"
MAX_LOGPROBS_PATTERN = re.compile(r"greater than max allowed: (\d+)")


@dataclass(frozen=True)
class ServedTeacher:
    """What one server reported about itself."""

    url: str
    model_name: str
    vllm_version: str
    max_model_len: int | None


def new_client(teacher: TeacherConfig, connections: int | None = None) -> httpx.AsyncClient:
    """The HTTP client of one batch of calls (the one place tests put a fake server behind)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=None)
    return httpx.AsyncClient(headers=auth_headers(teacher.server), limits=limits)


def served_model_name(teacher: TeacherConfig) -> str:
    return teacher.server.model_name or teacher.model


async def _check_model(client: httpx.AsyncClient, url: str, where: str, name: str,
                       policy: RetryPolicy) -> int | None:
    """The served model's max_model_len; TeacherConfigError when the server does not serve ``name``."""
    listing = await request_json(client, "GET", f"{url}/v1/models", policy)
    models = {entry.get("id"): entry for entry in listing.get("data", [])}
    if name not in models:
        raise TeacherConfigError(
            f"{where} serves {sorted(models)}, not {name!r}; point it at the teacher's server or set "
            "teacher.server.model_name to the name it serves the teacher under (vllm serve --served-model-name)")
    length = models[name].get("max_model_len")
    return int(length) if length else None


async def _check_tokenizer(client: httpx.AsyncClient, url: str, where: str, teacher: TeacherConfig, tokenizer,
                           policy: RetryPolicy) -> list[int]:
    """The probe's token ids, checked to be the local tokenizer's; TeacherConfigError otherwise."""
    body = {"model": served_model_name(teacher), "prompt": PROBE_TEXT, "add_special_tokens": False}
    served = (await request_json(client, "POST", f"{url}/tokenize", policy, body)).get("tokens")
    local = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    if served != local:
        raise TeacherConfigError(
            f"{where} tokenizes differently from teacher.model={teacher.model!r} (a probe text gives "
            f"{len(served or [])} vs {len(local)} tokens); cached token ids would mean other tokens to it: serve "
            "the same model or set teacher.model to the served model's tokenizer")
    return local


async def _check_logprobs(client: httpx.AsyncClient, url: str, where: str, teacher: TeacherConfig,
                          probe_ids: list[int], policy: RetryPolicy) -> None:
    """A two-token request with prompt_logprobs=K must be granted and answered with K ranked entries."""
    body = completion_body(served_model_name(teacher), (probe_ids + [0, 0])[:2], teacher.top_k)
    try:
        answer = await request_json(client, "POST", f"{url}/v1/completions", policy, body)
    except ServerRefused as refused:
        allowed = MAX_LOGPROBS_PATTERN.search(refused.message)
        if allowed:
            raise TeacherConfigError(
                f"{where} allows at most {allowed.group(1)} prompt logprobs (its --max-logprobs) but "
                f"teacher.top_k={teacher.top_k}; restart it with --max-logprobs {teacher.top_k} or lower "
                "teacher.top_k") from None
        raise TeacherConfigError(f"{where} refuses prompt-logprob requests (HTTP {refused.status}: "
                                 f"{refused.message}); serve the teacher with vLLM's OpenAI server") from None
    entries = prompt_logprob_entries(answer, 2, where)
    if len(entries[1]) not in (teacher.top_k, teacher.top_k + 1):
        raise TeacherConfigError(f"{where} answered prompt_logprobs={teacher.top_k} with {len(entries[1])} "
                                 "entries per position; it does not follow vLLM's prompt-logprob format")


async def _describe_one(client: httpx.AsyncClient, index: int, teacher: TeacherConfig, tokenizer,
                        policy: RetryPolicy) -> ServedTeacher:
    url = base_url(teacher.server.urls[index])
    where = f"teacher.server.urls[{index}]={teacher.server.urls[index]!r}"
    max_model_len = await _check_model(client, url, where, served_model_name(teacher), policy)
    version = str((await request_json(client, "GET", f"{url}/version", policy)).get("version", "unknown"))
    probe_ids = await _check_tokenizer(client, url, where, teacher, tokenizer, policy)
    await _check_logprobs(client, url, where, teacher, probe_ids, policy)
    return ServedTeacher(url, served_model_name(teacher), version, max_model_len)


async def _describe_all(teacher: TeacherConfig, tokenizer) -> list[ServedTeacher]:
    """Every reachable server, checked; unreachable ones are logged and left out (none reachable: error)."""
    policy = RetryPolicy.from_config(teacher.server)
    served, unreachable = [], []
    async with new_client(teacher) as client:
        for index in range(len(teacher.server.urls)):
            try:
                served.append(await _describe_one(client, index, teacher, tokenizer, policy))
            except ServerGone as gone:
                unreachable.append(f"{gone.url} ({gone.reason})")
            except ServerRefused as refused:
                raise TeacherConfigError(f"teacher.server.urls[{index}]: {refused}; is it a vLLM server of "
                                         f"{served_model_name(teacher)!r}?") from None
    if not served:
        raise TeacherServerError(f"no teacher server answers: {'; '.join(unreachable)}; start one (vllm serve "
                                 f"{teacher.model} --max-logprobs {teacher.top_k}) or fix teacher.server.urls")
    for entry in unreachable:
        logger.warning("teacher server %s is unreachable; scoring on the others", entry)
    return served


def describe_servers(teacher: TeacherConfig, tokenizer) -> list[ServedTeacher]:
    """Check every server against the config before anything is scored; the reachable ones.

    Raises TeacherConfigError when a server serves another model, tokenizes differently or grants fewer than
    K prompt logprobs, or when servers disagree on the vLLM version or context length (their scores would be
    different products); TeacherServerError when none can be reached.
    """
    served = asyncio.run(_describe_all(teacher, tokenizer))
    versions = {(s.vllm_version, s.max_model_len) for s in served}
    if len(versions) > 1:
        raise TeacherConfigError(f"teacher.server.urls: the servers differ in vLLM version / max_model_len "
                                 f"({sorted(versions, key=str)}); serve the teacher with one version and length")
    return served


def server_identity(served: list[ServedTeacher]) -> dict[str, Any]:
    """What the cache records about who scored it (the URLs are not identity: the same teacher can move)."""
    return {"model_name": served[0].model_name, "vllm_version": served[0].vllm_version,
            "max_model_len": served[0].max_model_len}


def server_length_limit(identity: dict[str, Any]) -> int | None:
    """Longest sequence a server scores: its context length less the one token the completions API generates
    (vLLM clamps that token away, or refuses, for a prompt of the full context length)."""
    length = identity.get("max_model_len")
    return int(length) - 1 if length else None


def completion_body(model_name: str, prompt_ids: list[int], top_k: int) -> dict[str, Any]:
    """A completions request that scores ``prompt_ids`` and generates the one token the API insists on."""
    return {"model": model_name, "prompt": prompt_ids, "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": top_k, "add_special_tokens": False}


def prompt_logprob_entries(answer: dict[str, Any], prompt_len: int, where: str) -> list[dict[str, Any] | None]:
    """``choices[0].prompt_logprobs`` of a completion answer, checked to hold one entry per prompt token."""
    try:
        entries = answer["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        entries = None
    if not isinstance(entries, list) or len(entries) != prompt_len:
        raise RuntimeError(f"{where}: the answer holds no prompt_logprobs for all {prompt_len} prompt tokens; "
                           "refusing to store misaligned scores")
    return entries


def parse_json_prompt_logprobs(entries: list, token_ids: np.ndarray, positions: np.ndarray, top_k: int,
                               where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """JSON prompt logprobs -> (topk_ids [n, K] int64, topk_logprobs [n, K] float32, label_logprobs [n]).

    entries: [Tt'] per-position dicts (token id string -> {"logprob", "rank"}); positions [n] are tp values.
    The actual token ``token_ids[tp]`` must be a key (that checks the alignment); with K + 1 keys it is not in
    the top-K and is left out of it. The top-K is ordered by descending logprob (rank breaks ties).
    """
    count = positions.size
    topk_ids = np.empty((count, top_k), np.int64)
    topk_logprobs = np.empty((count, top_k), np.float32)
    label_logprobs = np.empty((count,), np.float32)
    for row, position in enumerate(positions.tolist()):
        entry = entries[position] or {}
        actual = int(token_ids[position])
        ranked = {int(token): (float(value["logprob"]), value.get("rank")) for token, value in entry.items()}
        if actual not in ranked or len(ranked) not in (top_k, top_k + 1):
            raise RuntimeError(f"{where}: prompt logprobs at position {position} lack the prompt token {actual} or "
                               f"hold {len(ranked)} entries for K={top_k}; refusing to store misaligned scores")
        label_logprobs[row] = ranked[actual][0]
        if len(ranked) == top_k + 1:
            del ranked[actual]
        ordered = sorted(ranked.items(), key=lambda item: (-item[1][0], item[1][1] or 0, item[0]))
        topk_ids[row] = [token for token, _ in ordered]
        topk_logprobs[row] = [value[0] for _, value in ordered]
    return topk_ids, topk_logprobs, label_logprobs


def _logit_width(model: str, tokenizer) -> int:
    """The teacher's logit row width: config.vocab_size (padded rows included), at least the tokenizer's."""
    from transformers import AutoConfig

    try:
        vocab_size = getattr(AutoConfig.from_pretrained(model).get_text_config(), "vocab_size", None)
    except (OSError, ValueError):
        vocab_size = None
    return max(int(vocab_size or 0), len(tokenizer))


class ServerTeacherBackend:
    """TeacherBackend over one or more vLLM servers' prompt logprobs."""

    def __init__(self, teacher: TeacherConfig):
        if teacher.attention.enabled:
            raise TeacherConfigError("teacher.relations is set but a vLLM server returns no attention "
                                     "projections; use teacher.backend=hf or remove teacher.relations")
        tokenizer = load_tokenizer(teacher.model, "teacher.model")
        self.teacher = teacher
        self.top_k = teacher.top_k
        self.vocab_size = _logit_width(teacher.model, tokenizer)
        check_top_k_fits(self.top_k, self.vocab_size, teacher.model)
        self.served = describe_servers(teacher, tokenizer)
        self.max_len = server_length_limit(server_identity(self.served))
        self.policy = RetryPolicy.from_config(teacher.server)
        self.gone: dict[str, str] = {}
        """URL -> why it was given up; those servers get no more work in this run."""
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def score(self, requests: list[ScoreRequest], temperatures: Sequence[float] = ()) -> list[ScoreResult]:
        """All requests with positions scored on the servers; results in request order."""
        check_no_temperatures(temperatures, "server")
        if self.closed:
            raise RuntimeError("ServerTeacherBackend.score called after close()")
        checked = [checked_request_arrays(r, i, self.vocab_size, self.max_len) for i, r in enumerate(requests)]
        results: list[ScoreResult] = [empty_result(self.top_k, with_relations=False)] * len(requests)
        jobs = []
        for index, (ids, positions) in enumerate(checked):
            if positions.size:
                # Tokens after max(tp) influence no requested distribution (causal); they are not sent.
                prompt = ids[: int(positions.max()) + 1].tolist()
                jobs.append((index, completion_body(served_model_name(self.teacher), prompt, self.top_k)))
        answers = asyncio.run(self._score_on_servers(jobs))
        for index, _ in jobs:
            ids, positions = checked[index]
            where = f"request {index}"
            entries = prompt_logprob_entries(answers[index], int(positions.max()) + 1, where)
            results[index] = ScoreResult(*parse_json_prompt_logprobs(entries, ids, positions, self.top_k, where))
        return results

    async def _score_on_servers(self, jobs: list[tuple[int, dict]]) -> dict[int, dict]:
        """Answers by request index; work of a server given up goes to the others until none is left."""
        pending, answers = deque(jobs), {}
        per_server = self.teacher.server.max_in_flight
        async with new_client(self.teacher, per_server * len(self.served)) as client:
            while pending:
                live = [s.url for s in self.served if s.url not in self.gone]
                if not live:
                    reasons = "; ".join(f"{url} ({why})" for url, why in self.gone.items())
                    raise TeacherServerError(f"every teacher server failed: {reasons}; restart them and run the "
                                             "stage again (committed parts are kept)")
                await asyncio.gather(*(self._drain(client, url, pending, answers)
                                       for url in live for _ in range(per_server)))
        return answers

    async def _drain(self, client: httpx.AsyncClient, url: str, pending: deque, answers: dict[int, dict]) -> None:
        """One in-flight slot of server ``url``: take requests until the queue is empty or the server is gone."""
        while pending and url not in self.gone:
            index, body = pending.popleft()
            try:
                answers[index] = await request_json(client, "POST", f"{url}/v1/completions", self.policy, body)
            except ServerGone as gone:
                pending.appendleft((index, body))
                if url not in self.gone:
                    logger.warning("teacher server %s given up (%s); its work goes to the others", url, gone.reason)
                self.gone[url] = gone.reason
                return
            except ServerRefused as refused:
                raise TeacherServerError(f"{url} refused request {index} ({len(body['prompt'])} tokens): HTTP "
                                         f"{refused.status}: {refused.message}") from None
