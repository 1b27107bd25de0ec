"""Serving with calibrated deferral on a tiny random model: `memlora calibrate` on an OUT whose validation calls the
expert partly agrees with, `serve-experts`' engine with `--fallback` in front of a real `serve-model`-style teacher
server (kept, deferred and recorded, teacher down or garbage, strict), all on 127.0.0.1."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memlora.config import DeferralConfig, ExpertConfig
from memlora.data.io import write_parquet
from memlora.data.schemas import TRACES
from memlora.evaluation.calibration import CalibrationError, DeferralPolicy, in_audit_sample
from memlora.evaluation.stats import wilson
from memlora.layout import deferral_path, trace_files
from memlora.llm.confidence import confidence
from memlora.llm.fallback import ANSWERED_BY, Fallback, FallbackError
from memlora.llm.hf_backend import TransformersBackend, load_causal_lm
from memlora.llm.openai_server import MODEL, ServedModel, ServingEngine, create_app, expert_models
from memlora.manifest import update_manifest
from memlora.memory.llm import GenerationRequest
from memlora.memory.prompts import TEMPLATES, extraction_schema
from memlora.student.experts import ExpertBackend, attach_expert
from memlora.teacher.capture import CaptureRecorder
from tests.serving_fixtures import running, scrape
from tests.student_fixtures import distill_config, perturb
from tests.stub_openai import StubOpenAI

SCHEMA = extraction_schema(3, 40)
LINES = [f"{name}: I {verb} {thing}." for name in ("Ann", "Bob", "Eve") for verb, thing in
         (("have", "a cat"), ("live in", "Porto"), ("love", "jazz"), ("work as", "a nurse"))]


def trace_row(trace_id: str, conversation: str, messages: list[dict], answer: str, backend: str,
              step: int = 0) -> dict:
    return {"trace_id": trace_id, "operation": "extraction", "conversation_id": conversation, "session": 0,
            "step": step, "messages": messages, "output_schema": json.dumps(SCHEMA), "raw_output": answer,
            "parsed_output": answer, "parse_ok": True, "constrained": True, "finish_reason": "stop",
            "prompt_tokens": 10, "completion_tokens": 5, "latency_s": 0.1, "batch_size": 1, "model_id": "teacher",
            "backend": backend, "template_hash": "x"}


@pytest.fixture(scope="module")
def deferral_out(tmp_path_factory, tiny_model_dir):
    """OUT with an extraction expert (tiny DeLoRA, non-zero weights) and 12 held-out validation trace rows whose
    'teacher' answer is the expert's own for the first 8 and a different one for the last 4."""
    out = tmp_path_factory.mktemp("deferral-out")
    model, _, _ = load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu")
    torch.manual_seed(0)
    expert = attach_expert(model, ExpertConfig(r=4), name="default")
    perturb(expert, seed=3, scale=0.05)
    expert.save_pretrained(str(out / "adapters" / "extraction"), safe_serialization=True)
    update_manifest(out)
    config_path, config = distill_config(out / "config.yaml", str(tiny_model_dir))
    backend = ExpertBackend.from_config(config, tiny_model_dir, {"extraction": out / "adapters" / "extraction"},
                                        prompt=config.student.prompt)
    messages = [TEMPLATES["extraction"].messages(line) for line in LINES]
    cap = config.memory.operations["extraction"].max_new_tokens
    own = backend.generate([GenerationRequest("extraction", m, cap, SCHEMA, logprobs_top_k=1) for m in messages])
    sure = [confidence("extraction", r.text, r.token_ids, r.token_logprobs, backend.tokenizer) for r in own]
    unsure = set(sorted(range(len(own)), key=lambda i: sure[i])[:4])  # the teacher disagrees where it is least sure
    rows = []
    for i, (m, result) in enumerate(zip(messages, own)):
        answer = result.text if i not in unsure else json.dumps({"facts": [f"Zed owns {i} boats in Oslo"]})
        rows.append(trace_row(f"cap-validation:extraction:{i}", "cap-validation", m, answer, "capture", step=i))
    write_parquet(pa.Table.from_pylist(rows, schema=TRACES), out / "traces" / "extraction" / "part-val.parquet",
                  "traces")
    return {"out": out, "config_path": config_path, "config": config, "backend": backend, "messages": messages}


@pytest.mark.timeout(300)
def test_calibrate_writes_thresholds_that_meet_the_budget(deferral_out, tiny_model_dir, capsys):
    from memlora.cli import main

    out, config_path = deferral_out["out"], deferral_out["config_path"]
    raw = config_path.read_text() + "\ndeferral: {budget: 0.4}\n"
    config_path.with_name("budget.yaml").write_text(raw)
    assert main(["calibrate", "--config", str(config_path.with_name("budget.yaml")), "--out", str(out),
                 "--base", str(tiny_model_dir)]) == 0
    result = json.loads(deferral_path(out).read_text())
    keep = result["operations"]["extraction"]["keep"]
    assert keep["n"] == 12 and result["validation"]["extraction"]["n"] == 12
    # the expert agrees on its 8 surest answers: those are kept (0 of 8 disagree: Wilson upper bound 0.32), the
    # 4 least sure are deferred
    assert keep["kept"] == 8 and keep["disagree"] == 0 and keep["upper"] <= 0.4
    curve = keep["curve"]
    assert curve[0][1] == 0.0 and curve[-1][1] == 1.0 and curve[-1][2] == pytest.approx(8 / 12)
    # half the calls: the 8 clean surest answers are the cheapest way there
    assert keep["budgets_to_keep"]["0.5"] == pytest.approx(wilson(0, 8)[1])
    printed = capsys.readouterr().out
    assert "calibrating on 12 held-out calls" in printed and "extraction  keep" in printed
    assert "budget to keep 30 %" in printed and "straight to the teacher" not in printed  # extraction keeps some
    policy = DeferralPolicy.read(deferral_path(out))
    assert policy.keeps("extraction", keep["value"]) and not policy.keeps("update", 0.0)  # no threshold: defer


def test_calibrate_says_which_operations_go_straight_to_the_teacher():
    from memlora.evaluation.deferral import summary

    def threshold(value: float) -> dict:
        return {"value": value, "kept": 0 if value == math.inf else 3, "n": 5, "upper": math.nan}

    printed = summary({"budget": 0.1, "test": {}, "operations": {
        "extraction": {"keep": threshold(-1.0)},
        "update": {"keep": threshold(math.inf), "destructive": threshold(-2.0)},  # keeps its sure DELETEs
        "generation": {"keep": threshold(math.inf)}}})
    assert printed.splitlines()[-1] == ("no threshold keeps an answer of generation: `serve-experts --fallback` "
                                        "sends those calls straight to the teacher, without the expert")


@pytest.mark.timeout(120)
def test_no_held_out_calls_is_a_clear_error(tmp_path, deferral_out, tiny_model_dir, capsys):
    from memlora.cli import main

    out = tmp_path / "out"
    (out / "adapters").mkdir(parents=True)
    import shutil

    shutil.copytree(deferral_out["out"] / "adapters" / "extraction", out / "adapters" / "extraction")
    update_manifest(out)
    assert main(["calibrate", "--config", str(deferral_out["config_path"]), "--out", str(out),
                 "--base", str(tiny_model_dir)]) == 2
    assert "extraction: 0 held-out calls to calibrate on; at least 1 are needed" in capsys.readouterr().err
    with pytest.raises(CalibrationError, match="run `memlora calibrate` first"):
        DeferralPolicy.read(out / "deferral.json")


def policy(value: float) -> DeferralPolicy:
    return DeferralPolicy({"operations": {"extraction": {"keep": {"value": value}}}})


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    """A real teacher server (serve-model's engine) on the tiny model, named `teacher`."""
    model, tok, model_id = load_causal_lm(str(tiny_model_dir), device="cpu")
    engine = ServingEngine(TransformersBackend(model, tok, model_id), [ServedModel("teacher", MODEL)],
                           default_max_tokens=16)
    with running(create_app(engine)) as url:
        yield f"{url}/v1"
    engine.close()


def experts_server(deferral_out, fallback_url: str, value: float, tmp_path: Path, rules=(), **deferral):
    backend = deferral_out["backend"]
    fallback = Fallback(fallback_url, "teacher", policy(value), CaptureRecorder(tmp_path / "out"),
                        DeferralConfig(**deferral))
    engine = ServingEngine(backend, expert_models(backend.operations), rules, default_max_tokens=16,
                           fallback=fallback)
    return engine, create_app(engine)


def ask(url: str, i: int = 0, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, headers={"x-memlora-conversation": "user-7"},
                      json={"model": "memlora-extraction", "messages": deferral_out_messages[i], "max_tokens": 40,
                            "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {
                                "name": "facts", "schema": SCHEMA}}, **extra})


deferral_out_messages = [TEMPLATES["extraction"].messages(line) for line in LINES]


NEVER_SURE = 1.0  # above any confidence (a log-prob): the expert decodes, and every answer is deferred


@pytest.mark.timeout(180)
def test_an_unsure_expert_defers_to_the_teacher_and_the_call_is_recorded(deferral_out, teacher, tmp_path):
    engine, app = experts_server(deferral_out, teacher, NEVER_SURE, tmp_path)
    with running(app) as url:
        got = ask(url, 0)
        assert got.status_code == 200 and got.headers[ANSWERED_BY] == "teacher"
        assert got.json()["model"] == "teacher" and got.json()["choices"][0]["logprobs"] is None
        float(got.headers["x-memlora-confidence"])
        base = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "memlora-base", "messages": deferral_out_messages[1], "max_tokens": 4})
        assert base.status_code == 200 and ANSWERED_BY not in base.headers  # no expert: nothing to defer
        # streamed: the teacher streams its answer token by token and the chunks are passed on as they come
        def teacher_streamed() -> int:
            return httpx.get(teacher.removesuffix("/v1") + "/health").json()["counts"].get("streamed_token_by_token", 0)

        streamed_before = teacher_streamed()
        streamed = ask(url, 0, stream=True)
        assert streamed.status_code == 200 and streamed.headers[ANSWERED_BY] == "teacher"
        float(streamed.headers["x-memlora-confidence"])
        events = [json.loads(line[6:]) for line in streamed.text.split("\n\n") if line.startswith("data: {")]
        assert streamed.text.rstrip().endswith("data: [DONE]") and {e["model"] for e in events} == {"teacher"}
        pieces = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
        assert "".join(p or "" for p in pieces) == got.json()["choices"][0]["message"]["content"]
        assert len([p for p in pieces if p]) > 1  # more than one piece: relayed, not asked whole and cut up
        # what was asked for the trace row alone (usage, log-probs) is not passed on
        assert all("usage" not in e and e["choices"][0]["logprobs"] is None for e in events)
        assert teacher_streamed() == streamed_before + 1
        health = httpx.get(f"{url}/health").json()["deferral"]["counts"]
    assert health == {"deferred_extraction": 2, "teacher_streamed": 1}
    rows = [r for f in trace_files(tmp_path / "out", "extraction") for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 2 and {r["backend"] for r in rows} == {"deferred"} and rows[0]["conversation_id"] == "user-7"
    assert {r["raw_output"] for r in rows} == {got.json()["choices"][0]["message"]["content"]}
    # the streamed row has the teacher's token counts (from the usage chunk asked for it) as the whole one has
    assert rows[0]["completion_tokens"] == rows[1]["completion_tokens"] > 0
    assert rows[0]["messages"] == deferral_out_messages[0] and json.loads(rows[0]["output_schema"]) == SCHEMA
    engine.close()


@pytest.mark.timeout(180)
def test_metrics_give_health_to_a_scraper_and_time_each_answered_call(deferral_out, teacher, tmp_path):
    """GET /metrics, read with Prometheus's own parser: /health's counts as counters, its numbers as gauges, and
    each answered call's seconds by operation and by who answered it; a refused request is not timed."""
    teacher_url = teacher.removesuffix("/v1")
    teacher_before = sum(n for (name, labels), n in scrape(teacher_url).items()
                         if name == "memlora_chat_seconds_count")
    engine, app = experts_server(deferral_out, teacher, NEVER_SURE, tmp_path)
    with running(app) as url:
        assert ask(url, 0).status_code == 200 and ask(url, 1, stream=True).status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": []}).status_code >= 400
        metrics, health = scrape(url), httpx.get(f"{url}/health").json()
    timed = {labels: n for (name, labels), n in metrics.items() if name == "memlora_chat_seconds_count"}
    assert timed == {(("answered_by", "teacher"), ("operation", "extraction"), ("stream", "false")): 1,
                     (("answered_by", "teacher"), ("operation", "extraction"), ("stream", "true")): 1}, timed
    assert metrics[("memlora_deferral_events_total", (("event", "deferred_extraction"),))] == 2
    assert metrics[("memlora_queue_limit", ())] == health["queue"]["limit"]
    assert metrics[("memlora_status_info", (("status", "ok"),))] == 1
    assert metrics[("memlora_deferral_strict", ())] == 0
    # the teacher behind it (serve-model's engine) answered both, as the model it serves
    teacher_timed = {labels: n for (name, labels), n in scrape(teacher_url).items()
                     if name == "memlora_chat_seconds_count"}
    assert sum(teacher_timed.values()) == teacher_before + 2
    # (its operation is the one the call's prompt of ours names: serve-model has no expert to say it)
    assert {(dict(labels)["answered_by"], dict(labels)["operation"]) for labels in teacher_timed} == \
        {("model", "extraction")}
    engine.close()


@pytest.mark.timeout(180)
def test_a_deferred_call_that_cannot_be_recorded_is_answered_and_counted(deferral_out, teacher, tmp_path):
    """A recorder whose disk refuses the row (a file where the trace folder goes): the teacher's answer still goes
    back, whole or relayed to its [DONE], and /health counts the rows lost."""
    (tmp_path / "out" / "traces").mkdir(parents=True)
    (tmp_path / "out" / "traces" / "extraction").write_text("not a folder")
    engine, app = experts_server(deferral_out, teacher, NEVER_SURE, tmp_path)
    with running(app) as url:
        whole, streamed = ask(url, 0), ask(url, 1, stream=True)
        deferral = httpx.get(f"{url}/health").json()["deferral"]
    assert whole.status_code == 200 and whole.headers[ANSWERED_BY] == "teacher"
    assert streamed.status_code == 200 and streamed.headers[ANSWERED_BY] == "teacher"
    assert streamed.text.rstrip().endswith("data: [DONE]") and '"error"' not in streamed.text
    assert deferral["record_failures"] == 2 and deferral["counts"]["deferred_extraction"] == 2
    engine.close()


@pytest.mark.timeout(180)
def test_an_operation_that_keeps_nothing_goes_to_the_teacher_without_the_expert(deferral_out, teacher, tmp_path):
    """Thresholds of inf (what `memlora calibrate` writes where none meets the budget) keep no answer: the expert
    does not decode the call at all (the client would wait for both models to get the teacher's answer), the
    teacher answers and the call is recorded as deferred. Once the thresholds keep something (a hot reload), the
    expert decodes again."""
    engine, app = experts_server(deferral_out, teacher, math.inf, tmp_path)
    assert "the thresholds keep no answer of extraction: those calls go to the teacher" in engine.routing_line()
    decoded = []
    inner = engine.batcher.inner
    generate, join = inner.generate, inner.join  # merged batches, or the running batch the experts share
    inner.generate = lambda requests: decoded.extend(requests) or generate(requests)
    inner.join = lambda batch, requests: decoded.extend(requests) or join(batch, requests)
    try:
        with running(app) as url:
            got = ask(url, 1)
            assert got.status_code == 200 and got.headers[ANSWERED_BY] == "teacher"
            assert "x-memlora-confidence" not in got.headers and not decoded
            assert httpx.get(f"{url}/health").json()["deferral"]["counts"] == {
                "deferred_extraction": 1, "expert_skipped_extraction": 1}
            engine.swap({"policy": policy(NEVER_SURE)})
            again = ask(url, 1)
            assert again.headers[ANSWERED_BY] == "teacher" and float(again.headers["x-memlora-confidence"]) <= 0
            assert len(decoded) == 1
    finally:
        inner.generate, inner.join = generate, join
        engine.close()
    rows = [r for f in trace_files(tmp_path / "out", "extraction") for r in pq.read_table(f).to_pylist()]
    assert [r["backend"] for r in rows] == ["deferred", "deferred"]
    assert got.json()["choices"][0]["message"]["content"] in [r["raw_output"] for r in rows]


@pytest.mark.timeout(180)
def test_a_call_no_expert_serves_yet_goes_to_the_teacher_not_the_bare_student(deferral_out, teacher, tmp_path):
    """A client's calls come under one model name, routed by the rules: where the rule's operation has no expert
    yet, the teacher answers (and the call is recorded, that expert's first rows), with a fallback."""
    from memlora.config import CaptureRule

    rules = [CaptureRule(operation="update", system_contains=TEMPLATES["update"].system[:40])]
    engine, app = experts_server(deferral_out, teacher, -math.inf, tmp_path, rules)  # sure of everything
    with running(app) as url:
        got = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "memlora", "messages": TEMPLATES["update"].messages("New fact: Ann has a dog."),
            "max_tokens": 8, "temperature": 0})
        assert got.status_code == 200 and got.headers[ANSWERED_BY] == "teacher"
        assert httpx.get(f"{url}/health").json()["deferral"]["counts"] == {"no_expert_update": 1}
    engine.close()
    rows = pq.read_table(trace_files(tmp_path / "out", "update")[0]).to_pylist()
    # recorded as no expert's: every such call enters calibration, not only the audit share of deferred ones
    assert len(rows) == 1 and rows[0]["backend"] == "no-expert" and in_audit_sample(rows[0], 0.0)
    assert rows[0]["raw_output"] == got.json()["choices"][0]["message"]["content"]


@pytest.mark.timeout(180)
def test_a_sure_expert_keeps_the_call(deferral_out, tmp_path):
    with StubOpenAI() as stub:
        engine, app = experts_server(deferral_out, stub.url, -math.inf, tmp_path, audit_share=0)  # always sure
        with running(app) as url:
            got = ask(url, 2)
            assert got.status_code == 200 and got.headers[ANSWERED_BY] == "expert"
            assert got.json()["model"] == "memlora-extraction" and not stub.requests
            assert httpx.get(f"{url}/health").json()["deferral"]["counts"] == {"kept_extraction": 1}
        engine.close()
    assert not (tmp_path / "out" / "traces").exists()


@pytest.mark.timeout(180)
def test_what_the_experts_cannot_serve_goes_to_the_teacher_as_it_came(deferral_out, tmp_path):
    """With a teacher behind, a call the experts cannot do (tools, n > 1, ...) is the teacher's, passed on as it
    came (streamed where asked) under its model name, and not recorded; without one it stays a 400."""
    tools = [{"type": "function", "function": {"name": "add_memory", "parameters": {"type": "object"}}}]
    with StubOpenAI() as stub:
        engine, app = experts_server(deferral_out, stub.url, -math.inf, tmp_path, audit_share=0)
        with running(app) as url:
            got = ask(url, 0, tools=tools)
            assert got.status_code == 200 and got.headers[ANSWERED_BY] == "teacher"
            assert got.json()["choices"][0]["message"]["content"] == stub.reply
            assert stub.requests[-1]["model"] == "teacher" and stub.requests[-1]["tools"] == tools
            streamed = ask(url, 0, n=2, stream=True)
            assert streamed.headers["content-type"].startswith("text/event-stream")
            assert streamed.text.rstrip().endswith("data: [DONE]") and stub.requests[-1]["n"] == 2
            assert ask(url, 0, top_logprobs=2).status_code == 400  # a wrong request is wrong for the teacher too
            # a client whose whole base URL points here (Mem0's embedder reads OPENAI_BASE_URL too)
            vectors = httpx.post(f"{url}/v1/embeddings", json={"model": "e", "input": "hi"}, timeout=30)
            assert vectors.json()["data"][0]["embedding"] == [2.0, 0.5] and vectors.headers[ANSWERED_BY] == "teacher"
            assert httpx.get(f"{url}/health").json()["deferral"]["counts"] == {
                "passed_tools": 1, "passed_n": 1, "passed_embeddings": 1}
        engine.close()
    assert not (tmp_path / "out" / "traces").exists()
    engine, app = experts_server(deferral_out, stub.url, -math.inf, tmp_path)  # the stub has stopped: down
    with running(app) as url:
        down = ask(url, 0, tools=tools)
        assert down.status_code == 502 and "cannot serve (tools)" in down.json()["error"]["message"]
    engine.close()
    alone = ServingEngine(deferral_out["backend"], expert_models(deferral_out["backend"].operations),
                          default_max_tokens=16)
    with running(create_app(alone)) as url:
        refused = ask(url, 0, tools=tools)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "hi"}, timeout=30).status_code == 404
    alone.close()


@pytest.mark.timeout(180)
def test_a_teacher_that_is_down_or_answers_garbage_degrades_as_configured(deferral_out, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(FallbackError, match="unreachable"):
        Fallback(dead, "teacher", policy(0.0), CaptureRecorder(tmp_path), DeferralConfig()).check_reachable()
    engine, app = experts_server(deferral_out, dead, math.inf, tmp_path)
    with running(app) as url:
        got = ask(url, 3)  # not strict: the expert's own answer, counted
        assert got.status_code == 200 and got.headers[ANSWERED_BY] == "expert-teacher-failed"
        assert httpx.get(f"{url}/health").json()["deferral"]["counts"]["teacher_failures_extraction"] == 1
    engine.close()
    with StubOpenAI() as stub:
        stub.garbage = True
        engine, app = experts_server(deferral_out, stub.url, math.inf, tmp_path, strict=True)
        with running(app) as url:
            got = ask(url, 4)
            assert got.status_code == 502 and "fallback teacher" in got.json()["error"]["message"]
            stub.garbage = False
            stub.fail_first, stub.fail_status = 1, 503
            assert ask(url, 5).status_code == 502  # the teacher's 5xx, strict
            stub.reply = json.dumps({"facts": ["Ann has a cat"]})
            kept = ask(url, 6)  # the teacher is back: its answer, recorded
            assert kept.status_code == 200 and kept.headers[ANSWERED_BY] == "teacher"
            assert kept.json()["choices"][0]["message"]["content"] == stub.reply
        engine.close()
    assert len(trace_files(tmp_path / "out", "extraction")) == 1  # only the answered call became a row


@pytest.mark.timeout(180)
def test_a_streamed_deferral_relays_the_teacher_and_a_broken_stream_is_counted_not_recorded(deferral_out, tmp_path):
    """A streaming client gets the teacher's chunks as they come. A teacher that fails before its first chunk is
    replaced by the expert's answer, as without a stream; one whose stream breaks after it has begun (cut, or silent
    past the timeout) cannot be: the client gets what came and an error event, the failure is counted, and no half
    answer becomes a trace row."""
    with StubOpenAI() as stub:
        stub.stream_gap_s = 0.05
        engine, app = experts_server(deferral_out, stub.url, math.inf, tmp_path, timeout_s=0.5)  # straight
        with running(app) as url:
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
                    "model": "memlora-extraction", "messages": deferral_out_messages[7], "max_tokens": 40,
                    "stream": True, "stream_options": {"include_usage": True}}) as streamed:
                assert streamed.headers[ANSWERED_BY] == "teacher"
                lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
            chunks = [json.loads(line[6:]) for line in lines[:-1]]
            assert lines[-1] == "data: [DONE]" and chunks[-1]["usage"]["completion_tokens"] > 0  # asked for
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == stub.reply
            assert stub.requests[-1]["stream"] is True and stub.requests[-1]["model"] == "teacher"
            stub.fail_first, stub.fail_status = 1, 503  # fails before its stream: the expert answers
            failed = ask(url, 8, stream=True)
            assert failed.headers[ANSWERED_BY] == "expert-teacher-failed" and "data: [DONE]" in failed.text
            stub.stream_cut_after = 3  # the role and two pieces, then the connection closes
            cut = ask(url, 9, stream=True)
            assert cut.headers[ANSWERED_BY] == "teacher" and cut.text.rstrip().endswith("data: [DONE]")
            events = [json.loads(line[6:]) for line in cut.text.split("\n\n") if line.startswith("data: {")]
            # what came, then an error an OpenAI client raises on (a stream that just stops passes for a whole one)
            assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == stub.reply[:8]
            assert events[-1]["error"]["type"] == "upstream_error" and "upstream_cut" in events[-1]["error"]["message"]
            stub.stream_cut_after, stub.stream_gap_s = None, 1.0  # a teacher that goes silent past the timeout
            stalled = ask(url, 10, stream=True)
            assert stalled.text.rstrip().endswith("data: [DONE]") and '"upstream_error"' in stalled.text
            counts = httpx.get(f"{url}/health").json()["deferral"]["counts"]
            stub.stream_gap_s = 0.0
            assert ask(url, 11).status_code == 200  # and it keeps serving
        engine.close()
    assert counts["teacher_streamed"] == 1 and counts["teacher_failures_extraction"] == 3
    assert counts["teacher_stream_upstream_cut"] == 2
    rows = [r for f in trace_files(tmp_path / "out", "extraction") for r in pq.read_table(f).to_pylist()]
    assert [r["raw_output"] for r in rows] == [stub.reply] * 2 and {r["backend"] for r in rows} == {"deferred"}
    # the streamed one's tokens from its usage chunk (one per piece), the whole one's from its body (7)
    assert sorted(r["completion_tokens"] for r in rows) == sorted([7, len(range(0, len(stub.reply), 4))])


def test_the_audit_sample_draws_deferred_calls_at_the_audit_share():
    """Kept calls are audited at `audit_share`; deferred ones enter calibration at the same share (a hash of the
    trace id), so the sample is not tilted towards calls an expert was unsure of. Captured rows always count."""

    deferred = [{"backend": "deferred", "trace_id": f"user-{i}:extraction:run-{i:06d}"} for i in range(2000)]
    assert all(in_audit_sample(r, 1.0) for r in deferred) and not any(in_audit_sample(r, 0.0) for r in deferred)
    drawn = sum(in_audit_sample(r, 0.25) for r in deferred) / len(deferred)
    assert 0.22 < drawn < 0.28  # a binomial(2000, 0.25) share lies within 3 sd (0.029) of 0.25
    assert [in_audit_sample(r, 0.25) for r in deferred] == [in_audit_sample(r, 0.25) for r in deferred]
    assert in_audit_sample({"backend": "audited", "trace_id": "x"}, 0.0)
    assert in_audit_sample({"backend": "capture", "trace_id": "x"}, 0.0)


@pytest.mark.timeout(300)
def test_a_served_expert_is_recalibrated_on_the_calls_it_was_not_trained_on(deferral_out, tmp_path, tiny_model_dir,
                                                                              capsys):
    """Calls that arrived after the served expert was trained (trace files its training.json does not list), from
    training conversations and in the audit sample, join the validation calls: the pool a threshold is set on
    grows with the traffic the expert serves. Test-share calls and files it was trained on stay out."""
    import shutil

    from memlora.cli import main
    from memlora.evaluation import deferral

    out = tmp_path / "out"
    shutil.copytree(deferral_out["out"] / "adapters", out / "adapters")
    shutil.copytree(deferral_out["out"] / "traces", out / "traces")
    (out / "adapters" / "extraction" / "training.json").write_text(json.dumps(
        {"operation": "extraction", "trace_files": ["part-old.parquet", "part-val.parquet"]}))
    update_manifest(out)
    messages, answer = deferral_out["messages"], json.dumps({"facts": ["Ann has a cat"]})
    folder = out / "traces" / "extraction"
    old = [trace_row(f"user-1:extraction:{i}", "user-1", messages[i], answer, "capture") for i in range(3)]
    write_parquet(pa.Table.from_pylist(old, schema=TRACES), folder / "part-old.parquet", "traces")
    ids = [f"user-2:extraction:run-{i:06d}" for i in range(400)]
    in_sample = next(i for i in ids if deferral_sampled(i, 0.5))
    out_of_sample = next(i for i in ids if not deferral_sampled(i, 0.5))
    new = [trace_row(in_sample, "user-2", messages[0], answer, "deferred"),
           trace_row(out_of_sample, "user-2", messages[1], answer, "deferred"),
           trace_row("user-2:extraction:a", "user-2", messages[2], answer, "audited"),
           trace_row("user-2:extraction:c", "user-2", messages[3], answer, "capture"),
           trace_row("user-3-test:extraction:c", "user-3-test", messages[4], answer, "capture")]
    write_parquet(pa.Table.from_pylist(new, schema=TRACES), folder / "part-capture-new.parquet", "traces")
    config = deferral_out["config"].model_copy(update={"deferral": DeferralConfig(audit_share=0.5)})
    fresh = deferral.fresh_calls(out, config, ["extraction"])
    assert [c.messages for c in fresh] == [messages[0], messages[2], messages[3]]
    assert len(deferral.calibration_calls(out, config, ["extraction"])) == 12 + 3
    (out / "adapters" / "extraction" / "training.json").write_text(json.dumps(
        {"operation": "extraction", "trace_files": [f.name for f in trace_files(out, "extraction")]}))
    assert deferral.fresh_calls(out, config, ["extraction"]) == []  # trained on everything: nothing fresh
    (out / "adapters" / "extraction" / "training.json").write_text(json.dumps(
        {"operation": "extraction", "trace_files": ["part-old.parquet", "part-val.parquet"]}))
    update_manifest(out)
    path = tmp_path / "audit.yaml"
    path.write_text(deferral_out["config_path"].read_text() + "\ndeferral: {budget: 0.4, audit_share: 0.5}\n")
    assert main(["calibrate", "--config", str(path), "--out", str(out), "--base", str(tiny_model_dir)]) == 0
    assert "calibrating on 15 held-out calls" in capsys.readouterr().out
    assert json.loads(deferral_path(out).read_text())["operations"]["extraction"]["keep"]["n"] == 15


def deferral_sampled(trace_id: str, share: float) -> bool:
    return in_audit_sample({"backend": "deferred", "trace_id": trace_id}, share)


@pytest.mark.timeout(180)
def test_a_kept_call_is_audited_after_its_answer_and_recorded(deferral_out, teacher, tmp_path):
    """With `audit_share` 1 every kept call is also asked of the teacher once the expert's answer has gone back:
    the client gets the expert's answer, the teacher's lands in the traces as `audited`, and shutdown waits for
    an audit in flight."""
    engine, app = experts_server(deferral_out, teacher, -math.inf, tmp_path, audit_share=1.0)  # always sure
    with running(app) as url:
        got = ask(url, 7)
        assert got.status_code == 200 and got.headers[ANSWERED_BY] == "expert"
        assert got.json()["model"] == "memlora-extraction"
    engine.close()
    counts = engine.fallback.health()["counts"]
    assert counts == {"kept_extraction": 1, "audited_extraction": 1}
    rows = pq.read_table(trace_files(tmp_path / "out", "extraction")[0]).to_pylist()
    assert len(rows) == 1 and rows[0]["backend"] == "audited" and rows[0]["conversation_id"] == "user-7"
    assert rows[0]["messages"] == deferral_out_messages[7]


def one_entry_schema(event: str) -> dict:
    """An update answer of one entry whose event the decoder must write (the tiny expert cannot choose)."""
    entry = {"type": "object", "properties": {"id": {"type": "string", "enum": ["0"]},
                                              "event": {"type": "string", "enum": [event]},
                                              "text": {"type": "string", "maxLength": 12}},
             "required": ["id", "event", "text"], "additionalProperties": False}
    return {"type": "object", "properties": {"memory": {"type": "array", "items": entry, "minItems": 1,
                                                        "maxItems": 1}},
            "required": ["memory"], "additionalProperties": False}


@pytest.mark.timeout(300)
def test_without_a_teacher_the_guard_demotes_unsure_destructive_answers(deferral_out, tiny_model_dir, tmp_path,
                                                                         capsys):
    """`serve-experts --guard`: an unsure DELETE goes back as NONE (the memory stays), a sure one as written, an
    unsure NONE as written but marked; each counted at /health. With --fallback, an unsure DELETE the failed
    teacher should have taken is demoted as well. --guard with --fallback, or without thresholds, is refused
    before the experts load."""
    from memlora.cli import main
    from memlora.llm.guard import Guard

    backend = ExpertBackend.from_config(deferral_out["config"], tiny_model_dir,
                                        {"update": deferral_out["out"] / "adapters" / "extraction"})
    thresholds = DeferralPolicy({"operations": {"update": {"keep": {"value": math.inf},
                                                           "destructive": {"value": math.inf}}}})
    guard = Guard(thresholds, DeferralConfig())
    engine = ServingEngine(backend, expert_models(backend.operations), default_max_tokens=48, fallback=guard)
    assert "any other call is answered by the bare student base" in engine.routing_line()  # no teacher to go to
    messages = TEMPLATES["update"].messages("New fact: Ann moved to Oslo.")

    def ask_update(event: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "memlora-update", "messages": messages, "max_tokens": 48, "temperature": 0, "logprobs": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": one_entry_schema(
                event)}}})

    with running(create_app(engine)) as url:
        unsure_delete = ask_update("DELETE")
        assert unsure_delete.status_code == 200 and unsure_delete.headers[ANSWERED_BY] == "expert-demoted"
        content = json.loads(unsure_delete.json()["choices"][0]["message"]["content"])
        assert [e["event"] for e in content["memory"]] == ["NONE"] and content["memory"][0]["id"] == "0"
        # the tokens no longer spell the answer: no log-probs for it
        assert (unsure_delete.json()["choices"][0]["logprobs"] or {}).get("content") is None
        unsure_none = ask_update("NONE")
        assert unsure_none.headers[ANSWERED_BY] == "expert-unsure"
        assert json.loads(unsure_none.json()["choices"][0]["message"]["content"])["memory"][0]["event"] == "NONE"
        engine.swap({"policy": DeferralPolicy({"operations": {"update": {"keep": {"value": -math.inf},
                                                                         "destructive": {"value": -math.inf}}}})})
        sure_delete = ask_update("DELETE")
        assert sure_delete.headers[ANSWERED_BY] == "expert"
        assert json.loads(sure_delete.json()["choices"][0]["message"]["content"])["memory"][0]["event"] == "DELETE"
        assert sure_delete.json()["choices"][0]["logprobs"]["content"]
        assert httpx.get(f"{url}/health").json()["deferral"] == {
            "guard": True, "counts": {"demoted_update": 1, "unsure_update": 1, "kept_update": 1},
            "stale_thresholds": []}
    engine.close()
    with socket.socket() as s:  # with a teacher that is down, an unsure DELETE it should have taken is demoted too
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    for value, skipped in ((NEVER_SURE, {}), (math.inf, {"expert_skipped_update": 2})):
        # the expert decoded first and was unsure; or the thresholds keep nothing, the teacher was asked first
        never = DeferralPolicy({"operations": {"update": {"keep": {"value": value},
                                                          "destructive": {"value": value}}}})
        fallback = Fallback(dead, "teacher", never, CaptureRecorder(tmp_path / "out"), DeferralConfig())
        engine = ServingEngine(backend, expert_models(backend.operations), default_max_tokens=48, fallback=fallback)
        with running(create_app(engine)) as url:
            failed = ask_update("DELETE")
            assert failed.status_code == 200 and failed.headers[ANSWERED_BY] == "expert-demoted-teacher-failed"
            assert json.loads(failed.json()["choices"][0]["message"]["content"])["memory"][0]["event"] == "NONE"
            assert ask_update("NONE").headers[ANSWERED_BY] == "expert-teacher-failed"
            counts = httpx.get(f"{url}/health").json()["deferral"]["counts"]
        assert counts == {"deferred_update": 2, "teacher_failures_update": 2, "demoted_update": 1, **skipped}
        engine.close()
    config = str(deferral_out["config_path"])
    assert main(["serve-experts", "--config", config, "--out", str(tmp_path), "--guard"]) == 2
    assert "no deferral thresholds (run `memlora calibrate` first)" in capsys.readouterr().err
    assert main(["serve-experts", "--config", config, "--out", str(tmp_path), "--guard", "--fallback",
                 "http://127.0.0.1:9/v1"]) == 2
    assert "--guard and --fallback: choose one" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_the_served_systems_evaluation_runs_answer_as_the_server_does(deferral_out, tiny_model_dir):
    """`evaluation.served`: the experts judged call by call on the same thresholds as the server. The guard
    demotes an unsure DELETE and lets an unsure NONE out, marked; with a teacher an unsure call gets the teacher's
    own answer (its latency added to the expert's); a sure answer is the expert's; a call of an operation no expert
    serves goes to the teacher, or without one to the bare student. Log-probs asked only for the judgement are
    taken off again."""
    from memlora.evaluation.served import ServedBackend

    config = deferral_out["config"]
    experts = ExpertBackend.from_config(config, tiny_model_dir, {"update": deferral_out["out"] / "adapters" /
                                                                 "extraction"})
    teacher = TransformersBackend.from_config(config.teacher.model_copy(update={"model": str(tiny_model_dir),
                                                                                "logprobs_top_k": 0}))
    unsure = DeferralPolicy({"operations": {"update": {"keep": {"value": math.inf},
                                                       "destructive": {"value": math.inf}}}})
    sure = DeferralPolicy({"operations": {"update": {"keep": {"value": -math.inf},
                                                     "destructive": {"value": -math.inf}}}})
    messages = TEMPLATES["update"].messages("New fact: Ann moved to Oslo.")
    delete, keep = (GenerationRequest("update", messages, 48, one_entry_schema(e)) for e in ("DELETE", "NONE"))
    facts = GenerationRequest("extraction", deferral_out["messages"][0], 24, SCHEMA)

    def events(result) -> list[str]:
        return [e["event"] for e in json.loads(result.text)["memory"]]

    guarded = ServedBackend(experts, unsure, config).generate([delete, keep, facts])
    assert [r.extra["answered_by"] for r in guarded] == ["expert-demoted", "expert-unsure", "student"]
    assert events(guarded[0]) == ["NONE"] and events(guarded[1]) == ["NONE"]
    assert all(r.token_logprobs is None and r.top_logprobs is None for r in guarded)
    assert guarded[2].text == experts.generate([facts])[0].text  # no extraction expert: the bare student

    own = teacher.generate([delete, keep, facts])
    never = DeferralPolicy({"operations": {"update": {"keep": {"value": 1.0}, "destructive": {"value": 1.0}}}})
    for policy_, decodes in ((never, [delete, keep, facts]), (unsure, [facts])):
        # never sure: the expert decodes every call, then defers; keeping nothing (inf): the expert is not asked
        asked = []
        generate = experts.generate
        experts.generate = lambda requests: asked.extend(requests) or generate(requests)
        try:
            served = ServedBackend(experts, policy_, config, teacher)
            deferred = served.generate([delete, keep, facts])
        finally:
            experts.generate = generate
        assert [(r.operation, r.schema) for r in asked] == [(r.operation, r.schema) for r in decodes]
        assert [r.extra["answered_by"] for r in deferred] == ["teacher"] * 3
        assert [r.text for r in deferred] == [r.text for r in own] and events(deferred[0]) == ["DELETE"]
        assert served.counts == {"teacher_update": 2, "teacher_extraction": 1}

    kept = ServedBackend(experts, sure, config, teacher).generate([delete])[0]
    assert kept.extra["answered_by"] == "expert" and events(kept) == ["DELETE"]
    assert kept.text == experts.generate([delete])[0].text
