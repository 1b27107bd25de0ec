"""Writes tests/data/bad/: one malformed input per file, and expected.json with what each error must name.

Run it again after changing a case: `python tests/data/make_bad_corpus.py`.
"""

import copy
import json
from pathlib import Path

HERE = Path(__file__).parent / "bad"


def good_sample(sid="conv-a"):
    return {
        "sample_id": sid,
        "conversation": {
            "speaker_a": "Ann", "speaker_b": "Ben",
            "session_1_date_time": "1:56 pm on 8 May, 2023",
            "session_1": [
                {"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a cat named Tom."},
                {"speaker": "Ben", "dia_id": "D1:2", "text": "Nice! I work as a baker."},
            ],
        },
        "qa": [{"question": "What is Ann's cat called?", "answer": "Tom", "evidence": ["D1:1"], "category": 4}],
    }


def mutate(fn):
    sample = good_sample()
    fn(sample)
    return [sample]


CASES = {}


def case(name, content, *expect):
    CASES[name] = (content, list(expect))


conv = lambda s: s["conversation"]  # noqa: E731
turn = lambda s, i=0: s["conversation"]["session_1"][i]  # noqa: E731

case("invalid_json.json", '[{"sample_id": "x", "conversation": {', "invalid JSON", "line 1")
case("trailing_garbage.json", json.dumps([good_sample()]) + " ]]", "invalid JSON")
case("not_a_list.json", json.dumps({"sample_id": "x"}), "expected a JSON list")
case("sample_not_object.json", json.dumps(["hello"]), "sample 0", "expected an object")
case("missing_conversation.json", mutate(lambda s: s.pop("conversation")), "sample 0 (conv-a)", "'conversation'", "missing")
case("conversation_not_object.json", mutate(lambda s: s.update(conversation=[1, 2])), "'conversation'", "expected an object")
case("empty_conversation.json", mutate(lambda s: s.update(conversation={"speaker_a": "A", "speaker_b": "B"})), "empty conversation")
case("session_without_turns.json", mutate(lambda s: conv(s).update(session_1=[])), "session_1", "no turns")
case("session_not_list.json", mutate(lambda s: conv(s).update(session_1="hi")), "session_1", "expected a list of turns")
case("turn_missing_speaker.json", mutate(lambda s: turn(s).pop("speaker")), "session_1, turn 0", "'speaker'", "missing")
case("turn_missing_text.json", mutate(lambda s: turn(s, 1).pop("text")), "turn 1 (D1:2)", "'text'", "missing")
case("turn_missing_dia_id.json", mutate(lambda s: turn(s).pop("dia_id")), "turn 0", "'dia_id'", "missing")
case("turn_text_not_string.json", mutate(lambda s: turn(s).update(text=42)), "turn 0 (D1:1)", "'text'", "expected a string")
case("turn_speaker_empty.json", mutate(lambda s: turn(s).update(speaker="  ")), "'speaker'", "empty")
case("turn_not_object.json", mutate(lambda s: conv(s)["session_1"].append("oops")), "turn 2", "expected an object")
case("duplicate_dia_id.json", mutate(lambda s: turn(s, 1).update(dia_id="D1:1")), "turn 1 (D1:1)", "duplicate")
case("missing_date.json", mutate(lambda s: conv(s).pop("session_1_date_time")), "session_1_date_time", "missing")
case("bad_date.json", mutate(lambda s: conv(s).update(session_1_date_time="yesterday at noon")), "session_1_date_time", "not a date")
case("date_not_string.json", mutate(lambda s: conv(s).update(session_1_date_time=20230508)), "session_1_date_time", "expected a date string")
case("qa_not_list.json", mutate(lambda s: s.update(qa={"question": "x"})), "'qa'", "expected a list")
case("qa_no_answer.json", mutate(lambda s: s["qa"][0].pop("answer")), "qa 0", "'answer'", "adversarial_answer")
case("qa_bad_category.json", mutate(lambda s: s["qa"][0].update(category=9)), "qa 0", "'category'")
case("qa_category_string.json", mutate(lambda s: s["qa"][0].update(category="4")), "qa 0", "'category'")
case("qa_missing_question.json", mutate(lambda s: s["qa"][0].pop("question")), "qa 0", "'question'", "missing")
case("qa_bad_evidence.json", mutate(lambda s: s["qa"][0].update(evidence="D1:1")), "qa 0", "'evidence'")
case("qa_answer_object.json", mutate(lambda s: s["qa"][0].update(answer={"a": 1})), "qa 0", "'answer'", "expected a string")
case("path_traversal_id.json", mutate(lambda s: s.update(sample_id="../../etc/passwd")), "'conversation_id'", "not a safe id")
case("slash_in_id.json", mutate(lambda s: s.update(sample_id="a/b")), "not a safe id")
case("duplicate_sample_id.json", [good_sample(), good_sample()], "sample 1 (conv-a)", "duplicate")
case("empty_list.json", [], "no conversations")
case("jsonl_bad_line.jsonl", '{"type": "turn"\n', "line 1", "invalid JSON")
case(
    "jsonl_unknown_type.jsonl",
    json.dumps({"type": "note", "conversation_id": "c1"}) + "\n",
    "line 1", "'type'",
)
case(
    "jsonl_turn_bad_session.jsonl",
    json.dumps({"type": "turn", "conversation_id": "c1", "session": "one", "turn": 1, "speaker": "A",
                "text": "hi", "time": "2023-05-08T13:56:00"}) + "\n",
    "line 1", "'session'",
)
case(
    "jsonl_questions_only.jsonl",
    json.dumps({"type": "question", "conversation_id": "c1", "question": "q?", "answer": "a", "category": 4}) + "\n",
    "c1", "empty conversation",
)
case(
    "jsonl_traversal_id.jsonl",
    json.dumps({"type": "turn", "conversation_id": "../x", "session": 1, "turn": 1, "speaker": "A",
                "text": "hi", "time": "2023-05-08T13:56:00"}) + "\n",
    "line 1", "not a safe id",
)


def main():
    HERE.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (content, expect) in CASES.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=1)
        (HERE / name).write_text(text, encoding="utf-8")
        expected[name] = expect
    # Bytes that are not UTF-8 (Latin-1 text).
    good = json.dumps([good_sample()]).replace("baker", "boulanger \xe9l\xe8ve")
    (HERE / "latin1.json").write_bytes(good.encode("latin-1"))
    expected["latin1.json"] = ["not UTF-8", "offset"]
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{len(expected)} bad inputs written to {HERE}")


if __name__ == "__main__":
    main()
