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
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
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
                self._send(200, {
                    "choices": [{"message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 7},
                })

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
