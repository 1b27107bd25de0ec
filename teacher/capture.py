"""`memlora capture`: an OpenAI-compatible proxy in front of any teacher endpoint that records what a client's
memory system (Mem0, ...) asks, as trace rows in the same schema as ours.

Each call is forwarded as it came, except that a `json_object` request whose rule carries a schema goes out as
`json_schema` with it (a small teacher then answers in the shape the caller parses). Which operation a call
belongs to comes from `capture.rules`; a call no rule matches is forwarded and counted, not recorded. A recorded
call is written as its own Parquet shard (temporary name, then rename) before its response is returned, so a
killed proxy loses at most the calls in flight and never leaves half a row. A streamed call (`stream: true`) is
relayed chunk by chunk as the teacher sends it, and recorded from the joined chunks before the client gets the
stream's end (`data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import threading
import time
from collections import Counter
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path

import httpx
import jsonschema
import pyarrow as pa
from anyio import to_thread
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from memlora.config import CaptureConfig, CaptureRule, ServingConfig
from memlora.data.io import write_parquet
from memlora.data.split import CAPTURED_TEST_SUFFIX, CAPTURED_VALIDATION_SUFFIX, held_for_test
from memlora.data.schemas import TRACES
from memlora.layout import capture_shard_path, templates_path
from memlora.llm.call_rules import classify, fingerprint
from memlora.llm.client_template import changing_parts, current
from memlora.llm.metrics import serve_metrics
from memlora.llm.openai_protocol import DONE, ApiError, Message, RelayedStream, call_context, error_body, \
    plain_messages, sse, sse_events, stream_chunks
from memlora.llm.openai_server import add_error_handlers, pass_other_endpoints, streaming
from memlora.llm.request_limits import Admission, BodyLimit, client_stays, parse_json_body, rss_mib



def parse_output(text: str, schema: dict | None) -> tuple[dict | None, str | None]:
    """(parsed JSON, None) or (None, why not): malformed output is recorded raw and never trains."""
    body = text.strip()
    if body.startswith("```"):  # what Mem0 strips before parsing, so the row means what the client saw
        body = body.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(body)
    except ValueError as err:
        return None, f"invalid JSON: {err}"
    if schema is not None:
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as err:
            return None, f"schema: {err.message}"
    return value, None


def _top_logprobs(choice: dict) -> tuple[list[int] | None, list | None]:
    """Token ids and top-k log-probs where the upstream sends ids (vLLM, our servers); else (None, None)."""
    content = (choice.get("logprobs") or {}).get("content")
    if not content or any("token_id" not in step for step in content):
        return None, None
    ids = [int(step["token_id"]) for step in content]
    top = [[{"token_id": int(t["token_id"]), "logprob": float(t["logprob"])}
            for t in step.get("top_logprobs", []) if "token_id" in t] for step in content]
    return ids, top


log = logging.getLogger("memlora.capture")


class CaptureRecorder:
    """Writes one trace shard per recorded call and counts what passed through."""

    def __init__(self, out: str | Path, validation_ratio: float = 0.0, test_ratio: float = 0.0,
                 test_block: int = 20):
        self.out = Path(out)
        self.hold_out_every = round(1 / validation_ratio) if validation_ratio > 0 else 0
        self.test_ratio, self.test_block = test_ratio, test_block
        self._calls: Counter = Counter()
        # names each shard: unique across restarts (a container's proxy has the same pid every time) and
        # recorders in one process, or a shard would replace another's, or hide behind a merged one's name
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        self.counts: Counter = Counter()
        self._seq = itertools.count()
        self._steps: Counter = Counter()
        self._lock = threading.Lock()
        self._templates: dict = {}  # operation -> (the template file's mtime, its current template)

    @classmethod
    def from_config(cls, out: str | Path, config: CaptureConfig) -> "CaptureRecorder":
        return cls(out, config.validation_ratio, config.test_ratio, config.test_block)

    def row(self, rule: CaptureRule, messages: list[dict], sent_schema: dict | None, response: dict,
            latency_s: float, conversation: str | None, session: int) -> dict:
        choice = response["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content") or ""
        usage = response.get("usage") or {}
        parsed, error = parse_output(text, sent_schema)
        if message.get("tool_calls") and not text:  # kept as it came, never trained: the experts serve no tools
            text = json.dumps(message["tool_calls"])
            parsed, error = None, "a tool call: the experts are not trained on tool calls"
        ids, top = _top_logprobs(choice)
        with self._lock:
            seq = next(self._seq)
            cid = conversation or f"capture-{self.run_id}"
            if self.test_ratio and not conversation:  # no conversation named: blocks of consecutive calls
                cid += f"-b{seq // self.test_block:05d}"
            if held_for_test(cid, self.test_ratio):
                cid += CAPTURED_TEST_SUFFIX  # never trained on (data.split.captured_split)
            else:
                calls = self._calls[rule.operation]
                self._calls[rule.operation] += 1
                if self.hold_out_every and calls % self.hold_out_every == self.hold_out_every - 1:
                    cid += CAPTURED_VALIDATION_SUFFIX  # early stopping's rows
            step = self._steps[(cid, rule.operation)]
            self._steps[(cid, rule.operation)] += 1
        return {
            "trace_id": f"{cid}:{rule.operation}:{self.run_id}-{seq:06d}",
            "operation": rule.operation,
            "conversation_id": cid,
            "session": session,
            "step": step,
            "messages": messages,
            "output_schema": json.dumps(sent_schema) if sent_schema is not None else None,
            "raw_output": text,
            "parsed_output": json.dumps(parsed) if parsed is not None else None,
            "parse_ok": parsed is not None,
            "parse_error": error,
            "constrained": sent_schema is not None,
            "finish_reason": "length" if choice.get("finish_reason") == "length" else "stop",
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
            "completion_token_ids": ids,
            "top_logprobs": top,
            "latency_s": latency_s,
            "batch_size": 1,
            "model_id": str(response.get("model") or ""),
            "backend": "capture",
            "template_hash": fingerprint(messages)[:16],
            "decoding": None,
        }

    def write(self, row: dict) -> Path | None:
        """The row as a shard of its own, on disk before the call's answer goes back. Where it cannot be written
        (a full or read-only disk), None: the client still gets its answer (the teacher gave it; failing the call
        would not save the row), and the loss is counted (`record_failures` at /health) and logged."""
        path = capture_shard_path(self.out, row["operation"], row["trace_id"].rsplit(":", 1)[-1])
        try:
            write_parquet(pa.Table.from_pylist([row], schema=TRACES), path, "traces")
        except OSError as err:
            with self._lock:
                self.counts["record_failures"] += 1
                self.counts[f"record_failures_{row['operation']}"] += 1
            log.error("a %s call was answered but not recorded: %s", row["operation"], err)
            return None
        drifted = self.off_template(row["operation"], row["messages"])
        with self._lock:
            self.counts[f"recorded_{row['operation']}"] += 1
            self.counts["parse_failed"] += not row["parse_ok"]
            if drifted:
                self.counts[f"{row['operation']}_template_mismatch"] += 1
        return path

    def off_template(self, operation: str, messages: list[dict]) -> bool:
        """A recorded call that OUT's client template of its operation does not match (the client's prompt
        changed: a new release?): recorded all the same, and counted at /health."""
        path = templates_path(self.out, operation)
        stamp = path.stat().st_mtime_ns if path.is_file() else None
        cached = self._templates.get(operation)
        if cached is None or cached[0] != stamp:
            cached = self._templates[operation] = (stamp, current(path) if stamp is not None else None)
        return cached[1] is not None and changing_parts(cached[1], messages) is None

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1


def outgoing(body: dict, rule: CaptureRule | None, logprobs_top_k: int) -> tuple[dict, dict | None, bool]:
    """(the body to send upstream, the schema decoding runs under, whether log-probs were added for us)."""
    sent = dict(body)
    fmt = body.get("response_format") or {}
    schema = None
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
    elif fmt.get("type") == "json_object" and rule is not None and rule.output_schema is not None:
        schema = rule.output_schema
        sent["response_format"] = {"type": "json_schema", "json_schema": {
            "name": rule.operation, "schema": schema, "strict": True}}
    added = False
    if rule is not None and logprobs_top_k and not body.get("logprobs"):
        sent["logprobs"], sent["top_logprobs"], added = True, logprobs_top_k, True
    return sent, schema, added


def usage_for_us(sent: dict, rule: CaptureRule | None) -> bool:
    """A recorded stream asks for its usage chunk (the row's token counts) where the client did not; then that
    chunk is not relayed. Sets it in `sent`."""
    options = sent.get("stream_options") if isinstance(sent.get("stream_options"), dict) else {}
    if rule is None or options.get("include_usage"):
        return False
    sent["stream_options"] = {**options, "include_usage": True}
    return True


def create_capture_app(upstream: str, config: CaptureConfig, recorder: CaptureRecorder, *,
                       timeout_s: float = 600.0, upstream_key: str | None = None,
                       limits: ServingConfig | None = None) -> FastAPI:
    """The proxy, with the servers' protections: a body-size limit (413), nesting and text checks (400), an
    admission limit (429; a stream holds its slot to its end), and a client that hangs up cancels its upstream
    call (its teacher stops decoding it), is counted as `client_left` and leaves no row: no answer reached
    anyone."""
    base = upstream.rstrip("/")
    limits = limits or ServingConfig()
    client = httpx.AsyncClient(timeout=timeout_s)
    admission = Admission(limits.max_queued, limits.retry_after_s)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    app = FastAPI(title="memlora capture", docs_url=None, redoc_url=None, lifespan=lifespan)
    add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    def headers(request: Request) -> dict:
        key = upstream_key or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def forward(method: str, path: str, request: Request, stream: bool = False,
                      extra_headers: dict | None = None, **kwargs) -> httpx.Response:
        sent = client.build_request(method, f"{base}{path}", headers={**headers(request), **(extra_headers or {})},
                                    **kwargs)
        try:
            return await client.send(sent, stream=stream)
        except httpx.HTTPError as err:
            recorder.count("upstream_failed")
            raise ApiError(502, f"upstream {base} unreachable: {type(err).__name__}: {err}",
                           type="upstream_error") from None

    def health() -> dict:
        return {"status": "ok", "upstream": base,
                "queue": {"admitted": admission.admitted, "limit": admission.limit},
                "rss_mib": rss_mib(), "counts": {**recorder.counts, "refused_busy": admission.refused}}

    metrics = serve_metrics(app, health)

    @app.get("/health")
    async def health_now():
        return health()

    @app.get("/v1/models")
    async def models(request: Request):
        response = await forward("GET", "/models", request)
        return JSONResponse(_json_or_error(response), status_code=response.status_code)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        with ExitStack() as slot:  # a relayed stream takes its admission slot along (pop_all)
            slot.enter_context(admission.slot())
            response = await relay(request, slot)
        metrics.answered(request, response, "upstream", started)
        return response

    async def record(rule: CaptureRule | None, messages: list[dict], schema: dict | None, data: dict,
                     latency: float, request: Request) -> None:
        if rule is None:
            recorder.count("unmatched")
            return
        row = recorder.row(rule, messages, schema, data, latency, *call_context(request.headers))
        await to_thread.run_sync(recorder.write, row)

    async def relay(request: Request, slot: ExitStack):
        body = await to_thread.run_sync(parse_json_body, await request.body(), limits.max_json_depth)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            raise ApiError(400, "messages: a non-empty list is required", param="messages")
        try:
            messages = plain_messages([Message.model_validate(m) for m in body["messages"]])
        except ValueError as err:
            raise ApiError(400, f"messages: {err}", param="messages") from None
        rule = classify(config.rules, messages, str(body.get("model", "")))
        request.state.operation = rule.operation if rule is not None else "unmatched"
        sent, schema, added = outgoing(body, rule, config.logprobs_top_k)
        stream_asked = body.get("stream") is True
        usage_added = stream_asked and usage_for_us(sent, rule)
        recorder.count("forwarded")
        started = time.perf_counter()
        call = asyncio.ensure_future(forward("POST", "/chat/completions", request, stream=stream_asked, json=sent))
        if not await client_stays(request, call):
            call.cancel()  # closes the upstream connection: the teacher drops the row from its batch
            recorder.count("client_left")
            return Response(status_code=499)
        response = call.result()
        if stream_asked and response.status_code < 400 and \
                response.headers.get("content-type", "").startswith("text/event-stream"):
            return streaming(relay_stream(response, rule, messages, schema, added, usage_added, started, request),
                             {}, response.aclose, slot.pop_all().close, media_type="text/event-stream")
        if stream_asked:  # an error, or a whole answer where a stream was asked for: read it all
            await response.aread()
            await response.aclose()
        latency = time.perf_counter() - started
        if response.status_code >= 400:  # the upstream's own error, passed on as it is
            recorder.count("upstream_errors")
            if rule is not None:  # a call of a known operation the teacher could not answer (e.g. too long)
                recorder.count(f"upstream_errors_{rule.operation}")
            return JSONResponse(_json_or_error(response), status_code=response.status_code)
        data = _json_or_error(response)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices or not isinstance(choices[0], dict) or "message" not in choices[0]:
            recorder.count("upstream_garbage")
            raise ApiError(502, f"upstream {base} answered without choices[0].message: {response.text[:200]!r}",
                           type="upstream_error")
        await record(rule, messages, schema, data, latency, request)
        if added:  # the client did not ask for log-probs: it gets the answer it would have had
            for choice in choices:
                choice["logprobs"] = None
        if stream_asked:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(sse_events(stream_chunks(data, include_usage)), media_type="text/event-stream")
        return JSONResponse(data)

    async def relay_stream(response: httpx.Response, rule: CaptureRule | None, messages: list[dict],
                           schema: dict | None, added: bool, usage_added: bool, started: float, request: Request):
        """The teacher's chunks, passed on as they come; the call is recorded once the stream is whole, before
        the client gets its end. A stream cut short, or with a chunk that is not JSON or is an error, is relayed
        as it came and not recorded (counted). The upstream and the admission slot are closed by `streaming`."""
        stream = RelayedStream(response, started, added, usage_added)
        try:
            async for event in stream.events():
                yield event
            if stream.broken:
                recorder.count(stream.broken)
            else:
                await record(rule, messages, schema, stream.joined.body(), time.perf_counter() - started, request)
            if stream.whole:
                yield sse(DONE)
        except asyncio.CancelledError:  # the client hung up: no answer reached anyone, nothing is recorded
            recorder.count("client_left")
            raise

    async def passed(method: str, path: str, request: Request, headers: dict, **kwargs) -> httpx.Response:
        recorder.count("passed_through")
        return await forward(method, path, request, stream=True, extra_headers=headers, **kwargs)

    pass_other_endpoints(app, admission, passed)  # last: the routes above match first
    return app


def _json_or_error(response) -> dict:
    try:
        return response.json()
    except ValueError:
        return error_body(502, f"upstream answered HTTP {response.status_code} with a non-JSON body: "
                               f"{response.text[:200]!r}", "upstream_error")
