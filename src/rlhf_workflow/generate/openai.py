"""The OpenAI-compatible HTTP backend: vLLM serve, SGLang, llama.cpp's server, TGI, or a hosted API.

One request per prompt (``n`` samples in it; a server that returns fewer choices is asked again
for the rest), at most ``concurrency`` in flight. Connection errors, timeouts, 429 and 5xx are
retried with exponential backoff (a ``Retry-After`` header is honoured); a prompt that still
fails is reported as an error the stage writes down and a rerun retries. With several servers
(``openai.base_urls``) each request goes to the least busy one and a failed request is retried on
another before any backoff; a server that keeps failing is taken out for a while
(`generate.servers`). Any other 4xx means the
request itself is wrong (base URL, model name, API key) and stops the stage with the server's
message. The API key is read from an environment variable and never logged.

Uses only the standard library (``urllib``), so the backend adds no dependency.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Iterator, Sequence

from rlhf_workflow.data.io import not_text
from rlhf_workflow.errors import UserError
from rlhf_workflow.generate.base import (
    GenerationRequest,
    GenerationResult,
    Sample,
    cut_at_stop,
    prompt_seed,
)
from rlhf_workflow.generate.servers import Server, ServerPool

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class RetryableError(Exception):
    """A failure a later attempt may not have: the server was busy, down or slow."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIGenerator:
    """Samples from a model behind an OpenAI-compatible endpoint."""

    def __init__(self, config: Any, model_name: str, *, tokenizer: Any = None, chat_template: bool = True):
        self.config = config
        self.model_name = model_name
        self.tokenizer = tokenizer  # needed by the completions endpoint only
        self.chat_template = chat_template
        self.path = "/chat/completions" if config.endpoint == "chat" else "/completions"
        self.pool = ServerPool([url.rstrip("/") for url in (config.base_urls or [config.base_url])],
                               failures=config.server_failures, rest=config.server_rest)
        key = os.environ.get(config.api_key_env, "")
        self._headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        if config.endpoint == "completions" and tokenizer is None:
            raise ValueError("the completions endpoint needs a tokenizer to render prompts")

    def close(self) -> None:
        pass

    def summary(self) -> list[str]:
        """Per server: requests sent, answered, failed (with several servers; one needs no table)."""
        return self.pool.summary() if len(self.pool.servers) > 1 else []

    # ----------------------------------------------------------------- requests

    def _body(self, request: GenerationRequest, sampling: Any, n: int, attempt_round: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_name, "n": n, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens, "seed": prompt_seed(sampling.seed, request.id, attempt_round) & 0x7FFFFFFF,
        }
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k  # not in OpenAI's API; vLLM, SGLang and llama.cpp take it
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if self.config.endpoint == "chat":
            body["messages"] = request.messages
        else:
            from rlhf_workflow.data.templating import render

            body["prompt"] = (render(self.tokenizer, request.messages, add_generation_prompt=True)
                              if self.chat_template else request.messages[-1]["content"])
        return body

    def _post(self, server: Server, body: dict[str, Any]) -> dict[str, Any]:
        url = server.url + self.path
        data = json.dumps(body).encode("utf-8")
        http_request = urllib.request.Request(url, data=data, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(http_request, timeout=self.config.timeout) as response:
                payload = self._read_by(response, time.monotonic() + self.config.timeout)
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")[:300]
            if exc.code in RETRYABLE_STATUS:
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                raise RetryableError(f"HTTP {exc.code}: {text}", _seconds(retry_after)) from None
            hint = {401: f" (check the API key in ${self.config.api_key_env})", 403: f" (check the API key in "
                    f"${self.config.api_key_env})", 404: " (check openai.base_url and openai.model)"}.get(exc.code, "")
            raise UserError(f"{url}: the server refused the request with HTTP {exc.code}{hint}: {text}") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RetryableError(f"{type(reason).__name__}: {reason}") from None
        try:
            return json.loads(payload)
        except json.JSONDecodeError:
            raise RetryableError(f"the server answered with invalid JSON: {payload[:200]!r}") from None

    def _read_by(self, response: Any, deadline: float) -> bytes:
        """The response body, read by ``deadline``: ``openai.timeout`` bounds the whole request, not each
        read (a server sending a byte a second would otherwise never time out)."""
        sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
        chunks = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete answer within openai.timeout ({self.config.timeout:g} s)")
            if sock is not None:
                sock.settimeout(remaining)
            chunk = response.read1(1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def _choices(self, response: Any, sampling: Any) -> list[Sample]:
        choices = response.get("choices") if isinstance(response, dict) else None
        if not isinstance(choices, list):
            raise RetryableError(f"the response has no 'choices': {json.dumps(response)[:200]}")
        samples = []
        for choice in choices:
            if not isinstance(choice, dict):
                raise RetryableError(f"a choice of the response is not an object: {json.dumps(choice)[:200]}")
            message = choice.get("message")
            if self.config.endpoint == "chat":
                text = message.get("content") if isinstance(message, dict) else None
            else:
                text = choice.get("text")
            text = "" if text is None else text
            if not isinstance(text, str) or not_text(text) is not None:
                raise RetryableError(f"a choice of the response holds no text: {json.dumps(choice)[:200]}")
            text, stopped = cut_at_stop(text, sampling.stop) if sampling.stop else (text, False)
            finish = "length" if choice.get("finish_reason") == "length" and not stopped else "stop"
            samples.append(Sample(text, self._count_tokens(text, response, len(choices)), finish))  # type: ignore[arg-type]
        return samples

    def _count_tokens(self, text: str, response: dict[str, Any], choices: int) -> int | None:
        """The response's length in tokens: from the tokenizer when there is one, else from the
        server's usage when the response holds one choice; unknown (None) otherwise."""
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        usage = response.get("usage") or {}
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return tokens if choices == 1 and isinstance(tokens, int) else None

    def _answer(self, request: GenerationRequest, sampling: Any) -> GenerationResult:
        """All n samples of one prompt, retrying what failed (first on the other servers, then after
        a backoff); an error result when retries run out."""
        samples: list[Sample] = []
        attempts = 0
        round_ = 0
        failed_on: set[str] = set()  # servers this request failed on since its last backoff
        while len(samples) < sampling.n:
            server = self.pool.acquire(avoid=failed_on)
            try:
                response = self._post(server, self._body(request, sampling, sampling.n - len(samples), round_))
                got = self._choices(response, sampling)
                if not got:
                    raise RetryableError("the server returned no choices")
            except RetryableError as exc:
                self.pool.release(server, str(exc))
                attempts += 1
                if attempts > self.config.max_retries:
                    return GenerationResult(request.id, error=f"{server.url}: {exc} (after {attempts} attempts)",
                                            retryable=True)
                failed_on.add(server.url)
                if self.pool.untried(failed_on):
                    logger.warning("prompt %s: %s: %s; retry %d of %d on another server", request.id, server.url, exc,
                                   attempts, self.config.max_retries)
                    continue
                failed_on.clear()
                delay = exc.retry_after if exc.retry_after is not None else self.config.backoff * 2 ** (attempts - 1)
                delay *= 1 + 0.1 * random.random()  # jitter, so concurrent retries do not arrive together
                logger.warning("prompt %s: %s: %s; retry %d of %d in %.1f s", request.id, server.url, exc, attempts,
                               self.config.max_retries, delay)
                time.sleep(delay)
                continue
            except BaseException as exc:  # a refused request (UserError), or the stage stopping
                self.pool.release(server, f"{type(exc).__name__}: {exc}")
                raise
            self.pool.release(server)
            samples.extend(got[: sampling.n - len(samples)])
            round_ += 1
        return GenerationResult(request.id, samples)

    def generate(self, requests: Sequence[GenerationRequest], sampling: Any) -> Iterator[list[GenerationResult]]:
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="openai") as pool:
            pending: set[Future] = set()
            queue = iter(requests)
            try:
                for request in queue:  # keep at most `concurrency` requests submitted
                    pending.add(pool.submit(self._answer, request, sampling))
                    if len(pending) >= self.config.concurrency:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        yield [future.result() for future in done]
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield [future.result() for future in done]
            finally:
                for future in pending:
                    future.cancel()


MAX_RETRY_AFTER = 600.0  # seconds: a server asking for longer (or for inf) is waited on this long


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds, within [0, MAX_RETRY_AFTER]; None when it is not a number."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)
