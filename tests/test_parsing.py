import pytest

from memlora.memory.parsing import extract_json, parse_extraction, parse_generation, parse_update

# Outputs shaped like what small models really write.
RECOVERABLE = [
    ('{"facts": ["Ann has a cat"]}', ["Ann has a cat"]),
    ('```json\n{"facts": ["Ann has a cat"]}\n```', ["Ann has a cat"]),
    ('Here are the facts:\n{"facts": ["Ann has a cat"]}\nHope this helps! {"x": 1}', ["Ann has a cat"]),
    ("{'facts': ['Ann has a cat']}", ["Ann has a cat"]),
    ('{"facts": ["Ann has a cat",]}', ["Ann has a cat"]),
    ('{"facts": ["Ann said \\"hi {there}\\"", "  "]}', ['Ann said "hi {there}"']),
    ('{"facts": []}', []),
]


@pytest.mark.parametrize("text,facts", RECOVERABLE)
def test_extraction_recovers_from_noise(text, facts):
    parsed = parse_extraction(text)
    assert parsed.ok, parsed.error
    assert parsed.value == {"facts": facts}


@pytest.mark.parametrize(
    "text,reason",
    [
        ("", "empty output"),
        ("   \n", "empty output"),
        ('{"facts": ["Ann has a ca', "no complete JSON object"),
        ("Ann has a cat and Ben bakes bread.", "no complete JSON object"),
        ('{"facts": "Ann has a cat"}', "not a list"),
        ('{"facts": [1, 2]}', "non-string"),
        ('{"fact": ["x"]}', "missing"),
        ("{facts: [x]}", "not valid JSON"),
    ],
)
def test_extraction_failures_are_reported_not_raised(text, reason):
    parsed = parse_extraction(text)
    assert not parsed.ok
    assert reason in parsed.error


def test_update_checks_events_and_ids_against_the_prompt():
    ok = parse_update(
        '{"memory": [{"id": "0", "text": "Bob lives in Denver", "event": "UPDATE", "old_memory": "Boston"},'
        ' {"id": "7", "text": "Bob has a dog", "event": "ADD"}]}',
        shown_ids=["0", "1"], new_id="2",
    )
    assert ok.ok
    assert ok.value["memory"][1]["id"] == "2"  # an ADD always gets the next free id
    assert ok.value["memory"][0]["old_memory"] == "Boston"
    bad_event = parse_update('{"memory": [{"id": "0", "text": "x", "event": "MODIFY"}]}', ["0"], "1")
    assert not bad_event.ok and "'MODIFY'" in bad_event.error
    invented = parse_update('{"memory": [{"id": "5", "text": "x", "event": "DELETE"}]}', ["0"], "1")
    assert not invented.ok and "was not shown" in invented.error
    # NONE and DELETE may leave their text out (`memory.update_output: compact`); ADD and UPDATE may not
    compact = parse_update('{"memory": [{"id": "0", "event": "NONE"}, {"id": "1", "event": "DELETE"}]}', ["0", "1"], "2")
    assert compact.ok and [e["text"] for e in compact.value["memory"]] == ["", ""]
    for event in ("ADD", "UPDATE"):
        no_text = parse_update(f'{{"memory": [{{"id": "0", "event": "{event}"}}]}}', ["0"], "1")
        assert not no_text.ok and "memory[0].text" in no_text.error


def test_generation_accepts_json_or_plain_words():
    assert parse_generation('{"answer": "Max"}').value == {"answer": "Max"}
    assert parse_generation('{"answer": 3}').value == {"answer": "3"}
    assert parse_generation("Max, the puppy\nmore").value == {"answer": "Max, the puppy"}
    assert not parse_generation('{"answer": ""}').ok
    assert not parse_generation('{"answer": "Ma').ok


def test_extract_json_never_raises_on_garbage():
    for text in ["{" * 5000, "}{", "{'a': [}", "\x00\x01", '{"a": 1e999999}', "{" + "[" * 3000 + "}"]:
        extract_json(text)  # no exception
