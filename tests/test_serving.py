"""The OpenAI-compatible server and the capture proxy, on real uvicorn servers, spoken to by the `openai`
client and raw HTTP (tiny random model: the protocol, batching and faults, not answer quality)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import jsonschema
import pyarrow.parquet as pq
import pytest

from memlora.config import CaptureConfig, CaptureRule, HttpConfig, LLMConfig, ServingConfig
from memlora.llm.openai_server import MODEL, ServedModel, ServingEngine, create_app
from memlora.memory.llm import GenerationRequest
from memlora.memory.prompts import TEMPLATES, extraction_schema
from memlora.teacher.capture import CaptureRecorder, create_capture_app
from tests.serving_fixtures import running, scrape
from tests.stub_openai import StubOpenAI

SCHEMA = extraction_schema(3, 40)
RULES = [
    CaptureRule(operation="extraction", system_contains="Personal Information Organizer", schema=SCHEMA),
    CaptureRule(operation="update", model="update-model"),
]


@pytest.fixture(scope="module")
def engine(tiny_backend):
    engine = ServingEngine(tiny_backend, [ServedModel("tiny", MODEL)], RULES, default_max_tokens=16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    with running(create_app(engine)) as url:
        yield url


def chat(url, timeout=60, **body):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Ann: I have a cat."}], "temperature": 0,
            **body}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


@pytest.mark.timeout(120)
def test_openai_client_gets_schema_valid_json_logprobs_and_stops(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Ann: I have a cat."}], temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "facts", "schema": SCHEMA}},
        logprobs=True, top_logprobs=3)
    jsonschema.validate(json.loads(done.choices[0].message.content), SCHEMA)
    assert done.usage.completion_tokens == len(done.choices[0].logprobs.content) > 0
    first = done.choices[0].logprobs.content[0]
    # at most 3 (the grammar leaves fewer allowed where it forces a token); greedy: the chosen is the top one
    assert all(1 <= len(step.top_logprobs) <= 3 for step in done.choices[0].logprobs.content)
    assert any(len(step.top_logprobs) == 3 for step in done.choices[0].logprobs.content)
    assert first.logprob == pytest.approx(first.top_logprobs[0].logprob)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    # json_object: the rule the call matches gives the schema (the system prompt names the operation)
    messages = [{"role": "system", "content": "You are a Personal Information Organizer."},
                {"role": "user", "content": "Ann: hi"}]
    obj = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=60,
                                         response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(obj.choices[0].message.content), SCHEMA)
    # a cap ends the answer with finish_reason length; a stop string ends it before the string
    capped = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=3)
    assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == 3
    free = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
    text = free.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        cut = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12,
                                             stop=[stop])
        assert cut.choices[0].message.content == text[: text.find(stop)]
    # sampling: the same seed gives the same text
    sampled = [client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, seed=7,
                                              max_tokens=8).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.timeout(120)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, engine):
    def error(response, status):
        assert response.status_code == status, response.text
        return response.json()["error"]

    raw = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", timeout=30,
                     headers={"content-type": "application/json"})
    assert "malformed JSON body" in error(raw, 400)["message"]
    assert error(chat(server, foo=1), 400)["message"] == "unknown field 'foo'"
    assert error(chat(server, messages=[]), 400)["param"] == "messages"
    missing = error(chat(server, model="nope"), 404)
    assert missing["code"] == "model_not_found" and "tiny" in missing["message"]
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "("}}}
    assert "cannot be compiled" in error(chat(server, response_format=bad_schema), 400)["message"]
    long = [{"role": "user", "content": "word " * 3000}]
    assert error(chat(server, messages=long), 400)["code"] == "context_length_exceeded"
    assert error(chat(server, n=2), 400)["param"] == "n"
    assert error(httpx.get(f"{server}/v1/nothing-here"), 404)["message"]
    # a client that hangs up mid-generation loses only its own answer
    with pytest.raises(httpx.TimeoutException):
        chat(server, max_tokens=400, timeout=0.05)
    assert chat(server, max_tokens=4).status_code == 200


@pytest.mark.timeout(120)
def test_a_streamed_answer_is_the_same_answer_in_chunks(server):
    """`stream: true` (the openai client's own stream reader): the deltas join into the answer the same request
    gets whole, with its log-probs and finish reason; the usage chunk comes only where it is asked for."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Ann: I have a cat."}], temperature=0,
               max_tokens=12, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[-1].choices
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    steps = [step for c in chunks if c.choices and c.choices[0].logprobs for step in c.choices[0].logprobs.content]
    assert [s.token for s in steps] == [s.token for s in whole.choices[0].logprobs.content]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and len({c.id for c in chunks}) == 1
    plain = list(client.chat.completions.create(**{**ask, "logprobs": False, "top_logprobs": None}, stream=True))
    assert all(c.usage is None and c.choices for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == whole.choices[0].message.content


def _events(response) -> list[dict | str]:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.timeout(120)
def test_a_streamed_answer_goes_out_token_by_token(server, engine):
    """Unjudged, a streamed answer's text goes out as it is decoded: its first chunks reach the client while the
    row still decodes, the deltas join into the whole answer (a stop string cut as there), the log-probs come
    with the pieces, and a client that leaves mid-stream takes its row out of the batch and frees its slot."""
    before = engine.counts["streamed_token_by_token"]
    answer = chat(server, max_tokens=24).json()
    whole, tokens = answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"]
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Ann: I have a cat."}], "temperature": 0,
            "max_tokens": 24, "stream": True}) as streamed:
        events = _events(streamed)
    deltas = [e["choices"][0]["delta"].get("content") for e in events[:-1] if e["choices"]]
    assert events[-1] == "[DONE]" and "".join(d or "" for d in deltas) == whole
    assert len([d for d in deltas if d]) > 1  # more than one piece: token by token, not the answer at once
    assert engine.counts["streamed_token_by_token"] == before + 1
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Ann: I have a cat."}], "temperature": 0,
            "max_tokens": 24, "stream": True, "logprobs": True, "top_logprobs": 2}) as streamed:
        pieces = [e["choices"][0] for e in _events(streamed)[:-1] if e["choices"]]
    assert "".join(p["delta"].get("content") or "" for p in pieces) == whole
    with_logprobs = [p for p in pieces if p["logprobs"]]
    assert len(with_logprobs) > 1 and sum(len(p["logprobs"]["content"]) for p in with_logprobs) == tokens
    stop = whole.strip()[len(whole.strip()) // 2:][:2]
    if stop.strip():
        cut = chat(server, max_tokens=24, stop=[stop]).json()["choices"][0]["message"]["content"]
        with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": [{"role": "user", "content": "Ann: I have a cat."}], "temperature": 0,
                "max_tokens": 24, "stream": True, "stop": [stop]}) as streamed:
            assert "".join(e["choices"][0]["delta"].get("content") or "" for e in _events(streamed)[:-1]
                           if e["choices"]) == cut == whole[: whole.find(stop)]
    left = engine.counts["client_left"]
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Ann: I have a cat."}], "temperature": 0,
            "max_tokens": 1900, "stream": True}) as leaving:
        lines = leaving.iter_lines()
        first = [next(lines) for _ in range(4)]  # the role chunk, and the first text, while the row decodes
        assert any('"content": ""' in line for line in first)
        health = httpx.get(f"{server}/health").json()
        assert health["queue"]["in_flight_rows"] == 1 and health["queue"]["admitted"] == 1
    while engine.counts["client_left"] == left or httpx.get(f"{server}/health").json()["queue"]["admitted"]:
        time.sleep(0.05)  # the row leaves at the next decode step and its slot is given back
    assert engine.batcher.in_flight == 0 and chat(server, max_tokens=4).status_code == 200


@pytest.mark.timeout(120)
def test_a_stream_whose_client_left_before_its_first_chunk_frees_its_row(engine, monkeypatch):
    """The response of a stream whose client left before it began is dropped unread: its row is cancelled at
    the next decode step and its admission slot given back, not decoded to its end."""
    left, submitted = engine.counts["client_left"], []
    submit = engine.batcher.submit
    monkeypatch.setattr(engine.batcher, "submit", lambda request: submitted.append(submit(request)) or submitted[-1])

    async def start_and_drop():
        chat, generation = engine.prepare(json.dumps({
            "model": "tiny", "messages": [{"role": "user", "content": "Ann: I have a cat."}], "temperature": 0,
            "max_tokens": 1900, "stream": True}).encode())
        slot = ExitStack()
        slot.enter_context(engine.admission.slot())
        response = engine.stream_tokens(chat, generation, slot)
        assert engine.admission.admitted == 1
        del response

    asyncio.run(start_and_drop())
    assert engine.counts["client_left"] == left + 1
    assert submitted[0].result(timeout=60).finish_reason == "cancelled"  # left the batch, not decoded to its end
    while engine.admission.admitted:
        time.sleep(0.05)  # given back by the decoding thread once the row has left


def test_streamable_holds_back_what_a_later_token_may_change():
    from memlora.llm.openai_protocol import streamable

    assert streamable("Ann has a cat") == "Ann has a cat"
    assert streamable("Ann has a ") == "Ann has a"            # a space may yet be cleaned up before punctuation
    assert streamable("caf\ufffd") == "caf"                  # a character still missing its bytes
    assert streamable("Ann has a ca", ("cat",)) == "Ann has a"  # "ca" may begin the stop string
    assert streamable("Ann has a cat.", ("cat",)) == "Ann has a "  # at the stop string: all before it, final
    assert streamable("Ann has a dog", ("cat", "og!")) == "Ann has a d"


def _eight_at_once(server) -> list[str]:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: chat(server, max_tokens=6, messages=[
            {"role": "user", "content": f"Ann: fact number {i}"}]), range(8)))
    assert all(a.status_code == 200 for a in answers)
    return [a.json()["choices"][0]["message"]["content"] for a in answers]


@pytest.mark.timeout(120)
def test_requests_that_arrive_together_share_the_running_batch(server, engine, monkeypatch):
    assert engine.batcher.continuous is not None  # serving.continuous_batching, on by default
    sizes, joined = [], []
    advance, join = engine.backend.advance, engine.backend.join
    monkeypatch.setattr(engine.backend, "advance", lambda batch: sizes.append(len(batch)) or advance(batch))
    monkeypatch.setattr(engine.backend, "join",
                        lambda batch, requests: joined.append(len(requests)) or join(batch, requests))
    together = _eight_at_once(server)
    assert sum(joined) == 8 and max(sizes) > 1

    # The same calls in merged batches decoded to their end (continuous_batching: false): the same answers.
    merged_engine = ServingEngine(engine.backend, [ServedModel("tiny", MODEL)], RULES, default_max_tokens=16,
                                  limits=ServingConfig(continuous_batching=False))
    batches = []
    inner = engine.backend._generate_batch
    monkeypatch.setattr(engine.backend, "_generate_batch", lambda batch: batches.append(len(batch)) or inner(batch))
    try:
        with running(create_app(merged_engine)) as url:
            assert _eight_at_once(url) == together
    finally:
        merged_engine.close()
    assert sum(batches) == 8 and max(batches) > 1


@pytest.mark.timeout(120)
def test_bearer_key_and_http_teacher_backend_against_the_real_server(engine):
    from memlora.llm.http_backend import OpenAIBackend

    with running(create_app(engine, api_key="s3cret")) as url:
        assert chat(url).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # health needs no key
        import os

        os.environ["MEMLORA_TEST_KEY"] = "s3cret"
        try:
            teacher = OpenAIBackend(LLMConfig(backend="openai", model="tiny", logprobs_top_k=2, http=HttpConfig(
                base_url=f"{url}/v1", api_key_env="MEMLORA_TEST_KEY")))
            request = GenerationRequest("extraction", TEMPLATES["extraction"].messages("Ann: I have a cat."), 48,
                                        SCHEMA)
            result = teacher.generate([request])[0]
        finally:
            os.environ.pop("MEMLORA_TEST_KEY")
    assert result.constrained and result.completion_tokens > 0
    if result.finish_reason == "stop":
        jsonschema.validate(json.loads(result.text), SCHEMA)
    assert len(result.top_logprobs) == result.completion_tokens
    assert all(1 <= len(step) <= 2 and step[0][0] >= 0 for step in result.top_logprobs)  # real token ids


@pytest.mark.timeout(120)
def test_capture_records_matched_calls_as_trace_rows(server, tmp_path):
    out = tmp_path / "out"
    recorder = CaptureRecorder(out)
    app = create_capture_app(f"{server}/v1", CaptureConfig(rules=RULES, logprobs_top_k=2), recorder)
    organizer = [{"role": "system", "content": "You are a Personal Information Organizer."},
                 {"role": "user", "content": "Ann: I have a cat."}]
    with running(app) as proxy:
        got = chat(proxy, messages=organizer, max_tokens=60, response_format={"type": "json_object"},
                   timeout=60).json()
        assert got["choices"][0]["logprobs"] is None  # added for the trace, not for the client
        assert chat(proxy, model="tiny", max_tokens=4).status_code == 200  # no rule: forwarded, not recorded
        assert chat(proxy, model="nope").status_code == 404  # the upstream's own error, passed on
        assert chat(proxy, messages=[]).status_code == 400
        health = httpx.get(f"{proxy}/health").json()["counts"]
        metrics = scrape(proxy)
    assert health["recorded_extraction"] == 1 and health["unmatched"] == 1 and health["upstream_errors"] == 1
    # /metrics: the same counts as counters, and the two answered calls timed (the 404 and the 400 are not)
    assert metrics[("memlora_events_total", (("event", "recorded_extraction"),))] == 1
    timed = {labels: n for (name, labels), n in metrics.items() if name == "memlora_chat_seconds_count"}
    assert timed == {(("answered_by", "upstream"), ("operation", "extraction"), ("stream", "false")): 1,
                     (("answered_by", "upstream"), ("operation", "unmatched"), ("stream", "false")): 1}, timed
    shards = list((out / "traces" / "extraction").glob("part-capture-*.parquet"))
    assert len(shards) == 1 and not list((out / "traces").rglob("*.tmp*"))
    row = pq.read_table(shards[0]).to_pylist()[0]
    assert row["operation"] == "extraction" and row["backend"] == "capture" and row["constrained"]
    assert json.loads(row["output_schema"]) == SCHEMA  # json_object went out as the rule's json_schema
    assert row["raw_output"] == got["choices"][0]["message"]["content"]
    assert row["completion_tokens"] == len(row["completion_token_ids"]) == len(row["top_logprobs"])
    assert row["parse_ok"] == (row["finish_reason"] == "stop")


ORGANIZER = [{"role": "system", "content": "You are a Personal Information Organizer."},
             {"role": "user", "content": "Ann: I have a cat."}]


def capture_rows(out) -> list[dict]:
    return [r for f in sorted((out / "traces" / "extraction").glob("part-capture-*.parquet"))
            for r in pq.read_table(f).to_pylist()]


@pytest.mark.timeout(120)
def test_capture_relays_a_streamed_call_and_records_it_whole(server, tmp_path):
    """A client that streams (the openai client's reader) through capture to a real server: it gets the chunks
    it would have had (no log-probs or usage chunk it did not ask for), and the row has the joined answer with
    the teacher's token ids and log-probs, which capture asked for."""
    from openai import OpenAI

    out = tmp_path / "out"
    app = create_capture_app(f"{server}/v1", CaptureConfig(rules=RULES, logprobs_top_k=2), CaptureRecorder(out))
    with running(app) as proxy:
        client = OpenAI(base_url=f"{proxy}/v1", api_key="unused")
        chunks = list(client.chat.completions.create(model="tiny", messages=ORGANIZER, temperature=0, max_tokens=60,
                                                     response_format={"type": "json_object"}, stream=True))
        with_usage = list(client.chat.completions.create(model="tiny", messages=ORGANIZER, temperature=0,
                                                         max_tokens=60, response_format={"type": "json_object"},
                                                         stream=True, stream_options={"include_usage": True}))
        health = httpx.get(f"{proxy}/health").json()["counts"]
    assert all(c.choices and c.choices[0].logprobs is None and c.usage is None for c in chunks)
    answer = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert not with_usage[-1].choices and with_usage[-1].usage.completion_tokens > 0  # asked for: relayed
    assert health["recorded_extraction"] == 2 and health["forwarded"] == 2
    rows = capture_rows(out)
    assert [r["raw_output"] for r in rows] == [answer, answer] and rows[0]["constrained"]
    assert rows[0]["completion_tokens"] == len(rows[0]["completion_token_ids"]) == len(rows[0]["top_logprobs"]) > 0
    assert rows[0]["parse_ok"] == (rows[0]["finish_reason"] == "stop") and rows[0]["model_id"] == "tiny"


@pytest.mark.timeout(120)
def test_capture_streams_as_the_teacher_sends_and_records_only_a_whole_stream(tmp_path):
    """A teacher that streams token by token (the stub, as vLLM does): each chunk is passed on as it comes; a
    stream cut short is relayed as it came and not recorded; a client that hangs up mid-stream closes the
    teacher's stream and leaves no row."""
    out = tmp_path / "out"
    with StubOpenAI() as stub, running(create_capture_app(stub.url, CaptureConfig(rules=RULES),
                                                          CaptureRecorder(out))) as proxy:
        whole = chat(proxy, messages=ORGANIZER, stream=True)
        assert whole.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in whole.text.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) == -(-len(stub.reply) // 4) + 3  # each piece, as sent
        assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]) == stub.reply
        assert stub.requests[-1]["stream_options"] == {"include_usage": True}  # for the row's token counts
        assert all("usage" not in json.loads(e) for e in events[:-1])  # the client did not ask for them
        stub.stream_cut_after = 3
        cut = chat(proxy, messages=ORGANIZER, stream=True)
        assert cut.status_code == 200 and "[DONE]" not in cut.text and cut.text.count("data: ") == 3
        stub.stream_cut_after, stub.stream_gap_s, stub.stream_piece = None, 0.2, 1
        with httpx.stream("POST", f"{proxy}/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": ORGANIZER, "stream": True}) as leaving:
            next(leaving.iter_lines())  # the first chunk, then the client hangs up
        deadline = time.monotonic() + 30
        while (stub.streams_left == 0 or "client_left" not in httpx.get(f"{proxy}/health").json()["counts"]) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        stub.stream_whole = True  # an upstream that answers a stream whole: chunks made here, recorded
        chunked = chat(proxy, messages=ORGANIZER, stream=True)
        assert chunked.text.rstrip().endswith("data: [DONE]") and stub.reply in chunked.text.replace('\\"', '"')
        health = httpx.get(f"{proxy}/health").json()
        counts = health["counts"]
    assert health["queue"]["admitted"] == 0  # every stream, relayed or made here, gave its admission slot back
    assert stub.streams_left == 1 and counts["client_left"] == 1 and counts["upstream_cut"] == 1
    rows = sorted(capture_rows(out), key=lambda r: r["completion_tokens"])
    assert len(rows) == 2 and {r["raw_output"] for r in rows} == {stub.reply} and rows[0]["prompt_tokens"] == 11
    # the relayed stream's tokens from its usage chunk (one per piece), the whole answer's from its body (7)
    assert [r["completion_tokens"] for r in rows] == sorted([-(-len(stub.reply) // 4), 7])
    assert counts["recorded_extraction"] == 2


@pytest.mark.timeout(120)
def test_capture_passes_other_endpoints_through_to_the_teacher(tmp_path):
    """A client whose whole OpenAI base URL points at capture (Mem0 reads OPENAI_BASE_URL for its embedder too)
    keeps working: embeddings and any other endpoint go to the teacher's server and back, with its status."""
    from openai import OpenAI

    out = tmp_path / "out"
    with StubOpenAI() as stub, running(create_capture_app(stub.url, CaptureConfig(rules=RULES),
                                                          CaptureRecorder(out))) as proxy:
        client = OpenAI(base_url=f"{proxy}/v1", api_key="sk-client")
        vectors = client.embeddings.create(model="embedder", input=["Ann has a cat", "hi"])
        assert [v.embedding for v in vectors.data] == [[13.0, 0.5], [2.0, 0.5]]
        assert (stub.requests[-1]["model"], stub.requests[-1]["input"]) == ("embedder", ["Ann has a cat", "hi"])
        assert stub.headers[-1]["authorization"] == "Bearer sk-client"
        missing = httpx.get(f"{proxy}/v1/files")
        assert missing.status_code == 404 and "no route /v1/files" in missing.json()["error"]["message"]
        assert httpx.get(f"{proxy}/v1/chat/completions").status_code == 405
        counts = httpx.get(f"{proxy}/health").json()["counts"]
    assert counts["passed_through"] == 2 and not (out / "traces").exists()


@pytest.mark.timeout(120)
def test_capture_started_before_its_teacher_says_so_and_serves(tmp_path):
    """A proxy may come up before its teacher: one warning line at start, then it serves (each call a 502 until
    the teacher answers; the test above)."""
    from memlora.processes import stop_group
    from memlora.serve import wait_healthy
    from tests.conftest import BIN, REPO, free_port

    dead, port = f"http://127.0.0.1:{free_port()}/v1", free_port()
    with open(tmp_path / "capture.log", "wb") as log:
        proxy = subprocess.Popen([str(BIN / "memlora"), "capture", "--config", str(REPO / "configs" / "mem0.yaml"),
                                  "--out", str(tmp_path / "out"), "--upstream", dead, "--port", str(port)],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proxy, timeout_s=60)
        finally:
            stop_group(proxy)
    first = (tmp_path / "capture.log").read_text().splitlines()[0]
    assert first.startswith(f"warning: --upstream {dead}: unreachable (ConnectError: ")
    assert first.endswith("; calls answer 502 until it is up")


@pytest.mark.timeout(120)
def test_capture_upstream_down_or_garbage_is_a_502_and_no_row(tmp_path):
    out = tmp_path / "out"
    organizer = [{"role": "system", "content": "You are a Personal Information Organizer."},
                 {"role": "user", "content": "Ann: I have a cat."}]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with running(create_capture_app(dead, CaptureConfig(rules=RULES), CaptureRecorder(out))) as proxy:
        down = chat(proxy, messages=organizer)
        assert down.status_code == 502 and "unreachable" in down.json()["error"]["message"]
    with StubOpenAI() as stub:
        stub.garbage = True
        with running(create_capture_app(stub.url, CaptureConfig(rules=RULES), CaptureRecorder(out))) as proxy:
            bad = chat(proxy, messages=organizer)
            assert bad.status_code == 502 and "without choices" in bad.json()["error"]["message"]
            stub.garbage = False
            stub.reply = "not json at all"
            kept = chat(proxy, messages=organizer)  # malformed model output: kept raw, counted, never trained
            assert kept.status_code == 200
    rows = [pq.read_table(f).to_pylist()[0] for f in (out / "traces" / "extraction").glob("*.parquet")]
    assert len(rows) == 1 and not rows[0]["parse_ok"] and rows[0]["raw_output"] == "not json at all"
    assert rows[0]["parse_error"].startswith("invalid JSON")
    # a tool call where the rule expected an answer (a client's call with tools): kept raw, said so, never trained
    calls = [{"id": "call_1", "type": "function", "function": {"name": "add_memory", "arguments": "{}"}}]
    row = CaptureRecorder(out).row(RULES[0], ORGANIZER, SCHEMA, {"choices": [
        {"message": {"role": "assistant", "content": None, "tool_calls": calls}, "finish_reason": "tool_calls"}]},
        0.1, None, 0)
    assert not row["parse_ok"] and json.loads(row["raw_output"]) == calls and "tool call" in row["parse_error"]
    assert threading.active_count() < 50


@pytest.mark.timeout(60)
def test_capture_answers_a_call_it_cannot_record_and_counts_it(tmp_path):
    """A disk that refuses the row (here a file where the operation's trace folder goes): the client still gets the
    teacher's answer, whole or streamed to its [DONE] (failing the call would not save the row), and /health
    counts what was lost; nothing half-written is left."""
    out = tmp_path / "out"
    (out / "traces").mkdir(parents=True)
    (out / "traces" / "extraction").write_text("not a folder")
    with StubOpenAI() as stub:
        with running(create_capture_app(stub.url, CaptureConfig(rules=RULES), CaptureRecorder(out))) as proxy:
            whole = chat(proxy, messages=ORGANIZER)
            streamed = chat(proxy, messages=ORGANIZER, stream=True)
            counts = httpx.get(f"{proxy}/health").json()["counts"]
    assert whole.status_code == 200 and whole.json()["choices"][0]["message"]["content"]
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    assert counts["record_failures"] == counts["record_failures_extraction"] == 2
    assert "recorded_extraction" not in counts and not list(out.rglob("*.tmp"))


@pytest.mark.timeout(180)
def test_a_killed_capture_proxy_keeps_every_finished_row_and_no_half_one(tmp_path):
    import os
    import signal

    import yaml

    from memlora.processes import stop_group
    from memlora.serve import wait_healthy
    from tests.conftest import BIN, REPO, TEACHER_REF, free_port

    config = tmp_path / "capture.yaml"
    config.write_text(yaml.safe_dump({"teacher": {"model": TEACHER_REF}, "capture": {"validation_ratio": 0.0, "rules": [
        {"operation": "extraction", "system_contains": "Personal Information Organizer"}]}}))
    organizer = [{"role": "system", "content": "You are a Personal Information Organizer."},
                 {"role": "user", "content": "Ann: I have a cat."}]
    out, port = tmp_path / "out", free_port()
    with StubOpenAI() as stub, open(tmp_path / "capture.log", "wb") as log:
        proxy = subprocess.Popen([str(BIN / "memlora"), "capture", "--config", str(config), "--out", str(out),
                                  "--upstream", stub.url, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=REPO)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proxy, timeout_s=120)
            assert chat(url, messages=organizer).status_code == 200  # finished: its row is on disk
            stub.stall_s = 5.0
            in_flight = ThreadPoolExecutor(1).submit(lambda: chat(url, messages=organizer, timeout=30))
            while len(stub.requests) < 2:  # the second call has reached the upstream and waits there
                threading.Event().wait(0.05)
            os.killpg(proxy.pid, signal.SIGKILL)
            proxy.wait(timeout=30)
            with pytest.raises(httpx.HTTPError):
                in_flight.result(timeout=30).raise_for_status()
        finally:
            stop_group(proxy)
    files = sorted((out / "traces").rglob("*"))
    shards = [f for f in files if f.suffix == ".parquet"]
    assert len(shards) == 1 and all(f.is_dir() or f.suffix == ".parquet" for f in files), files
    assert pq.read_table(shards[0]).num_rows == 1
