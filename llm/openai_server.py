"""An OpenAI-compatible server (FastAPI + uvicorn) on one local model: the student with every expert
(`memlora serve-experts`, the request's `model` picks the expert) or any single model such as the teacher
(`memlora serve-model`).

Requests that arrive together are merged into shared batches per expert by the same micro-batcher that merges
traced conversations' calls. Every request is checked before it joins a batch (size, nesting, model, fields,
schema, context length), off the event loop and within a time limit, so a bad one gets its own OpenAI-shaped
error and never fails or delays the batch it would have joined; a client that hangs up takes its row out of the
batch at the next decode step; at most `serving.max_queued` requests are admitted at once (429 beyond).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from memlora.config import OPERATIONS, CaptureRule, ServingConfig
from memlora.llm.batcher import MicroBatcher
from memlora.llm.call_rules import classify, schema_for
from memlora.llm.client_template import AS_SENT, MISMATCH, REDUCED
from memlora.llm.continuous import continuous_decoder
from memlora.llm.decoding import Decoded
from memlora.llm.fallback import TeacherStream
from memlora.llm.hf_backend import TransformersBackend
from memlora.llm.guard import ANSWERED_BY, TEACHER
from memlora.llm.metrics import serve_metrics
from memlora.llm.openai_protocol import DONE, ApiError, ChatRequest, Unsupported, call_context, chunk_head, \
    completion_body, delta_chunk, error_body, models_body, parse_chat_request, sse, sse_events, stream_chunks, \
    streamable, token_entries, usage_chunk, usage_of
from memlora.llm.reload import close_later
from memlora.llm.request_limits import Admission, BodyLimit, check_schema, client_stays, drop_outcome, \
    parse_json_body, rss_mib
from memlora.memory.llm import GenerationRequest, GenerationResult
from memlora.memory.prompts import own_operation

log = logging.getLogger("memlora.serve")

ANY_JSON_OBJECT = {"type": "object"}  # json_object with no rule for the call: any JSON object
BASE = "base"  # the operation name of the bare student (no expert)
MODEL = "model"  # the operation name of a single served model (serve-model): no expert to pick
ROUTED = "routed"  # not an operation: the request's capture rule picks the expert


@dataclass(frozen=True)
class ServedModel:
    name: str  # what a client puts in `model`
    operation: str  # the memory operation whose expert answers (BASE: none)


class ServingEngine:
    """Turns OpenAI requests into the memory system's `GenerationRequest`s on one backend."""

    def __init__(self, backend: TransformersBackend, models: list[ServedModel], rules: list[CaptureRule] = (),
                 *, default_max_tokens: int = 512, linger_s: float = 0.02, limits: ServingConfig | None = None,
                 fallback=None):
        self.backend, self.rules = backend, list(rules)
        self.models = {m.name: m for m in models}
        self.experts = set(getattr(backend, "operations", ()))
        self.default_max_tokens = default_max_tokens
        self.context = int(getattr(backend.model.config, "max_position_embeddings", 0) or 0)
        self.limits, self.linger_s = limits or ServingConfig(), linger_s
        backend.grammars.max_size = self.limits.grammar_cache_size
        self.batcher = self._batcher(backend)
        self.reloader = None  # llm.reload.Reloader: new experts without a restart
        self.admission = Admission(self.limits.max_queued, self.limits.retry_after_s)
        # Parsing, tokenizing and compiling schemas run here, never on the event loop (xgrammar and the
        # tokenizer release the GIL): a slow request is slow only for itself.
        self._preparing = ThreadPoolExecutor(max_workers=4, thread_name_prefix="memlora-prepare")
        self.counts: Counter = Counter()
        # llm.fallback.Fallback (unsure experts defer to the teacher) or llm.guard.Guard (no teacher: unsure
        # destructive answers are demoted)
        self.fallback = fallback
        if fallback is not None:
            fallback.policy = self._bound(fallback.policy, backend)

    @staticmethod
    def _bound(policy, backend):
        """The thresholds as they apply to `backend`'s experts: those fitted on other experts are dropped."""
        bound = policy.for_experts(getattr(backend, "digests", {}))
        if bound.stale:
            log.warning("deferral thresholds of %s were calibrated for other experts than those served: every "
                        "answer of theirs is deferred (--guard: unsure destructive ones demoted) until `memlora "
                        "calibrate` runs", ", ".join(bound.stale))
        return bound

    def _batcher(self, backend) -> MicroBatcher:
        decoder = continuous_decoder(backend, backend.batch_size) if self.limits.continuous_batching else None
        return MicroBatcher(backend, backend.batch_size, linger_s=self.linger_s, decoder=decoder)

    def swap(self, loaded: dict) -> None:
        """Serve `loaded["backend"]` (with its `models`, and the fallback's new `policy`; the policy alone where
        only the thresholds changed) from the next request on; call it on the event loop, where requests are
        submitted, so none lands on the batcher being closed. What was queued on the old backend finishes there."""
        if self.fallback is not None and loaded.get("policy") is not None:
            self.fallback.policy = self._bound(loaded["policy"], loaded.get("backend", self.backend))
        if "backend" not in loaded:  # new thresholds only: the experts serving now stay
            return
        backend = loaded["backend"]
        backend.grammars.max_size = self.limits.grammar_cache_size
        old, self.batcher = self.batcher, self._batcher(backend)
        self.backend, self.experts = backend, set(getattr(backend, "operations", ()))
        self.models = {m.name: m for m in loaded.get("models") or self.models.values()}
        close_later(old)

    @property
    def has_teacher(self) -> bool:
        """A fallback teacher stands behind the experts (`--fallback`; `--guard` has none)."""
        return self.fallback is not None and self.fallback.has_teacher

    def defers(self, operation: str) -> bool:
        """Whether an answer of `operation` is judged on its confidence (an expert answers it; --fallback or
        --guard)."""
        return self.fallback is not None and operation in self.experts

    def straight_to_teacher(self, operation: str) -> bool:
        """With a teacher, an operation whose thresholds keep no answer: the teacher takes its calls without the
        expert decoding them first (its answer could only be thrown away, and the client would wait for both)."""
        return self.has_teacher and self.defers(operation) and self.fallback.policy.keeps_nothing(operation)

    def unserved(self, chat: ChatRequest) -> str | None:
        """With a fallback, the operation of a call routed by the rules to an operation no expert serves yet
        (it goes to the teacher, not to the bare student); None otherwise."""
        if not self.has_teacher or self.models[chat.model].operation != ROUTED:
            return None
        wanted = self.named_operation(chat)
        return wanted if wanted is not None and wanted not in self.experts else None

    def named_operation(self, chat: ChatRequest) -> str | None:
        """The operation the call's capture rule, else its prompt of ours, names; None for neither."""
        messages = chat.plain_messages()
        return routed_operation(classify(self.rules, messages, chat.model), messages)

    def operation_of(self, chat: ChatRequest, generation: GenerationRequest) -> str:
        """The memory operation a call belongs to, for its metrics: its expert's, else the one its capture rule
        or its prompt of ours names (a call to serve-model's teacher or to the bare student); `other` if none."""
        if generation.operation not in (BASE, MODEL, ROUTED):
            return generation.operation
        return self.named_operation(chat) or "other"

    def close(self) -> None:
        self.batcher.close()
        self._preparing.shutdown(wait=False, cancel_futures=True)

    def health(self) -> dict:
        """What an operator watches: the queue, the batch, the grammar cache, the process's memory, the counts."""
        return {
            "status": "ok", "models": self.model_names(),
            "queue": {"admitted": self.admission.admitted, "limit": self.admission.limit,
                      "waiting": self.batcher.waiting, "in_flight_rows": self.batcher.in_flight},
            "grammar_cache": {"size": len(self.backend.grammars), "limit": self.backend.grammars.max_size},
            "rss_mib": rss_mib(),
            "counts": {**self.counts, "refused_busy": self.admission.refused,
                       "isolated_batch_failures": self.batcher.isolated_failures},
            **({"deferral": self.fallback.health()} if self.fallback is not None else {}),
            **({"experts": self.reloader.health()} if self.reloader is not None else {}),
        }

    def prepare(self, raw: bytes) -> tuple[ChatRequest, GenerationRequest]:
        """The body, checked and turned into the call the batcher takes (runs on a worker thread)."""
        chat = parse_chat_request(parse_json_body(raw, self.limits.max_json_depth))
        return chat, self.to_request(chat)

    async def prepared(self, raw: bytes) -> tuple[ChatRequest, GenerationRequest]:
        work = asyncio.wrap_future(self._preparing.submit(self.prepare, raw))
        try:
            return await asyncio.wait_for(asyncio.shield(work), self.limits.schema_timeout_s)
        except asyncio.TimeoutError:
            self.counts["prepare_timeouts"] += 1
            work.add_done_callback(drop_outcome)
            raise ApiError(400, f"response_format: the request could not be prepared within "
                           f"{self.limits.schema_timeout_s:g} s (its JSON schema is too complex to compile)",
                           param="response_format") from None

    def model_names(self) -> list[str]:
        return list(self.models)

    def _operation(self, served: ServedModel, rule: CaptureRule | None, messages: list[dict]) -> str:
        """The expert a request runs on: its model's, or for the routed name the one its rule names (a client
        such as Mem0 sends every call under one model name) or whose prompt of ours it was built with; the bare
        base where there is no such expert."""
        if served.operation != ROUTED:
            return served.operation
        wanted = routed_operation(rule, messages)
        return wanted if wanted in self.experts else BASE

    def routing_line(self) -> str | None:
        """What the routed model will do, said at start (None: no routed model, as in serve-model): a server whose
        routed name silently answered with the bare base was a newcomer's first surprise."""
        routed = next((name for name, m in self.models.items() if m.operation == ROUTED), None)
        if routed is None:
            return None
        rules = ", ".join(r.operation for r in self.rules) or "none"
        straight = [op for op in OPERATIONS if self.straight_to_teacher(op)]
        return (f"model {routed!r}: this project's own memory prompts go to their experts "
                f"({', '.join(op for op in OPERATIONS if op in self.experts) or 'none trained'}); "
                f"capture.rules route other clients' calls (rules: {rules}); any other call is answered by "
                + ("the fallback teacher" if self.has_teacher else "the bare student base")
                + f"; `{routed}-<operation>` picks an expert by name"
                + (f"; the thresholds keep no answer of {', '.join(straight)}: those calls go to the teacher "
                   "without the expert (until a recalibration keeps some)" if straight else ""))

    def _schema(self, chat: ChatRequest, operation: str, rule: CaptureRule | None) -> dict | None:
        fmt = chat.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise ApiError(400, "response_format.json_schema.schema: required for type json_schema",
                               param="response_format")
            return fmt.json_schema.json_schema
        # json_object: the schema of the rule the call matches (two client releases may shape one operation's
        # answer differently: Mem0 1.x's facts, 2.x's memories), else the operation's first rule's, else any JSON
        if rule is not None and rule.output_schema and (rule.operation == operation or operation not in OPERATIONS):
            return rule.output_schema
        if operation in OPERATIONS:
            return schema_for(self.rules, operation) or ANY_JSON_OBJECT
        return ANY_JSON_OBJECT

    def to_request(self, chat: ChatRequest) -> GenerationRequest:
        served = self.models.get(chat.model)
        if served is None:
            raise ApiError(404, f"The model {chat.model!r} does not exist; this server has: "
                           f"{', '.join(self.models)}", param="model", code="model_not_found")
        messages = chat.plain_messages()
        rule = classify(self.rules, messages, chat.model)
        operation = self._operation(served, rule, messages)
        schema = self._schema(chat, operation, rule)
        if schema is not None:
            check_schema(schema, self.limits.max_schema_depth)
            try:
                self.backend.grammars.grammar(schema)
            except Exception as err:  # noqa: BLE001  (xgrammar raises plain RuntimeErrors)
                raise ApiError(400, f"response_format: the JSON schema cannot be compiled to a grammar: {err}",
                               param="response_format") from None
        # What the model will read: an expert reads a client's call cut to what changes (its client template)
        view, how = (self.backend.expert_view(operation, messages) if hasattr(self.backend, "expert_view")
                     else (messages, AS_SENT))
        if how in (REDUCED, MISMATCH):
            self.counts[f"{operation}_{how}"] += 1  # a client whose prompt no longer matches: flagged at /health
        try:
            prompt = self.backend.prompt_text(GenerationRequest(operation, view, 1))
        except Exception as err:  # noqa: BLE001  (a chat template rejects the message order or roles)
            raise ApiError(400, f"messages: the model's chat template cannot render them: {err}",
                           param="messages") from None
        prompt_tokens = len(self.backend.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        asked = chat.max_completion_tokens or chat.max_tokens
        room = self.context - prompt_tokens if self.context else None
        if room is not None and (room <= 0 or (asked is not None and asked > room)):
            why = (f" (the call does not match the client template the {operation} expert was trained on, so it "
                   "is read whole)" if how == MISMATCH else "")
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens; the messages take "
                           f"{prompt_tokens} and {asked or 'at least 1'} more were asked for{why}",
                           param="messages", code="context_length_exceeded")
        max_new = asked or min(self.default_max_tokens, room or self.default_max_tokens)
        top_k = (max(1, chat.top_logprobs or 0)) if chat.logprobs else 0
        if self.defers(operation):
            top_k = max(1, top_k)  # the expert's confidence is read from its chosen tokens' log-probs
        return GenerationRequest(
            operation=operation, messages=messages, max_new_tokens=max_new, schema=schema,
            logprobs_top_k=top_k, temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed,
            stop=chat.stops(),
        )

    async def answer_unless_gone(self, request: Request, generation: GenerationRequest) -> GenerationResult | None:
        """The call's result, or None once its client has hung up: then its row leaves the batch at the next
        decode step (or is never decoded), and nobody else waits for it."""
        cancel = threading.Event()
        waiting = asyncio.wrap_future(self.batcher.submit(replace(generation, cancel=cancel)))
        if await client_stays(request, waiting):
            return waiting.result()
        cancel.set()
        self.counts["client_left"] += 1
        return None

    def streams_tokens(self, chat: ChatRequest, generation: GenerationRequest) -> bool:
        """Whether a streamed answer goes out token by token as it is decoded: not where it is judged first
        (--fallback, --guard: the teacher may overrule it)."""
        return chat.stream and not self.defers(generation.operation)

    def stream_tokens(self, chat: ChatRequest, generation: GenerationRequest, slot: ExitStack) -> StreamingResponse:
        """The call decoded with its text streamed as it grows (`streamable`), each piece with the log-probs of
        the tokens decoded since the last where asked; `slot` (its admission) is closed once it is answered, and a
        client that hangs up takes its row out of the batch at the next step."""
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue = asyncio.Queue()

        def post(item) -> None:  # from the decoding thread
            try:
                loop.call_soon_threadsafe(progress.put_nowait, item)
            except RuntimeError:  # the event loop has closed (shutdown): nobody reads it
                pass

        def decoded(out) -> None:  # from the decoding thread, on its hot path: the row and its length, no copy
            post((out, len(out.tokens)))  # (its lists only grow: their first n entries stay as they are)

        def answered(_) -> None:  # from the decoding thread
            slot.close()  # admission counts the calls waiting or decoding; this one no longer is
            post(None)

        cancel = threading.Event()
        waiting = self.batcher.submit(replace(generation, cancel=cancel, on_tokens=decoded))
        waiting.add_done_callback(answered)
        head, usage, tokenizer = chunk_head(chat.model), chat.stream_usage(), self.backend.tokenizer
        entries_sent = 0

        def piece(text: str, out, n: int) -> bytes:
            """A chunk of `text` with the log-probs of `out`'s first `n` tokens not sent yet (where asked)."""
            nonlocal entries_sent
            logprobs = None
            if chat.logprobs and out.token_logprobs is not None:
                logprobs = {"content": token_entries(
                    tokenizer, out.tokens[entries_sent:n], out.token_logprobs[entries_sent:n],
                    out.top_logprobs[entries_sent:n], chat.top_logprobs or 0)}
                entries_sent = n
            return sse(delta_chunk(head, {"content": text}, logprobs=logprobs, include_usage=usage))

        async def events():
            try:
                yield sse(delta_chunk(head, {"role": "assistant", "content": ""}, include_usage=usage))
                sent, ended = "", False
                while not ended:
                    posted = [await progress.get()]
                    while not progress.empty():  # the decoder ran ahead: only the newest output matters
                        posted.append(progress.get_nowait())
                    ended = posted[-1] is None  # posted once the call is answered, after its last tokens
                    rows = [row for row in posted if row is not None]
                    if not rows:
                        continue
                    out, n = rows[-1]
                    text = streamable(tokenizer.decode(out.tokens[:n], skip_special_tokens=True), generation.stop)
                    if len(text) > len(sent) and text.startswith(sent):
                        yield piece(text[len(sent):], out, n)
                        sent = text
                try:
                    result = waiting.result()
                except Exception as err:  # noqa: BLE001  (the headers are gone: the error is the stream's last event)
                    log.exception("streamed call failed")
                    self.counts["stream_errors"] += 1
                    yield sse(error_body(500, f"internal error: {type(err).__name__}: {err}", "server_error"))
                    yield sse(DONE)
                    return
                rest = result.text[len(sent):]
                if not result.text.startswith(sent):  # never expected: what went out is not the answer's head
                    self.counts["stream_mismatches"] += 1
                    log.warning("streamed text %r is not the head of the answer %r", sent, result.text)
                    rest = ""
                last = Decoded(result.token_ids or [], True, result.top_logprobs, result.token_logprobs)
                if rest or (chat.logprobs and len(last.tokens) > entries_sent):
                    yield piece(rest, last, len(last.tokens))
                yield sse(delta_chunk(head, {}, finish_reason=result.finish_reason, include_usage=usage))
                if usage:
                    yield sse(usage_chunk(head, usage_of(result)))
                self.counts["streamed_token_by_token"] += 1
                yield sse(DONE)
            finally:
                gone()

        def gone() -> None:  # at the stream's end, and again when it is collected: once is enough
            if not waiting.done() and not cancel.is_set():  # the client hung up mid-stream, or before its first chunk
                cancel.set()
                self.counts["client_left"] += 1

        stream = events()
        weakref.finalize(stream, gone)  # a stream never started (its client left first) has no `finally` to run
        return StreamingResponse(stream, media_type="text/event-stream")

    def answer(self, chat: ChatRequest, result: GenerationResult) -> dict:
        return completion_body(result, chat.model, tokenizer=self.backend.tokenizer, logprobs=chat.logprobs,
                               top_logprobs=chat.top_logprobs or 0)


def add_error_handlers(app, api_key: str | None = None) -> None:
    """OpenAI-shaped errors for everything (ours, FastAPI's, unexpected ones) and the optional bearer key."""
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, err: HTTPException):
        return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError):
        return JSONResponse(error_body(400, str(err)), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(500, f"internal error: {type(err).__name__}: {err}", "server_error"),
                            status_code=500)

    if api_key:
        @app.middleware("http")
        async def _bearer(request: Request, call_next):
            if request.url.path.startswith("/v1/"):
                given = request.headers.get("authorization", "")
                if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    return JSONResponse(error_body(401, "Incorrect API key provided", "authentication_error"),
                                        status_code=401)
            return await call_next(request)


def create_app(engine: ServingEngine, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app):
        if engine.reloader is not None:
            engine.reloader.start()
        yield
        if engine.reloader is not None:
            await engine.reloader.stop()
        if engine.fallback is not None:
            await engine.fallback.aclose()

    app = FastAPI(title="memlora", docs_url=None, redoc_url=None, lifespan=lifespan)
    add_error_handlers(app, api_key)
    app.add_middleware(BodyLimit, max_bytes=engine.limits.max_body_bytes)

    metrics = serve_metrics(app, engine.health)

    @app.get("/health")
    async def health():
        return engine.health()

    @app.get("/v1/models")
    async def models():
        return models_body(engine.model_names())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        response = await answer_chat(request)
        metrics.answered(request, response, response.headers.get(ANSWERED_BY, "model"), started)
        return response

    async def answer_chat(request: Request) -> Response:
        with ExitStack() as slot:  # a stream streamed token by token takes its admission slot along (pop_all)
            slot.enter_context(engine.admission.slot())
            raw = await request.body()
            try:
                chat, generation = await engine.prepared(raw)
                request.state.operation = engine.operation_of(chat, generation)
            except Unsupported as err:  # with a teacher behind, what the experts cannot do is the teacher's
                if not engine.has_teacher:
                    raise
                response = await engine.fallback.pass_through(json.loads(raw), err.param)
                return relayed(response, {ANSWERED_BY: TEACHER})
            missing = engine.unserved(chat)
            if missing is not None:
                answered = await engine.fallback.instead(chat, missing, generation.schema,
                                                         call_context(request.headers))
                if answered is not None:
                    return reply(chat, answered, slot)
                # the teacher failed (counted): the bare student answers, as without a fallback
            teacher_failed = False
            if engine.straight_to_teacher(generation.operation):
                answered = await engine.fallback.straight(chat, generation.operation, generation.schema,
                                                          call_context(request.headers))
                if answered is not None:
                    return reply(chat, answered, slot)
                teacher_failed = True  # counted: the expert answers, as where a deferred call's teacher fails
            if engine.streams_tokens(chat, generation):
                return engine.stream_tokens(chat, generation, slot.pop_all())
            result = await engine.answer_unless_gone(request, generation)
            if result is None:  # the client hung up; there is nobody to answer (499: nginx's "client closed")
                return Response(status_code=499)
            if engine.defers(generation.operation):
                return reply(chat, await engine.fallback.answer(
                    chat, generation, result, engine.backend.tokenizer, call_context(request.headers),
                    lambda answered: engine.answer(chat, answered), teacher_failed=teacher_failed), slot)
        return respond(chat, engine.answer(chat, result))

    if engine.has_teacher:  # a client whose whole OpenAI base URL points here: its embeddings are the teacher's
        pass_other_endpoints(app, engine.admission, lambda method, path, request, **kw: engine.fallback.forward(
            method, path, path.strip("/").replace("/", "_"), **kw), {ANSWERED_BY: TEACHER})

    return app


def pass_other_endpoints(app, admission, forward, headers: dict | None = None) -> None:
    """Every other endpoint under /v1 (a client's embeddings, when its whole OpenAI base URL points here) goes
    upstream as it came, through `forward(method, path, request, content=, params=, headers=)` (an open
    streamed response), and back with its status, holding an admission slot to its end. Register it last: the
    routes before it match first."""
    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def other(path: str, request: Request):
        if path == "chat/completions":  # another method on it
            raise ApiError(405, f"{request.method} /v1/chat/completions: only POST is served")
        slot = ExitStack()
        slot.enter_context(admission.slot())
        try:
            sent = {"content-type": request.headers["content-type"]} if "content-type" in request.headers else {}
            response = await forward(request.method, f"/{path}", request, content=await request.body(),
                                     params=request.query_params, headers=sent)
        except BaseException:
            slot.close()
            raise
        return relayed(response, headers, on_close=slot.close)


# an upstream's response headers that a relayed answer keeps (its body is passed on as it came, undecoded)
RELAYED_HEADERS = {"content-type", "content-encoding", "retry-after", "x-request-id"}


def relayed(response, headers: dict | None = None, on_close=None) -> StreamingResponse:
    """An upstream's open `httpx` response passed on as it comes, with its status; closed (and `on_close` called)
    at its end or when the client hangs up."""
    kept = {k: v for k, v in response.headers.items() if k.lower() in RELAYED_HEADERS}
    return streaming(response.aiter_raw(), {**kept, **(headers or {})}, response.aclose, on_close,
                     status_code=response.status_code)


def streaming(events, headers: dict, aclose, on_close=None, **kwargs) -> StreamingResponse:
    """`events` (an upstream's, open until `aclose`) as a streamed response; `on_close` (sync) at its end or when
    the client hangs up; where the client left before the first byte (the body never started, so no `finally`
    runs), both once the body is collected."""
    loop, started = asyncio.get_running_loop(), []

    async def body():
        started.append(True)
        try:
            async for part in events:
                yield part
        finally:
            await aclose()
            if on_close is not None:
                on_close()

    def dropped() -> None:  # on whichever thread collects the body
        if started:
            return
        if on_close is not None:
            on_close()
        try:
            loop.call_soon_threadsafe(lambda: loop.create_task(aclose()))
        except RuntimeError:  # the loop is closed: so is its connection pool
            pass

    stream = body()
    weakref.finalize(stream, dropped)
    return StreamingResponse(stream, headers=headers, **kwargs)


def reply(chat: ChatRequest, answered: tuple[dict, dict] | TeacherStream, slot: ExitStack) -> Response:
    """A judged answer: (body, headers), as `respond` sends it, or the teacher's stream passed on as it comes,
    holding the call's admission slot to its end."""
    if isinstance(answered, TeacherStream):
        return streaming(answered.events, answered.headers, answered.close, slot.pop_all().close,
                         media_type="text/event-stream")
    return respond(chat, *answered)


def respond(chat: ChatRequest, body: dict, headers: dict | None = None) -> Response:
    """The answer as JSON, or for `stream: true` as server-sent chunks (the whole answer is decoded, and where
    the experts defer, judged, before its first chunk goes out; the headers say who answered all the same)."""
    if chat.stream:
        return StreamingResponse(sse_events(stream_chunks(body, chat.stream_usage())), headers=headers,
                                 media_type="text/event-stream")
    return JSONResponse(body, headers=headers)


def routed_operation(rule: CaptureRule | None, messages: list[dict]) -> str | None:
    """The operation a call under the routed name belongs to: its capture rule's, else the one whose prompt of
    ours it carries (this project's memory system needs no rules)."""
    return rule.operation if rule is not None else own_operation(messages)


def expert_models(operations: list[str], prefix: str = "memlora") -> list[ServedModel]:
    """`memlora` (the expert chosen per request by the capture rules), `memlora-<operation>` per expert, and
    `memlora-base` for the student without one."""
    return ([ServedModel(prefix, ROUTED)] + [ServedModel(f"{prefix}-{op}", op) for op in operations]
            + [ServedModel(f"{prefix}-{BASE}", BASE)])


def run_server(app, host: str, port: int, limits: ServingConfig | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then return after a graceful shutdown (requests in flight finish).
    uvicorn raises the signal again once it has stopped; the handlers set here take it, so the command can
    say what it did and exit 0 instead of dying by the signal."""
    import signal

    import uvicorn

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    limits = limits or ServingConfig()
    # uvicorn's own bound on open connections (503 past it), above the admission limit so that /health and the
    # 429s still get through while the queue is full.
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                  limit_concurrency=2 * limits.max_queued + 32)).run()
