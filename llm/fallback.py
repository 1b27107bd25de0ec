"""The teacher behind the experts (`serve-experts --fallback URL`): every call is answered by its expert first;
where the expert's confidence (its own chosen tokens' log-probs, `llm.confidence`) is below the threshold
`memlora calibrate` set for its operation, the same request goes to the teacher and the teacher's answer goes
back. A deferred call is recorded as a trace row exactly as `capture` records one (`backend: deferred`), so the
next training run learns from what the experts could not answer.

An operation whose thresholds keep no answer at all (every class `inf`, as `memlora calibrate` writes where no
threshold meets the budget) goes to the teacher without its expert decoding first: that answer could only be
thrown away, and the client would wait for both models. The expert answers only if the teacher fails.

A teacher that is down, slow or answers garbage: the expert's own answer goes back and the failure is counted
(an update answer that would delete or rewrite a memory is demoted first, as `--guard` does), or, with
`deferral.strict`, the client gets a 502. The response says who answered: the `model` field and the
`x-memlora-answered-by` header (`expert`, `teacher`, `expert-teacher-failed`, or
`expert-demoted-teacher-failed`).

A streaming client gets the teacher's answer as the teacher streams it, chunk by chunk, wherever the teacher
answers (deferred, straight, no expert yet); the call is recorded once the stream is whole, before the client's
`[DONE]`. Only a teacher that fails before its first chunk can still be replaced by the expert's answer; a stream
that breaks after it (an error event, a read timeout, a connection that closes before `[DONE]`) is passed on as
far as it came and ended with an OpenAI-shaped error event and `[DONE]`, counted as the teacher's failure and not
recorded.

A share of the kept calls (`deferral.audit_share`) is also asked of the teacher once the expert's answer has gone
back, and recorded (`backend: audited`): with deferred calls drawn at the same share, a random sample of the
served traffic with the teacher's answers, on which `improve` recalibrates the served experts every night.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
from anyio import to_thread

from memlora.config import CaptureRule, DeferralConfig
from memlora.evaluation.calibration import AUDITED_BACKEND, DEFERRED_BACKEND, NO_EXPERT_BACKEND, DeferralPolicy
from memlora.llm.guard import ANSWERED_BY, CONFIDENCE, EXPERT, TEACHER, judged, made_safe
from memlora.llm.openai_protocol import DONE, ApiError, ChatRequest, RelayedStream, sse, unreachable
from memlora.memory.llm import GenerationRequest, GenerationResult


class FallbackError(RuntimeError):
    """The fallback teacher cannot be used at all (unreachable at start)."""


@dataclass
class TeacherStream:
    """The teacher's answer still streaming in, for a client that asked for a stream: `events` pass it on (and
    record the call at its end); `close` closes the teacher's response, once they are through or where the client
    left before the first chunk (`openai_server.streaming` calls it)."""
    events: AsyncIterator[bytes]
    headers: dict
    close: Callable[[], Awaitable[None]]


class Fallback:
    has_teacher = True  # unlike llm.guard.Guard, which stands where no teacher is

    def __init__(self, url: str, model: str, policy: DeferralPolicy, recorder, config: DeferralConfig,
                 api_key: str | None = None, logprobs_top_k: int = 0):
        self.url, self.model, self.policy, self.recorder, self.config = url.rstrip("/"), model, policy, recorder, \
            config
        self.logprobs_top_k = logprobs_top_k  # asked of the teacher for the trace row (capture.logprobs_top_k)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(timeout=config.timeout_s)
        self.counts: Counter = Counter()
        self._audits: set[asyncio.Task] = set()  # teacher calls for kept answers, running after the response

    def check_reachable(self) -> None:
        """One clear line at start when the teacher cannot be reached (unless the server may start degraded)."""
        problem = unreachable(self.url, self.headers)
        if problem:
            raise FallbackError(f"--fallback {self.url}: {problem}")

    async def aclose(self) -> None:
        """Audits in flight finish (and are recorded) before the client closes: no path loses a call."""
        if self._audits:
            await asyncio.gather(*self._audits, return_exceptions=True)
        await self.client.aclose()

    def request_body(self, chat: ChatRequest, schema: dict | None) -> tuple[dict, bool]:
        """The client's request as the teacher gets it (under the schema the expert decoded with, log-probs for the
        trace row), and whether log-probs were added for the row (the client then gets none)."""
        body = chat.model_dump(mode="json", exclude_unset=True, by_alias=True, exclude={"stream", "stream_options"})
        body["model"] = self.model
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
        added = bool(self.logprobs_top_k and not chat.logprobs)
        if added:
            body["logprobs"], body["top_logprobs"] = True, self.logprobs_top_k
        return body, added

    async def ask(self, chat: ChatRequest, schema: dict | None) -> tuple[dict | None, float, str | None]:
        """The teacher's whole answer to the client's own request, its latency, or why there is none."""
        body, _ = self.request_body(chat, schema)
        started = time.perf_counter()
        try:
            response = await self.client.post(f"{self.url}/chat/completions", json=body, headers=self.headers)
        except httpx.HTTPError as err:
            return None, 0.0, f"unreachable: {type(err).__name__}: {err}"
        return whole_answer(response, time.perf_counter() - started)

    async def ask_streaming(self, chat: ChatRequest,
                            schema: dict | None) -> tuple[RelayedStream | dict | None, float, str | None]:
        """The teacher's answer as it streams in (its usage asked for the trace row), or, where the teacher answers
        whole or fails before its first chunk, what `ask` gives."""
        body, added = self.request_body(chat, schema)
        body["stream"], body["stream_options"] = True, {"include_usage": True}
        started = time.perf_counter()
        try:
            response = await self.client.send(self.client.build_request(
                "POST", f"{self.url}/chat/completions", json=body, headers=self.headers), stream=True)
        except httpx.HTTPError as err:
            return None, 0.0, f"unreachable: {type(err).__name__}: {err}"
        if response.status_code < 400 and response.headers.get("content-type", "").startswith("text/event-stream"):
            return RelayedStream(response, started, added, usage_added=not chat.stream_usage()), 0.0, None
        try:
            await response.aread()
        except httpx.HTTPError as err:
            return None, time.perf_counter() - started, f"cut off: {type(err).__name__}: {err}"
        finally:
            await response.aclose()
        return whole_answer(response, time.perf_counter() - started)

    async def pass_through(self, body: dict, param: str) -> httpx.Response:
        """A request the experts cannot serve (`param`: tools, n > 1, ...) sent to the teacher as it came, under
        the teacher's model name; the response is open (streamed back as the teacher sends it). Not recorded: no
        expert learns it. Unreachable: a 502."""
        return await self.forward("POST", "/chat/completions", param, json={**body, "model": self.model})

    async def forward(self, method: str, path: str, what: str, **kwargs) -> httpx.Response:
        """Any request to the teacher's server (`what` names it in the counts: `passed_<what>`), its response
        open; unreachable: a 502."""
        self.counts[f"passed_{what}"] += 1
        request = self.client.build_request(method, f"{self.url}{path}", headers={**kwargs.pop("headers", {}),
                                                                                  **self.headers}, **kwargs)
        try:
            return await self.client.send(request, stream=True)
        except httpx.HTTPError as err:
            self.counts[f"teacher_failures_passed_{what}"] += 1
            raise ApiError(502, f"the fallback teacher {self.url} is unreachable for a call the experts cannot serve "
                           f"({what}): {type(err).__name__}: {err}", type="upstream_error") from None

    async def record(self, chat: ChatRequest, operation: str, schema: dict | None, data: dict, latency: float,
                     conversation: str | None, session: int, backend: str = DEFERRED_BACKEND) -> None:
        """The deferred (or audited) call as a trace row, on disk before the answer goes back."""
        row = self.recorder.row(CaptureRule(operation=operation, model=chat.model), chat.plain_messages(), schema,
                                data, latency, conversation, session)
        row["backend"] = backend
        await to_thread.run_sync(self.recorder.write, row)

    def failed(self, operation: str, why: str) -> None:
        self.counts[f"teacher_failures_{operation}"] += 1
        if self.config.strict:
            raise ApiError(502, f"the fallback teacher {self.url} failed for a deferred call: {why}",
                           type="upstream_error")

    def health(self) -> dict:
        return {"url": self.url, "model": self.model, "strict": self.config.strict, "counts": dict(self.counts),
                "stale_thresholds": self.policy.stale, "record_failures": self.recorder.counts["record_failures"]}

    async def straight(self, chat: ChatRequest, operation: str, schema: dict | None,
                       context: tuple[str | None, int]) -> tuple[dict, dict] | TeacherStream | None:
        """A call of an operation that keeps nothing, deferred before its expert decodes it; None where the
        teacher failed (counted; the expert then answers, through `answer(..., teacher_failed=True)`)."""
        self.counts[f"deferred_{operation}"] += 1
        self.counts[f"expert_skipped_{operation}"] += 1
        return await self.teacher(chat, operation, schema, context)

    async def answer(self, chat: ChatRequest, generation: GenerationRequest, result: GenerationResult, tokenizer,
                     context: tuple[str | None, int], expert_answer,
                     teacher_failed: bool = False) -> tuple[dict, dict] | TeacherStream:
        """(the response body, its headers): the expert's answer where it is sure enough, else the teacher's
        (recorded; for a streaming client its stream); `expert_answer(result)` builds the expert's body.
        `teacher_failed`: the call went `straight` to the teacher, which failed (counted there): the expert's
        answer, made safe, without asking again."""
        operation = generation.operation
        keep, conf, destructive = judged(self.policy, self.config, generation, result, tokenizer)
        headers = {CONFIDENCE: f"{conf:.4f}"}
        if keep:
            self.counts[f"kept_{operation}"] += 1
            if random.random() < self.config.audit_share:
                task = asyncio.get_running_loop().create_task(self.audit(chat, operation, generation.schema, context))
                self._audits.add(task)
                task.add_done_callback(self._audits.discard)
            return expert_answer(result), {**headers, ANSWERED_BY: EXPERT}
        answered = None
        if not teacher_failed:
            self.counts[f"deferred_{operation}"] += 1
            answered = await self.teacher(chat, operation, generation.schema, context, headers=headers)
        if answered is None and destructive:  # nobody sure of deleting or rewriting a memory: it stays
            self.counts[f"demoted_{operation}"] += 1
            return expert_answer(made_safe(result)), {**headers, ANSWERED_BY: "expert-demoted-teacher-failed"}
        if answered is None:
            return expert_answer(result), {**headers, ANSWERED_BY: "expert-teacher-failed"}
        return answered

    async def audit(self, chat: ChatRequest, operation: str, schema: dict | None,
                    context: tuple[str | None, int]) -> None:
        """The teacher's answer to a call the expert kept, recorded for calibration; a failure is only counted
        (the client has its answer)."""
        data, latency, error = await self.ask(chat, schema)
        if error is not None:
            self.counts[f"audit_failures_{operation}"] += 1
            return
        await self.record(chat, operation, schema, data, latency, *context, backend=AUDITED_BACKEND)
        self.counts[f"audited_{operation}"] += 1

    async def instead(self, chat: ChatRequest, operation: str, schema: dict | None,
                      context: tuple[str | None, int]) -> tuple[dict, dict] | TeacherStream | None:
        """A call of an operation no expert serves yet goes to the teacher (and is recorded: the first training
        rows of that expert) rather than to the bare student; None where the teacher failed (counted)."""
        self.counts[f"no_expert_{operation}"] += 1
        return await self.teacher(chat, operation, schema, context, backend=NO_EXPERT_BACKEND)

    async def teacher(self, chat: ChatRequest, operation: str, schema: dict | None, context: tuple[str | None, int],
                      backend: str = DEFERRED_BACKEND,
                      headers: dict | None = None) -> tuple[dict, dict] | TeacherStream | None:
        """The teacher's answer to the call, recorded, with `headers` and who answered: (body, headers), or for a
        streaming client a `TeacherStream` once the teacher's stream has begun; None where it failed before that
        (counted; 502 when strict)."""
        headers = {**(headers or {}), ANSWERED_BY: TEACHER}
        if chat.stream:
            data, latency, error = await self.ask_streaming(chat, schema)
            if isinstance(data, RelayedStream):
                return TeacherStream(self.relay(data, chat, operation, schema, context, backend), headers,
                                     data.response.aclose)
        else:
            data, latency, error = await self.ask(chat, schema)
        if error is not None:
            self.failed(operation, error)
            return None
        await self.record(chat, operation, schema, data, latency, *context, backend=backend)
        if not chat.logprobs:  # asked for the trace row, not by the client
            for choice in data["choices"]:
                choice["logprobs"] = None
        data["model"] = data.get("model") or self.model
        return data, headers

    async def relay(self, stream: RelayedStream, chat: ChatRequest, operation: str, schema: dict | None,
                    context: tuple[str | None, int], backend: str) -> AsyncIterator[bytes]:
        """The teacher's chunks as they come; the call recorded once the stream is whole, before the client's
        `[DONE]`. A stream that breaks is passed on as far as it came, then an error event: counted and not
        recorded (the client has seen part of the teacher's answer: the expert's cannot follow it)."""
        try:
            async for event in stream.events():
                yield event
            if stream.broken:
                self.counts[f"teacher_failures_{operation}"] += 1
                self.counts[f"teacher_stream_{stream.broken}"] += 1
                if not stream.whole:  # an OpenAI client takes a stream that just stops for a whole answer
                    yield sse(ApiError(502, f"the fallback teacher {self.url} broke off its stream for a deferred "
                                            f"call ({stream.broken})", type="upstream_error").body())
            else:
                await self.record(chat, operation, schema, stream.joined.body(),
                                  time.perf_counter() - stream.started, *context, backend=backend)
                self.counts["teacher_streamed"] += 1
            yield sse(DONE)
        except asyncio.CancelledError:  # the client hung up: the teacher's row is dropped, nothing is recorded
            self.counts["client_left"] += 1
            raise


def whole_answer(response: httpx.Response, latency: float) -> tuple[dict | None, float, str | None]:
    """(the teacher's answer, its latency, why there is none): an HTTP error, or a body without an answer."""
    if response.status_code >= 400:
        return None, latency, f"HTTP {response.status_code}: {response.text[:200]}"
    try:
        data = response.json()
        message = data["choices"][0]["message"]
        if not isinstance(message.get("content"), str):
            raise TypeError("choices[0].message.content is not text")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        return None, latency, f"an answer without choices[0].message.content ({err}): {response.text[:200]!r}"
    return data, latency, None
