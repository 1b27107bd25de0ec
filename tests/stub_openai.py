"""A small OpenAI-compatible chat server on 127.0.0.1 for backend tests: records what it receives and can be
told to reject schemas, fail a number of times, or stall."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubOpenAI:
    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []  # each request's headers, lower-cased names
        self.reject_schema = False
        self.fail_first = 0          # answer this many requests with `fail_status` first
        self.fail_status = 503
        self.stall_s = 0.0
        self.garbage = False         # answer 200 with a body that is not JSON
        self.reply = '{"facts": ["Ann has a cat"]}'
        # Per operation (the json_schema name), for runs of the whole memory system.
        self.replies: dict[str, str] = {}
        self.fail_after: int | None = None  # after this many good answers, every request gets HTTP 503
        self.served = 0
        # stream: true gets the reply in chunks of this many characters, `stream_gap_s` apart; after
        # `stream_cut_after` chunks the connection closes without `data: [DONE]`
        self.stream_piece, self.stream_gap_s, self.stream_cut_after = 4, 0.0, None
        self.streams_left = 0  # streams whose reader hung up before their end
        self.stream_whole = False  # answer `stream: true` with one JSON body, as a server that cannot stream does
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.endswith("/embeddings"):  # one vector per input, as OpenAI's embeddings answer
                    with stub._lock:
                        stub.requests.append(body)
                        stub.headers.append({k.lower(): v for k, v in self.headers.items()})
                    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                    return self._send(200, {"object": "list", "model": body.get("model"), "data": [
                        {"object": "embedding", "index": i, "embedding": [float(len(text)), 0.5]}
                        for i, text in enumerate(inputs)], "usage": {"prompt_tokens": 3, "total_tokens": 3}})
                with stub._lock:
                    stub.requests.append(body)
                    stub.headers.append({k.lower(): v for k, v in self.headers.items()})
                    failing = stub.fail_first > 0 or (stub.fail_after is not None and stub.served >= stub.fail_after)
                    if stub.fail_first > 0:
                        stub.fail_first -= 1
                    if not failing:
                        stub.served += 1
                if stub.stall_s:
                    time.sleep(stub.stall_s)
                if failing:
                    return self._send(stub.fail_status, {"error": {"message": "try later"}})
                if stub.garbage:
                    return self._send(200, None, raw=b"<html>upstream proxy error</html>")
                if stub.reject_schema and "response_format" in body:
                    return self._send(400, {"error": {"message": "response_format json_schema not supported"}})
                op = (body.get("response_format") or {}).get("json_schema", {}).get("name")
                reply = stub.replies.get(op, stub.reply)
                if body.get("stream") and not stub.stream_whole:
                    return self._stream(reply, bool((body.get("stream_options") or {}).get("include_usage")))
                self._send(200, {
                    "choices": [{"message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 7},
                })

            def _stream(self, reply: str, include_usage: bool):
                """OpenAI's chunks, written as they are made (HTTP/1.0: the stream ends when the connection does)."""
                head = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": "stub"}
                pieces = [reply[i:i + stub.stream_piece] for i in range(0, len(reply), stub.stream_piece)]
                deltas = ([{"role": "assistant", "content": ""}] + [{"content": p} for p in pieces] + [{}])
                chunks = [{**head, "choices": [{"index": 0, "delta": d, "logprobs": None,
                                                "finish_reason": "stop" if not d else None}]} for d in deltas]
                if include_usage:
                    chunks.append({**head, "choices": [], "usage": {"prompt_tokens": 11,
                                                                    "completion_tokens": len(pieces)}})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    for i, chunk in enumerate(chunks):
                        if stub.stream_cut_after is not None and i >= stub.stream_cut_after:
                            return
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        time.sleep(stub.stream_gap_s)
                    self.wfile.write(b"data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):  # the proxy hung up
                    with stub._lock:
                        stub.streams_left += 1

            def _send(self, status, payload, raw: bytes | None = None):
                data = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
