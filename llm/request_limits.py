"""What a served request may be, checked before it costs the server anything shared: the body's size (an ASGI
middleware answers 413 before reading it), its nesting and its strings (a 400 naming the field), a response
schema's depth and keywords (a 400 naming the keyword the grammar cannot enforce), and how many requests are
admitted at once (429 with Retry-After beyond that).

Each check answers the one client that sent the request; none of them reaches a shared batch.
"""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from memlora.llm.openai_protocol import ApiError, error_body

# JSON-schema keywords xgrammar 0.2.8 compiles without enforcing (measured: a value that breaks them is accepted
# by the compiled grammar) or compiles wrongly (a valid value is refused). Refused rather than silently ignored.
UNENFORCED_KEYWORDS = frozenset({
    "not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains", "maxProperties",
    "minProperties", "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedItems",
    "unevaluatedProperties",
})
# Keywords whose value maps names to subschemas, holds one subschema, or a list of them.
_NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions")
_ONE_SCHEMA = ("items", "additionalProperties", "propertyNames", "additionalItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")


def check_tree(value: Any, max_depth: int, root: str = "") -> None:
    """Nesting at most `max_depth` and every string (keys too) valid Unicode, or a 400 naming the path. Iterative:
    a body nested 50,000 deep must not exhaust the interpreter's stack here either."""
    stack = [(value, root, 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, path or "body")
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > max_depth:
            raise ApiError(400, f"{path or 'body'}: nested deeper than {max_depth} levels", param=path or None)
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            name = f"{path}.{key}" if path else str(key)
            if isinstance(key, str):
                _check_text(key, name)
            stack.append((child, name, depth + 1))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(400, f"{path}: not valid Unicode text ({err.reason} at character {err.start}: a lone "
                            "surrogate escape such as \\ud800)", param=path) from None


def parse_json_body(raw: bytes, max_depth: int) -> Any:
    """The body as JSON, or a 400: malformed, nested too deep, or holding text that is not Unicode."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"body: nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"malformed JSON body: {err}") from None
    check_tree(data, max_depth)
    return data


def check_schema(schema: Any, max_depth: int, param: str = "response_format.json_schema.schema") -> None:
    """A 400 naming the first keyword the grammar would silently not enforce, or a schema nested past
    `max_depth` subschemas (its compile time grows steeply with depth: 0.2 s at 50, 4.3 s at 200, measured)."""
    stack = [(schema, param, 1)]
    while stack:
        node, path, depth = stack.pop()
        if not isinstance(node, dict):
            continue  # booleans are schemas too; anything else is xgrammar's to refuse
        if depth > max_depth:
            raise ApiError(400, f"{path}: the schema nests deeper than {max_depth} levels", param="response_format")
        for keyword, value in node.items():
            where = f"{path}.{keyword}"
            if keyword in UNENFORCED_KEYWORDS:
                raise ApiError(400, f"{where}: the keyword {keyword!r} cannot be enforced by constrained "
                                    "decoding on this server; remove it (the output would silently ignore it)",
                               param="response_format")
            if keyword in _NAMED_SCHEMAS and isinstance(value, dict):
                stack.extend((sub, f"{where}.{name}", depth + 1) for name, sub in value.items())
            elif keyword in _ONE_SCHEMA and isinstance(value, dict):
                stack.append((value, where, depth + 1))
            elif keyword in _SCHEMA_LISTS and isinstance(value, list):
                stack.extend((sub, f"{where}.{i}", depth + 1) for i, sub in enumerate(value))


async def client_stays(request, waiting: asyncio.Future, poll_s: float = 0.05) -> bool:
    """Wait for `waiting`; True once it is done, False as soon as the client has hung up (then whatever it
    holds is the caller's to cancel, and its outcome, whenever it comes, is read here and dropped)."""
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=poll_s)
        if done:
            return True
        if await request.is_disconnected():
            waiting.add_done_callback(drop_outcome)
            return False


def drop_outcome(future) -> None:
    """Read an abandoned future's outcome so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


def rss_mib() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


class Admission:
    """At most `limit` requests admitted at once (waiting for a batch or decoding); the next gets a 429 that
    says when to retry, so a flood of valid requests degrades into quick refusals, not into unbounded waits."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit, self.retry_after_s = limit, retry_after_s
        self.admitted = 0
        self.refused = 0
        self._lock = threading.Lock()

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self.admitted >= self.limit:
                self.refused += 1
                raise ApiError(429, f"the server is busy: {self.admitted} requests are already queued (limit "
                                    f"{self.limit}); retry after {self.retry_after_s} s",
                               type="rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": str(self.retry_after_s)})
            self.admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self.admitted -= 1


class BodyLimit:
    """ASGI middleware: a POST body over `max_bytes` gets 413 at once, from its Content-Length before a byte
    of it is read, or as soon as a body without one grows past the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, int(declared))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, self._message(seen), type="invalid_request_error")
            return message

        await self.app(scope, limited_receive, send)

    def _message(self, size: int) -> str:
        return f"request body of {size} bytes or more is over this server's limit of {self.max_bytes} bytes"

    async def _refuse(self, send, size: int) -> None:
        body = json.dumps(error_body(413, self._message(size))).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
