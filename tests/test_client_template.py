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
