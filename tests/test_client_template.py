"""The fixed part of a client's prompt, mined from its calls, on Mem0 1.0.11's own prompt builders (the calls it
sends its LLM, made here without a model): what an expert reads is the conversation, the memories and the facts."""

from __future__ import annotations

import json

import pytest

from memlora.llm.client_template import (
    AS_SENT, MINIMAL, MISMATCH, REDUCED, ClientTemplate, TemplateError, changing_parts, current, expert_view, mine,
    store,
)
from memlora.memory.prompts import STUDENT_SYSTEM, TEMPLATES

pytestmark = pytest.mark.timeout(60)

CONVERSATIONS = [
    "user: I adopted a dog named Max last week.\nassistant: That's great!",
    "user: I work as a nurse at the city hospital.\nassistant: nice\nuser: I ran a 10k in 52 minutes.",
    "user: We moved to Berlin.\nassistant: How is it?\nuser: Cold but lovely.",
    "user: My sister Anna lives in Porto since 2019.",
]
MEMORIES = [[], [{"id": "0", "text": "Has a dog named Max"}],
            [{"id": "0", "text": "Lives in Porto"}, {"id": "1", "text": "Is a nurse"}], []]
FACTS = [["Adopted a dog named Max"], ["Sister Anna lives in Porto", "Ran 10k"], ["Moved to Berlin"], ["Likes tea"]]


def extraction_calls() -> list[list[dict]]:
    from mem0.memory.utils import get_fact_retrieval_messages

    calls = []
    for text in CONVERSATIONS:
        system, user = get_fact_retrieval_messages(text)
        calls.append([{"role": "system", "content": system}, {"role": "user", "content": user}])
    return calls


def update_calls() -> list[list[dict]]:
    from mem0.configs.prompts import get_update_memory_messages

    return [[{"role": "user", "content": get_update_memory_messages(m, f, None)}] for m, f in zip(MEMORIES, FACTS)]


def test_mem0_extraction_calls_reduce_to_their_conversation():
    calls = extraction_calls()
    template = mine("extraction", calls, min_calls=3)
    assert template.calls == 4 and template.fixed_lines > 20
    for call, text in zip(calls, CONVERSATIONS):
        assert changing_parts(template, call) == f"Input:\n{text}"  # the header line, then what changed
        view, how = expert_view("minimal", "extraction", call, template)
        assert how == REDUCED and view[0]["content"] == STUDENT_SYSTEM["extraction"]
        whole = sum(len(m["content"]) for m in call)
        assert sum(len(m["content"]) for m in view) < 0.1 * whole


def test_mem0_update_calls_keep_the_memories_and_the_facts_under_their_headers():
    calls = update_calls()
    template = mine("update", calls, min_calls=3)
    for call, memories, facts in zip(calls, MEMORIES, FACTS):
        parts = changing_parts(template, call)
        assert str(facts) in parts and "The new retrieved facts are mentioned in the triple backticks." in parts
        if memories:
            assert str(memories) in parts and "Below is the current content of my memory" in parts
        else:
            assert "Current memory is empty." in parts
        assert len(parts) < 0.1 * len(call[0]["content"])


def test_a_new_day_matches_and_a_new_client_release_does_not():
    calls = extraction_calls()
    template = mine("extraction", calls[:3], min_calls=3)
    system = calls[3][0]["content"]
    assert "Today's date is" in system
    new_day = [{"role": "system", "content": system.replace("Today's date is 20", "Today's date is 19")},
               calls[3][1]]
    assert changing_parts(template, new_day) == f"Input:\n{CONVERSATIONS[3]}"  # numbers are masked
    release = [{"role": "system", "content": system.replace("Personal Information Organizer", "Memory Extractor")},
               calls[3][1]]
    assert changing_parts(template, release) is None
    view, how = expert_view("minimal", "extraction", release, template)
    assert how == MISMATCH and view == release  # read whole, and counted by the caller
    assert changing_parts(template, calls[3][1:]) is None  # another message layout


def test_our_own_prompts_and_a_client_without_template():
    own = TEMPLATES["generation"].messages("Q: where?")
    view, how = expert_view("minimal", "generation", own, None)
    assert how == MINIMAL and view[-1]["content"] == "Q: where?"
    call = extraction_calls()[0]
    assert expert_view("minimal", "extraction", call, None) == (call, AS_SENT)
    assert expert_view("teacher", "extraction", call, mine("extraction", extraction_calls(), 2)) == (call, AS_SENT)


def test_too_few_calls_or_nothing_shared_is_a_clear_error():
    with pytest.raises(TemplateError, match="at least 8 are needed .capture.template_min_calls."):
        mine("extraction", extraction_calls(), min_calls=8)
    unrelated = [[{"role": "user", "content": f"question {word}"}] for word in ("alpha", "beta", "gamma")]
    with pytest.raises(TemplateError, match="share no fixed line"):
        mine("generation", unrelated, min_calls=2)


def test_versions_are_kept_and_a_hand_edited_template_is_refused(tmp_path):
    path = tmp_path / "templates" / "extraction.json"
    first = mine("extraction", extraction_calls()[:2], min_calls=2)
    release = [[{**m, "content": m["content"].replace("Organizer", "Keeper")} for m in c] for c in extraction_calls()]
    second = mine("extraction", release, min_calls=2)
    assert store(path, first) and not store(path, first)
    assert store(path, second)
    assert current(path) == second
    data = json.loads(path.read_text())
    assert [v["fingerprint"] for v in data["versions"]] == [first.fingerprint, second.fingerprint]
    data["versions"][-1]["fixed"][0][0] = "edited"
    path.write_text(json.dumps(data))
    with pytest.raises(TemplateError, match="do not match its fingerprint"):
        current(path)
    assert ClientTemplate.from_dict(first.to_dict()) == first


# --- the template in training and in serving (a tiny random model with the teacher's vocabulary) -------------

def client_rows(calls: list[list[dict]]) -> list[dict]:
    from memlora.data.schemas import TRACES  # noqa: F401  (the rows below have its columns)

    return [{"trace_id": f"capture:{i}", "operation": "extraction", "conversation_id": "capture", "session": 0,
             "step": i, "output_schema": None, "messages": call, "raw_output": '{"facts": ["Has a dog"]}',
             "parsed_output": '{"facts": ["Has a dog"]}', "parse_ok": True, "parse_error": None, "constrained": True,
             "finish_reason": "stop", "prompt_tokens": 0, "completion_tokens": 5, "completion_token_ids": None,
             "top_logprobs": None, "latency_s": 0.1, "batch_size": 1, "model_id": "teacher", "backend": "capture",
             "template_hash": ""} for i, call in enumerate(calls)]


def release_call(call: list[dict], repeat: int = 1) -> list[dict]:
    """Mem0's call as a new release might send it: the instructions reworded (and `repeat` times as long)."""
    system = call[0]["content"].replace("Personal Information Organizer", "Personal Information Organiser")
    return [{"role": "system", "content": "\n".join([system] * repeat)}, call[1]]


def test_training_reads_the_changing_parts_and_skips_a_call_of_another_release(tiny_model_dir):
    import pyarrow as pa
    from transformers import AutoTokenizer

    from memlora.data.schemas import TRACES
    from memlora.student.examples import build_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    calls = extraction_calls()
    template = mine("extraction", calls, min_calls=3)
    table = pa.Table.from_pylist(client_rows([*calls, release_call(calls[0])]), schema=TRACES)
    reduced = build_examples(table, tokenizer, 4096, False, prompt="minimal", template=template)
    whole = build_examples(table, tokenizer, 4096, False, prompt="teacher")
    assert reduced.rows_used == 4 and reduced.skipped == {"template_mismatch": 1}
    assert whole.rows_used == 5 and not whole.skipped
    assert reduced.prompt_tokens / 4 < 0.2 * whole.prompt_tokens / 5


def test_served_expert_cuts_calls_counts_a_new_release_and_refuses_one_too_long(tmp_path, tiny_model_dir):
    import httpx

    from memlora.config import CaptureRule
    from memlora.llm.openai_server import ServingEngine, create_app, expert_models
    from memlora.student.experts import TEMPLATE_FILE, ExpertBackend
    from tests.serving_fixtures import running
    from tests.student_fixtures import saved_expert

    folder = saved_expert(tiny_model_dir, tmp_path / "extraction", seed=1)
    calls = extraction_calls()
    (folder / TEMPLATE_FILE).write_text(json.dumps(mine("extraction", calls, min_calls=3).to_dict()))
    backend = ExpertBackend(tiny_model_dir, {"extraction": folder}, device="cpu", prompt="minimal")
    rules = [CaptureRule(operation="extraction", system_contains="Personal Information Organi")]
    engine = ServingEngine(backend, expert_models(["extraction"]), rules, default_max_tokens=4)
    body = lambda messages: {"model": "memlora", "messages": messages, "max_tokens": 4}  # noqa: E731
    try:
        with running(create_app(engine)) as url:
            cut = httpx.post(f"{url}/v1/chat/completions", json=body(calls[0]), timeout=60)
            whole = httpx.post(f"{url}/v1/chat/completions", json=body(release_call(calls[0])), timeout=60)
            too_long = httpx.post(f"{url}/v1/chat/completions", json=body(release_call(calls[0], 3)), timeout=60)
            after = httpx.post(f"{url}/v1/chat/completions", json=body(calls[1]), timeout=60)
            counts = httpx.get(f"{url}/health", timeout=10).json()["counts"]
    finally:
        engine.close()
    assert cut.status_code == whole.status_code == after.status_code == 200
    assert cut.json()["usage"]["prompt_tokens"] < 0.2 * whole.json()["usage"]["prompt_tokens"]
    assert too_long.status_code == 400, too_long.text
    error = too_long.json()["error"]
    assert error["code"] == "context_length_exceeded" and "does not match the client template" in error["message"]
    assert counts["extraction_reduced"] == 2 and counts["extraction_template_mismatch"] == 2, counts


def test_a_promoted_expert_without_template_takes_the_old_one_away(tmp_path, tiny_model_dir):
    from memlora.manifest import update_manifest
    from memlora.student.experts import TEMPLATE_FILE, ExpertBackend, verified_expert_folders
    from memlora.student.versions import install
    from tests.student_fixtures import saved_expert

    out = tmp_path / "out"
    served = saved_expert(tiny_model_dir, out / "adapters" / "extraction", seed=1)
    (served / TEMPLATE_FILE).write_text(json.dumps(mine("extraction", extraction_calls(), 3).to_dict()))
    update_manifest(out)
    assert ExpertBackend(tiny_model_dir, verified_expert_folders(out), device="cpu").templates
    install(out, {"extraction": saved_expert(tiny_model_dir, tmp_path / "candidate", seed=2)})
    assert not (served / TEMPLATE_FILE).exists()
    assert not ExpertBackend(tiny_model_dir, verified_expert_folders(out), device="cpu").templates


def test_capture_records_a_call_of_another_release_and_counts_it(tmp_path):
    from memlora.config import CaptureRule
    from memlora.layout import templates_path
    from memlora.teacher.capture import CaptureRecorder

    calls = extraction_calls()
    recorder = CaptureRecorder(tmp_path / "out")
    rule = CaptureRule(operation="extraction", system_contains="Personal Information Organi")
    answer = {"choices": [{"message": {"content": '{"facts": ["Has a dog"]}'}}], "usage": {}}
    record = lambda messages: recorder.write(recorder.row(rule, messages, None, answer, 0.1, None, 0))  # noqa: E731
    record(release_call(calls[0]))  # no template yet: nothing to differ from
    store(templates_path(tmp_path / "out", "extraction"), mine("extraction", calls, 3))
    record(calls[1])
    record(release_call(calls[2]))
    assert recorder.counts["recorded_extraction"] == 3  # every call is recorded
    assert recorder.counts["extraction_template_mismatch"] == 1


def test_templates_command_names_what_is_wrong(tmp_path):
    import subprocess

    import pyarrow as pa

    from memlora.data.io import write_parquet
    from memlora.data.schemas import TRACES
    from tests.conftest import BIN, REPO

    def templates(out):
        return subprocess.run([str(BIN / "memlora"), "templates", "--config", str(REPO / "configs" / "mem0.yaml"),
                               "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)

    missing = templates(tmp_path / "missing")
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    out = tmp_path / "out"
    rows = pa.Table.from_pylist(client_rows(extraction_calls()[:2]), schema=TRACES)
    write_parquet(rows, out / "traces" / "extraction" / "part-capture-a.parquet", "traces")
    few = templates(out)
    assert few.returncode == 2 and "2 recorded calls" in few.stderr and "at least 8 are needed" in few.stderr
    assert not (out / "templates").exists()


def test_the_routed_model_sends_our_own_prompts_to_their_experts_without_rules(tmp_path, tiny_model_dir):
    """The embedded default has no capture.rules: under `memlora` our own memory system's calls (the teacher's
    template, or the minimal prompt) must reach their expert, not the bare base (a newcomer found the latter)."""
    import httpx

    from memlora.llm.openai_server import ServingEngine, create_app, expert_models
    from memlora.student.experts import ExpertBackend
    from tests.serving_fixtures import running
    from tests.student_fixtures import saved_expert

    folder = saved_expert(tiny_model_dir, tmp_path / "extraction", seed=1)
    backend = ExpertBackend(tiny_model_dir, {"extraction": folder}, device="cpu", prompt="minimal")
    engine = ServingEngine(backend, expert_models(["extraction"]), [], default_max_tokens=4)
    ours = [{"role": "system", "content": TEMPLATES["extraction"].system},
            {"role": "user", "content": "Conversation:\nuser: I adopted a dog named Max last week."}]
    minimal = [{"role": "system", "content": STUDENT_SYSTEM["extraction"]}, ours[1]]
    body = lambda model, messages: {"model": model, "messages": messages, "max_tokens": 4}  # noqa: E731
    try:
        assert "extraction" in engine.routing_line() and "bare student base" in engine.routing_line()
        with running(create_app(engine)) as url:
            tokens = {name: httpx.post(f"{url}/v1/chat/completions", json=body(model, messages), timeout=60)
                      .json()["usage"]["prompt_tokens"]
                      for name, model, messages in [("routed", "memlora", ours), ("named", "memlora-extraction", ours),
                                                    ("minimal", "memlora", minimal), ("base", "memlora-base", ours)]}
    finally:
        engine.close()
    assert tokens["routed"] == tokens["named"] == tokens["minimal"], tokens  # the expert's cut prompt, all three
    assert tokens["routed"] < 0.5 * tokens["base"], tokens  # the bare base reads the teacher's prompt whole
