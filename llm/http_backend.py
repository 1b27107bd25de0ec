"""An OpenAI-compatible chat endpoint (vLLM, SGLang, llama.cpp server...) for teachers too big to load here.

Schemas go out as `response_format: {"type": "json_schema"}` (vLLM's structured outputs). Transient failures
(timeouts, 429, 5xx, dropped connections) are retried with exponential backoff; what is still failing after
that raises `TeacherUnavailable`, so the caller can report which conversations are missing.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from memlora.config import LLMConfig
from memlora.memory.llm import GenerationRequest, GenerationResult

log = logging.getLogger("memlora.llm")

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class TeacherUnavailable(RuntimeError):
    pass


class SchemaRejected(RuntimeError):
    pass


class OpenAIBackend:
    backend_name = "openai"

    def __init__(self, config: LLMConfig, headers: dict[str, str] | None = None):
        """`headers`: sent with every call (e.g. `x-memlora-conversation`, which groups a client's calls)."""
        self.config, self.http = config, config.http
        self.model_id = config.model
        key = os.environ.get(self.http.api_key_env, "")
        headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
        self._client = httpx.Client(base_url=self.http.base_url.rstrip("/"), headers=headers,
                                    timeout=self.http.timeout_s)
        self.free_fallbacks = 0  # how many constrained requests were sent again without their schema

    def close(self) -> None:
        self._client.close()

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        with ThreadPoolExecutor(max_workers=self.http.concurrency) as pool:
            return list(pool.map(self._one, requests))

    def _payload(self, request: GenerationRequest, constrained: bool) -> dict:
        body = {
            "model": self.model_id,
            "messages": request.messages,
            "max_tokens": request.max_new_tokens,
            "temperature": 0.0,
        }
        if self.config.logprobs_top_k:
            body["logprobs"] = True
            body["top_logprobs"] = self.config.logprobs_top_k
        if constrained:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": request.operation, "schema": request.schema, "strict": True},
            }
        return body

    def _one(self, request: GenerationRequest) -> GenerationResult:
        constrained = request.constrained
        try:
            return self._post(request, constrained)
        except SchemaRejected as err:
            if self.http.on_schema_rejected != "free":
                raise
            log.warning("%s; decoding freely instead (recorded as constrained=false)", err)
            self.free_fallbacks += 1
            return self._post(request, False)

    def _post(self, request: GenerationRequest, constrained: bool) -> GenerationResult:
        body = self._payload(request, constrained)
        last_error = ""
        for attempt in range(self.http.max_retries + 1):
            if attempt:
                time.sleep(self.http.backoff_s * 2 ** (attempt - 1))
            started = time.perf_counter()
            try:
                response = self._client.post("/chat/completions", json=body)
            except httpx.TransportError as err:  # timeouts, refused or dropped connections
                last_error = f"{type(err).__name__}: {err}"
                continue
            if response.status_code in RETRY_STATUS:
                last_error = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                if constrained and response.status_code in (400, 422):
                    raise SchemaRejected(
                        f"{self.http.base_url} rejected the {request.operation} request with response_format "
                        f"(HTTP {response.status_code}: {response.text[:200]})"
                    )
                raise TeacherUnavailable(f"{self.http.base_url}: HTTP {response.status_code}: {response.text[:200]}")
            return self._result(response.json(), constrained, time.perf_counter() - started)
        raise TeacherUnavailable(
            f"{self.http.base_url}: gave up after {self.http.max_retries + 1} attempts ({last_error})"
        )

    def _result(self, data: dict, constrained: bool, elapsed: float) -> GenerationResult:
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError):
            raise TeacherUnavailable(f"{self.http.base_url}: response without choices[0].message") from None
        usage = data.get("usage") or {}
        top = None
        content_lp = (choice.get("logprobs") or {}).get("content")
        if content_lp:
            # Token ids are not portable over HTTP: keep the ranks only when the server sends ids.
            top = [[(int(t.get("token_id", -1)), float(t["logprob"])) for t in step.get("top_logprobs", [])]
                   for step in content_lp]
        return GenerationResult(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            latency_s=elapsed,
            batch_size=1,
            constrained=constrained,
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            top_logprobs=top,
        )
