"""One client cannot hurt another: each row of the hostile-client table (issue 27) on a real uvicorn server with a
tiny random model, each asserting what the well-behaved clients got. The soak runs `memlora serve-model` as its
own process. Every loop is bounded in count and time and talks only to 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pyarrow.parquet as pq
import pytest

from memlora.config import CaptureConfig, CaptureRule, ServingConfig
from memlora.llm.batcher import MicroBatcher
from memlora.llm.hf_backend import TransformersBackend
from memlora.llm.openai_server import MODEL, ServedModel, ServingEngine, create_app
from memlora.llm.request_limits import UNENFORCED_KEYWORDS, check_schema
from memlora.memory.llm import GenerationRequest
from memlora.teacher.capture import CaptureRecorder, create_capture_app
from tests.serving_fixtures import running

VALID = [{"role": "user", "content": "Ann: I have a cat."}]
FACTS = {"type": "object", "properties": {"facts": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                    "maxItems": 2}}, "required": ["facts"]}


def deep_schema(levels: int) -> dict:
    schema: dict = {"type": "string", "maxLength": 3}
    for _ in range(levels - 1):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


@pytest.fixture(scope="module")
def backend(tiny_backend):
    """The tiny model with a grammar cache of its own: the limits below must not change the shared backend's."""
    return TransformersBackend(tiny_backend.model, tiny_backend.tokenizer, "tiny", batch_size=8)


def serving(backend, **limits) -> ServingEngine:
    return ServingEngine(backend, [ServedModel("tiny", MODEL)], default_max_tokens=16,
                         limits=ServingConfig(**limits))


@pytest.fixture(scope="module")
def engine(backend):
    engine = serving(backend, grammar_cache_size=8, max_schema_depth=300, max_json_depth=700, schema_timeout_s=60)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    with running(create_app(engine)) as url:
        yield url


def post(url: str, timeout: float = 60, **body) -> httpx.Response:
    body = {"model": "tiny", "messages": VALID, "temperature": 0, "max_tokens": 6, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def well_behaved(url: str, n: int, **body) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: post(url, messages=[{"role": "user", "content": f"Ann: fact {i}"}], **body),
                             range(n)))


@pytest.mark.timeout(120)
def test_a_bad_seed_fails_alone_beside_seven_valid_requests(server):
    with ThreadPoolExecutor(8) as pool:
        bad = pool.submit(post, server, seed=2**70, temperature=1.0)
        good = [pool.submit(post, server, temperature=1.0, seed=i, messages=[{"role": "user", "content": f"n {i}"}])
                for i in range(7)]
        assert error_of(bad.result(), 400)["param"] == "seed"
        assert all(f.result().status_code == 200 for f in good)


@pytest.mark.timeout(120)
def test_a_call_that_fails_inside_a_merged_batch_fails_alone(backend):
    """Past the server's checks, a failure inside the model (here torch refusing a seed past 64 bits) reaches
    only the call that caused it: the merged batch is re-run call by call."""
    batcher = MicroBatcher(backend, 8, linger_s=0.2)
    try:
        good = [batcher.submit(GenerationRequest("model", [{"role": "user", "content": f"fact {i}"}], 4,
                                                 temperature=1.0, seed=i)) for i in range(7)]
        bad = batcher.submit(GenerationRequest("model", VALID, 4, temperature=1.0, seed=2**70))
        with pytest.raises((OverflowError, RuntimeError, ValueError)):
            bad.result(timeout=60)
        assert all(f.result(timeout=60).completion_tokens == 4 for f in good)
        assert batcher.isolated_failures == 1
    finally:
        batcher.close()


@pytest.mark.timeout(180)
def test_clients_that_hang_up_leave_the_batch_at_the_next_step(server, engine, monkeypatch):
    answers = []  # (cap, finish reason, tokens) of every call the backend answered, whichever way it batches
    inner = engine.backend.result

    def recording(request, *args):
        result = inner(request, *args)
        answers.append((request.max_new_tokens, result.finish_reason, result.completion_tokens))
        return result

    monkeypatch.setattr(engine.backend, "result", recording)
    long = 1500  # the random model never stops by itself: 1,500 steps of 4 rows take ~12 s on 2 cores
    with ThreadPoolExecutor(4) as pool:
        hangups = [pool.submit(post, server, max_tokens=long, timeout=1.0,
                               messages=[{"role": "user", "content": f"tell me {i}"}]) for i in range(4)]
        for f in hangups:
            with pytest.raises(httpx.TimeoutException):
                f.result()
    answered = post(server, max_tokens=5)
    assert answered.status_code == 200 and answered.json()["usage"]["completion_tokens"] == 5
    # each hung-up call either left its batch mid-decode or, still queued when its client left, was never decoded
    rows = [row for row in answers if row[0] == long]
    assert 1 <= len(rows) <= 4 and all(reason == "cancelled" for _, reason, _ in rows), rows
    assert all(tokens < long // 2 for _, _, tokens in rows), rows  # stopped soon after the hang-up
    health = httpx.get(f"{server}/health").json()
    assert health["counts"]["client_left"] >= 4 and health["queue"]["admitted"] == 0


@pytest.mark.timeout(120)
def test_a_ten_megabyte_body_is_refused_at_once_and_nothing_else_waits(server):
    huge = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (10 * 2**20)}]}).encode()
    response = httpx.post(f"{server}/v1/chat/completions", content=huge, timeout=60,
                          headers={"content-type": "application/json"})
    assert "over this server's limit" in error_of(response, 413)["message"]

    def chunks():  # no Content-Length: refused once the streamed body passes the limit
        for _ in range(10):
            yield b" " * 2**20

    streamed = httpx.post(f"{server}/v1/chat/completions", content=chunks(), timeout=60,
                          headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert all(r.status_code == 200 for r in well_behaved(server, 4))


@pytest.mark.timeout(180)
def test_forty_schemas_leave_the_grammar_cache_at_its_bound(server, engine):
    def one(i: int) -> httpx.Response:
        schema = {"type": "object", "properties": {f"field_{i}": {"type": "integer"}}, "required": [f"field_{i}"]}
        return post(server, max_tokens=12, response_format=json_format(schema))

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(40)))
    assert all(a.status_code == 200 for a in answers)
    health = httpx.get(f"{server}/health").json()
    assert health["grammar_cache"] == {"size": 8, "limit": 8} and len(engine.backend.grammars) == 8
    assert engine.backend.grammars.compiled >= 40


@pytest.mark.timeout(180)
def test_a_deep_schema_is_slow_only_for_itself(server):
    """A schema 150 subschemas deep takes seconds to compile (measured 4.3 s at 200); it compiles off the event
    loop, so /health and a valid request are answered meanwhile."""
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, server, max_tokens=12, response_format=json_format(deep_schema(150)), timeout=120)
        time.sleep(0.3)
        delays = []
        while not slow.done() and len(delays) < 100:
            started = time.perf_counter()
            assert httpx.get(f"{server}/health", timeout=10).status_code == 200
            delays.append(time.perf_counter() - started)
            time.sleep(0.05)
        meanwhile = post(server) if not slow.done() else None
        assert slow.result().status_code == 200
    assert delays and max(delays) < 1.0, delays
    assert meanwhile is None or meanwhile.status_code == 200


@pytest.mark.timeout(120)
def test_schema_depth_and_compile_time_limits(backend):
    engine = serving(backend, max_schema_depth=32, max_json_depth=700, schema_timeout_s=0.5)
    try:
        with running(create_app(engine)) as url:
            too_deep = error_of(post(url, response_format=json_format(deep_schema(40))), 400)
            assert "deeper than 32 levels" in too_deep["message"] and too_deep["param"] == "response_format"
            engine.limits = engine.limits.model_copy(update={"max_schema_depth": 300})
            slow = error_of(post(url, response_format=json_format(deep_schema(200))), 400)
            assert "within 0.5 s" in slow["message"]
            assert post(url).status_code == 200
            assert httpx.get(f"{url}/health").json()["counts"]["prepare_timeouts"] == 1
    finally:
        engine.close()


@pytest.mark.timeout(60)
def test_a_body_nested_fifty_thousand_deep_is_a_400(server):
    deep = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "metadata": ' + b"[" * 50_000 + \
        b"]" * 50_000 + b"}"
    assert "nested deeper" in error_of(httpx.post(f"{server}/v1/chat/completions", content=deep, timeout=30), 400)[
        "message"]
    nested = {"x": 1}
    for _ in range(710):
        nested = {"x": nested}
    error = error_of(post(server, metadata=nested), 400)
    assert "nested deeper than 700 levels" in error["message"] and error["param"].startswith("metadata.x")
    assert post(server).status_code == 200


@pytest.mark.timeout(60)
def test_a_lone_surrogate_is_a_400_naming_the_field(server):
    raw = b'{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    error = error_of(httpx.post(f"{server}/v1/chat/completions", content=raw, timeout=30), 400)
    assert error["param"] == "messages.0.content" and "surrogate" in error["message"]
    assert post(server).status_code == 200


@pytest.mark.timeout(60)
@pytest.mark.parametrize("schema, keyword", [
    ({"type": "object", "properties": {"a": {"not": {}}}}, "not"),
    ({"type": "string", "if": {"minLength": 1}, "then": {"maxLength": 2}}, "if"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
])
def test_schema_keywords_the_grammar_cannot_enforce_are_named(server, schema, keyword):
    error = error_of(post(server, response_format=json_format(schema)), 400)
    assert f"keyword {keyword!r} cannot be enforced" in error["message"]
    # a property merely named like a keyword is not a keyword
    check_schema({"type": "object", "properties": {kw: {"type": "string"} for kw in UNENFORCED_KEYWORDS}}, 32)


@pytest.mark.timeout(60)
def test_numbers_and_flags_are_strict(server):
    assert error_of(post(server, max_tokens=True), 400)["param"] == "max_tokens"
    assert error_of(post(server, logprobs="yes"), 400)["param"] == "logprobs"
    assert error_of(post(server, temperature=True), 400)["param"] == "temperature"
    assert error_of(post(server, seed=-(2**64)), 400)["param"] == "seed"
    assert post(server, temperature=1, seed=3).status_code == 200  # an integer is a number


@pytest.mark.timeout(180)
def test_a_full_queue_answers_429_with_retry_after_and_the_admitted_finish(backend):
    engine = serving(backend, max_queued=2, retry_after_s=3)
    try:
        with running(create_app(engine)) as url:
            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(lambda i: post(url, max_tokens=200, messages=[
                    {"role": "user", "content": f"flood {i}"}]), range(6)))
            busy = [a for a in answers if a.status_code == 429]
            assert busy and all(a.headers["retry-after"] == "3" for a in busy)
            assert all(a.json()["error"]["code"] == "rate_limit_exceeded" for a in busy)
            assert all(a.status_code in (200, 429) for a in answers) and len(busy) < 6
            health = httpx.get(f"{url}/health").json()
            assert health["queue"] == {"admitted": 0, "limit": 2, "waiting": 0, "in_flight_rows": 0}
            assert health["counts"]["refused_busy"] == len(busy) and health["rss_mib"] > 0
    finally:
        engine.close()


@pytest.mark.timeout(180)
def test_capture_cancels_the_upstream_call_of_a_client_that_left(server, engine, tmp_path):
    rules = [CaptureRule(operation="extraction", model="tiny")]
    recorder = CaptureRecorder(tmp_path / "out", validation_ratio=0.0)
    app = create_capture_app(f"{server}/v1", CaptureConfig(rules=rules), recorder,
                             limits=ServingConfig(max_body_bytes=2**20))
    left_before = engine.counts["client_left"]
    with running(app) as proxy:
        with pytest.raises(httpx.TimeoutException):
            post(proxy, max_tokens=1500, timeout=1.0)
        deadline = time.monotonic() + 30
        while engine.counts["client_left"] == left_before and time.monotonic() < deadline:
            time.sleep(0.1)  # the proxy's upstream call was closed: the server saw its client leave
        assert engine.counts["client_left"] == left_before + 1
        assert post(proxy, max_tokens=4).status_code == 200  # recorded
        assert error_of(httpx.post(f"{proxy}/v1/chat/completions", content=b"{" + b" " * (2 * 2**20) + b"}",
                                   timeout=30), 413)
        raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}'
        assert error_of(httpx.post(f"{proxy}/v1/chat/completions", content=raw, timeout=30), 400)[
            "param"] == "messages.0.content"
        counts = httpx.get(f"{proxy}/health").json()["counts"]
    assert counts["client_left"] == 1 and counts["recorded_extraction"] == 1 and counts["forwarded"] == 2
    shards = list((tmp_path / "out" / "traces" / "extraction").glob("*.parquet"))
    assert len(shards) == 1 and pq.read_table(shards[0]).num_rows == 1  # the abandoned call left no row
    assert threading.active_count() < 60


# 30 s in `make test` (a 30 s trial: 433 requests, every kind of bad one); MEMLORA_SOAK_S=3600 for a long one.
SOAK_S = float(__import__("os").environ.get("MEMLORA_SOAK_S", "30"))


@pytest.mark.timeout(SOAK_S + 240)
def test_soak_mixed_valid_and_bad_requests_against_serve_model(tmp_path, tiny_model_dir):
    """`memlora serve-model` as its own process, 8 clients for SOAK_S seconds sending valid and hostile requests
    mixed: every valid request is answered correctly, every bad one gets its own 4xx, memory stays within 64 MiB of
    where it was once every kind of request had been seen, and SIGINT leaves nothing running."""
    import os
    import signal
    import subprocess

    import jsonschema
    import psutil
    import yaml

    from memlora.processes import free_port, stop_group
    from memlora.serve import wait_healthy
    from tests.conftest import BIN, REPO

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"teacher": {"model": str(tiny_model_dir), "device": "cpu", "batch_size": 8},
                                      "serving": {"grammar_cache_size": 8, "max_body_bytes": 2**20}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(BIN / "memlora"), "serve-model", "--config", str(config), "--name", "tiny",
                             "--port", str(port), "--max-tokens", "8"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=REPO)
    schemas = iter(range(10**6))

    def request(kind: str) -> None:
        """One request of `kind`; asserts what its client must get."""
        if kind == "free":
            got = post(url, max_tokens=8)
            assert got.status_code == 200 and got.json()["usage"]["completion_tokens"] == 8, got.text
        elif kind == "facts":
            got = post(url, max_tokens=60, response_format=json_format(FACTS))
            assert got.status_code == 200, got.text
            if got.json()["choices"][0]["finish_reason"] == "stop":
                jsonschema.validate(json.loads(got.json()["choices"][0]["message"]["content"]), FACTS)
        elif kind == "new_schema":
            name = f"f{next(schemas)}"
            got = post(url, max_tokens=12, response_format=json_format(
                {"type": "object", "properties": {name: {"type": "integer"}}, "required": [name]}))
            assert got.status_code == 200, got.text
        elif kind == "hang_up":
            with pytest.raises(httpx.TimeoutException):
                post(url, max_tokens=1000, timeout=0.3)
        elif kind == "seed":
            assert error_of(post(url, seed=2**70, temperature=1.0), 400)["param"] == "seed"
        elif kind == "bool":
            assert error_of(post(url, max_tokens=True), 400)["param"] == "max_tokens"
        elif kind == "surrogate":
            raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'
            assert error_of(httpx.post(f"{url}/v1/chat/completions", content=raw, timeout=30), 400)
        elif kind == "not":
            assert error_of(post(url, response_format=json_format({"not": {}})), 400)
        elif kind == "model":
            assert error_of(post(url, model="nope"), 404)
        elif kind == "body":
            assert error_of(httpx.post(f"{url}/v1/chat/completions", content=b" " * (3 * 2**20), timeout=30), 413)
        elif kind == "deep":
            raw = b'{"metadata": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
            assert error_of(httpx.post(f"{url}/v1/chat/completions", content=raw, timeout=30), 400)
        elif kind == "malformed":
            assert error_of(httpx.post(f"{url}/v1/chat/completions", content=b"{nope", timeout=30), 400)

    kinds = ["free", "facts", "new_schema", "hang_up", "seed", "bool", "surrogate", "not", "model", "body", "deep",
             "malformed", "free", "facts"]
    try:
        wait_healthy(url, proc, timeout_s=180)
        with ThreadPoolExecutor(8) as pool:  # warm-up: every kind once, and the grammar cache filled past its bound
            list(pool.map(request, kinds + ["new_schema"] * 12))
        time.sleep(1.0)
        start_rss = httpx.get(f"{url}/health").json()["rss_mib"]
        done = []
        deadline = time.monotonic() + SOAK_S

        def client(seed: int) -> None:
            i = seed
            while time.monotonic() < deadline:
                kind = kinds[i % len(kinds)]
                request(kind)
                done.append(kind)
                i += 3

        with ThreadPoolExecutor(8) as pool:
            for f in [pool.submit(client, c) for c in range(8)]:
                f.result()
        time.sleep(1.0)
        health = httpx.get(f"{url}/health").json()
        assert len(done) > 100 and {"free", "facts", "hang_up", "body"} <= set(done)
        assert health["grammar_cache"]["size"] <= 8 and health["queue"]["admitted"] == 0
        assert health["queue"]["in_flight_rows"] == 0 and health["counts"]["client_left"] >= done.count("hang_up")
        assert health["rss_mib"] - start_rss < 64, (start_rss, health)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        print(f"soak: {len(done)} requests in {SOAK_S:.0f} s, RSS {start_rss} -> {health['rss_mib']} MiB")
    finally:
        stop_group(proc)
        log.close()
