"""The OpenAI chat-completions protocol, as far as this project's servers speak it: the request (validated,
unknown fields refused), OpenAI-shaped errors, and the response built from a `GenerationResult`.

A client such as Mem0 talks to `memlora serve-experts`, `serve-model` and `capture` exactly as to OpenAI; what
they cannot do (n > 1, tools, penalties, logit bias) is refused with a 400 that names the field (`Unsupported`;
behind `serve-experts --fallback` it goes to the teacher instead). `stream: true` gets the answer as server-sent
chunks: token by token as it is decoded (`streamable`), once it is decoded where it is judged first (a deferred
call's answer is known only then: `stream_chunks`), or as an upstream streams it (`RelayedStream`: `capture`, and
the teacher behind `serve-experts --fallback`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, \
    field_validator

from memlora.memory.llm import GenerationResult, cut_at_stop


CONVERSATION_HEADER = "x-memlora-conversation"  # optional: groups a client's calls (e.g. per Mem0 user)
SESSION_HEADER = "x-memlora-session"


def call_context(headers) -> tuple[str | None, int]:
    """(conversation, session) a client names in its headers, for the trace rows its calls become."""
    session = headers.get(SESSION_HEADER, "0")
    return headers.get(CONVERSATION_HEADER), int(session) if session.lstrip("-").isdigit() else 0


class ApiError(Exception):
    """An error the client gets as `{"error": {message, type, param, code}}` with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Unsupported(ApiError):
    """A valid request for what this server cannot do (tool calls, n > 1, penalties, logit bias): a 400, or with
    `serve-experts --fallback` the teacher's to answer, as it came."""

    def __init__(self, param: str, message: str):
        super().__init__(400, f"{param}: {message}", param=param)


def error_body(status: int, message: str, type: str = "invalid_request_error") -> dict:
    return ApiError(status, message, type=type).body()


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: the text ones, in order
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type", "text") == "text")
        return self.content or ""


def plain_messages(messages: list[Message]) -> list[dict]:
    """role/content dicts with string content: what chat templates, capture rules and trace rows take."""
    return [{"role": m.role, "content": m.text()} for m in messages]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = "output"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


INT64 = 2**63  # OpenAI's integers are 64-bit; torch's generator takes no larger seed


class ChatRequest(BaseModel):
    """The fields of the OpenAI API this server honours or knowingly ignores; any other field is an error.
    Numbers and flags are strict: `max_tokens: true` or `logprobs: "yes"` is a 400, not a silent 1 or True."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, gt=0, lt=INT64)
    max_completion_tokens: StrictInt | None = Field(None, gt=0, lt=INT64)
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 decodes greedily
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, lt=INT64)
    stop: str | list[str] | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    seed: StrictInt | None = Field(None, ge=-INT64, lt=INT64)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None  # include_usage honoured; anything else in it is ignored
    presence_penalty: StrictFloat = 0.0
    frequency_penalty: StrictFloat = 0.0
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None  # the older name of tools
    function_call: Any = None
    logit_bias: dict[str, Any] | None = None
    # Accepted and ignored: bookkeeping that does not change the completion.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)

    def plain_messages(self) -> list[dict]:
        return plain_messages(self.messages)

    def stream_usage(self) -> bool:
        """A streamed answer ends with a usage chunk only where the client asks (OpenAI's `include_usage`)."""
        return bool((self.stream_options or {}).get("include_usage"))

    def unsupported(self) -> ApiError | None:
        """What this server cannot honour, as the error to answer with."""
        if self.n != 1:
            return Unsupported("n", "only one choice per request is supported")
        for name in ("tools", "functions"):
            if getattr(self, name):
                return Unsupported(name, "tool calls are not supported by this server")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return Unsupported(name, "only 0 is supported")
        if self.logit_bias:
            return Unsupported("logit_bias", "only an empty bias is supported")
        if self.top_logprobs and not self.logprobs:
            return ApiError(400, "top_logprobs: requires logprobs: true", param="top_logprobs")
        return None


def parse_chat_request(data) -> ChatRequest:
    """The request (a parsed JSON body), or an ApiError naming what is wrong (a missing, unknown or bad field)."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        message = f"unknown field {param!r}" if first["type"] == "extra_forbidden" else f"{param}: {first['msg']}"
        raise ApiError(400, message, param=param) from None
    problem = request.unsupported()
    if problem is not None:
        raise problem
    return request


def _token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "token_id": token_id}


def logprobs_content(result: GenerationResult, tokenizer, top_k: int) -> list[dict] | None:
    """OpenAI's `choices[].logprobs.content`; each entry also carries `token_id` (as vLLM can), which is what
    `capture` and the HTTP teacher backend read to keep the teacher's distribution for distillation."""
    if result.token_ids is None or result.token_logprobs is None or result.top_logprobs is None:
        return None
    return token_entries(tokenizer, result.token_ids, result.token_logprobs, result.top_logprobs, top_k)


def token_entries(tokenizer, token_ids, token_logprobs, top_logprobs, top_k: int) -> list[dict]:
    """One `logprobs.content` entry per token (a streamed answer's chunks carry theirs piece by piece)."""
    content = []
    for token, logprob, top in zip(token_ids, token_logprobs, top_logprobs):
        entry = _token_entry(tokenizer, token, logprob)
        entry["top_logprobs"] = [_token_entry(tokenizer, t, lp) for t, lp in top[:top_k]]
        content.append(entry)
    return content


def completion_body(result: GenerationResult, model: str, *, tokenizer=None, logprobs: bool = False,
                    top_logprobs: int = 0) -> dict:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": result.text},
        "finish_reason": result.finish_reason,
        "logprobs": None,
    }
    if logprobs and tokenizer is not None:
        choice["logprobs"] = {"content": logprobs_content(result, tokenizer, top_logprobs)}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage_of(result),
    }


def usage_of(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def models_body(names: list[str]) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "memlora"}
                                       for n in names]}


DONE = "[DONE]"


def unreachable(base_url: str, headers: dict | None = None, timeout_s: float = 10) -> str | None:
    """Why an OpenAI-compatible server cannot be used (its GET /models fails), or None: the one start-up look at a
    teacher that `serve-experts --fallback` and `capture --upstream` both take."""
    try:
        response = httpx.get(f"{base_url.rstrip('/')}/models", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as err:
        return f"unreachable ({type(err).__name__}: {err})"
    return f"GET /models answered HTTP {response.status_code}" if response.status_code >= 400 else None


def chunk_head(model: str, completion_id: str | None = None, created: int | None = None) -> dict:
    """What every chunk of one streamed completion repeats."""
    return {"id": completion_id or f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": created or int(time.time()), "model": model}


def delta_chunk(head: dict, delta: dict, *, logprobs=None, finish_reason: str | None = None,
                include_usage: bool = False, index: int = 0) -> dict:
    return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
            **({"usage": None} if include_usage else {})}


def usage_chunk(head: dict, usage: dict | None) -> dict:
    """The last chunk where the client asked for `stream_options.include_usage`."""
    return {**head, "choices": [], "usage": usage}


def stream_chunks(body: dict, include_usage: bool = False) -> list[dict]:
    """A finished completion as the `chat.completion.chunk`s OpenAI streams: the role, the content (with its
    log-probs), the finish reason, then the usage where asked. Clients join the deltas back into `body`."""
    head = chunk_head(body.get("model", ""), body.get("id"), body.get("created"))
    chunks = []
    for choice in body.get("choices") or []:
        index, message = choice.get("index", 0), choice.get("message") or {}
        steps = [({"role": message.get("role", "assistant"), "content": ""}, None, None),
                 ({"content": message.get("content") or ""}, choice.get("logprobs"), None),
                 ({}, None, choice.get("finish_reason"))]
        chunks += [delta_chunk(head, delta, logprobs=logprobs, finish_reason=finish, include_usage=include_usage,
                               index=index) for delta, logprobs, finish in steps]
    if include_usage:
        chunks.append(usage_chunk(head, body.get("usage")))
    return chunks


def sse(chunk: dict | str) -> bytes:
    """One server-sent event: a chunk, or `DONE`."""
    return f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n".encode()


def sse_events(chunks: Iterable[dict]) -> Iterable[bytes]:
    """Server-sent events, as OpenAI ends them: `data: [DONE]`."""
    for chunk in chunks:
        yield sse(chunk)
    yield sse(DONE)


def streamable(text: str, stops: tuple[str, ...] = ()) -> str:
    """The part of a partly decoded answer that no later token can change, to stream now: at a stop string the
    text before it (the row ends there); else all but a character still missing bytes (U+FFFD at the end), a
    tail that may begin a stop string, and trailing whitespace (a tokenizer's clean-up may drop a space before
    the punctuation that follows)."""
    cut = cut_at_stop(text, stops)
    if len(cut) < len(text):
        return cut
    text = text.rstrip("\ufffd")
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - held].rstrip()


class StreamAssembler:
    """A streamed completion's chunks joined back into the completion body (what `capture` records): the first
    choice's deltas and log-probs in order, its finish reason, the usage chunk where the stream has one."""

    def __init__(self):
        self.head: dict = {}
        self.content: list[str] = []
        self.logprobs: list[dict] = []
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.deltas = 0  # the first choice's chunks: none means the stream held no answer

    def add(self, chunk: dict) -> None:
        if not isinstance(chunk, dict):
            raise ValueError(f"a stream chunk is not a JSON object: {str(chunk)[:100]!r}")
        for key in ("id", "created", "model"):
            self.head.setdefault(key, chunk.get(key))
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            self.deltas += 1
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self.content.append(delta["content"])
            self.logprobs += (choice.get("logprobs") or {}).get("content") or []
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def body(self) -> dict:
        return {**self.head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self.content)},
                             "finish_reason": self.finish_reason,
                             "logprobs": {"content": self.logprobs} if self.logprobs else None}],
                "usage": self.usage}


def as_client_asked(chunk: dict, logprobs_added: bool, usage_added: bool) -> dict | None:
    """A streamed chunk as the client would have had it without what was added for the trace row (None: the
    usage chunk it did not ask for)."""
    if usage_added:
        if not chunk.get("choices") and chunk.get("usage"):
            return None
        chunk.pop("usage", None)
    if logprobs_added:
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict):
                choice["logprobs"] = None
    return chunk


class RelayedStream:
    """An upstream's streamed answer (an open `httpx` response) passed on chunk by chunk as the client asked for
    it, and joined back (`joined`) for the trace row. Once `events` is through, `broken` says what was wrong
    with the stream (None: whole, with an answer): `upstream_errors` (an error event), `upstream_garbage` (a
    chunk that is not JSON, or no answer at all), `upstream_cut` (no `[DONE]`: the connection closed or broke,
    or a read timed out). `[DONE]` is not among the events: the caller records the call first, then ends the
    stream."""

    def __init__(self, response, started: float, logprobs_added: bool = False, usage_added: bool = False):
        self.response, self.started = response, started  # started: when the request went (the row's latency)
        self.logprobs_added, self.usage_added = logprobs_added, usage_added
        self.joined, self.whole, self.broken = StreamAssembler(), False, None

    async def events(self) -> AsyncIterator[bytes]:
        try:
            async for line in self.response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # event separators and SSE comments; every event is framed again here
                payload = line[len("data:"):].strip()
                if payload == DONE:
                    self.whole = True
                    break
                try:
                    chunk = json.loads(payload)
                    if isinstance(chunk, dict) and "error" in chunk:
                        self.broken = self.broken or "upstream_errors"
                    else:
                        self.joined.add(chunk)
                except ValueError:
                    self.broken, chunk = self.broken or "upstream_garbage", None
                if not isinstance(chunk, dict):
                    yield f"data: {payload}\n\n".encode()
                elif (relayed := as_client_asked(chunk, self.logprobs_added, self.usage_added)) is not None:
                    yield sse(relayed)
        except httpx.HTTPError:  # the upstream went silent past its read timeout, or its connection broke
            self.broken = self.broken or "upstream_cut"
        if not self.whole:
            self.broken = self.broken or "upstream_cut"
        elif not self.joined.deltas:
            self.broken = self.broken or "upstream_garbage"
