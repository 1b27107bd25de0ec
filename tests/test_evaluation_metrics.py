"""Evaluation metrics against hand-computed values, confidence intervals, agreement scoring on hand-made call
rows, the judge's parsing, and the memory probe's process isolation. No model is loaded here."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from memlora.config import MemoryConfig
from memlora.evaluation import agreement, scoring
from memlora.evaluation.judge import judge_answers, parse_label
from memlora.evaluation.replay import parse_output, reference_schema, schema_valid, update_ids
from memlora.evaluation.stats import bootstrap, percentile, proportion, wilson
from memlora.memory.llm import GenerationResult
from memlora.memory.prompts import NOT_MENTIONED, TEMPLATES
from memlora.memory.store import Memory
from memlora.memory.system import render_update


@pytest.mark.timeout(120)
def test_token_f1_rouge_l_and_bleu1_match_hand_computed_values():
    # normalized: [cat, sat, on, mat] vs [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7
    assert scoring.token_f1(["The cat sat on the mat."], ["a cat on a mat"]) == [pytest.approx(6 / 7)]
    assert scoring.token_f1(["", "Paris", ""], ["", "", "Paris"]) == [1.0, 0.0, 0.0]
    assert scoring.token_f1(["red red car"], ["red car car"]) == [pytest.approx(2 / 3)]  # multiset overlap 2
    # LCS(alice owns a red car, alice has a red car) = alice a red car: 4/5 both ways
    assert scoring.rouge_l(["Alice owns a red car"], ["alice has a red car"]) == [pytest.approx(0.8)]
    assert scoring.rouge_l([""], ["x"]) == [0.0]
    # BLEU-1: [cat, on, mat] vs [cat, sat, on, mat]: unigram precision 1, brevity penalty exp(1 - 4/3)
    assert scoring.bleu1(["cat on mat"], ["the cat sat on the mat"]) == [pytest.approx(math.exp(-1 / 3))]
    assert scoring.bleu1(["", "dog"], ["cat", "cat"]) == [0.0, pytest.approx(0.0, abs=1e-9)]


@pytest.mark.timeout(120)
def test_fact_set_matching_is_fuzzy_and_one_to_one():
    s = scoring.fact_set(
        [["Alice lives in Paris", "Bob has two cats", "Bob has two cats"], [], [], ["Ann has a cat", "Ann has a cat"]],
        [["Alice lives in Paris, France", "Bob owns a dog"], [], ["x"], ["Ann has a cat"]],
        threshold=0.5,
    )
    # 1: "alice lives in paris" ~ "alice lives in paris france" (F1 8/9) matches; bob/bob F1 2/7 < 0.5 does not
    assert s["precision"] == pytest.approx([1 / 3, 1.0, 0.0, 0.5])
    assert s["recall"] == pytest.approx([1 / 2, 1.0, 0.0, 1.0])
    assert s["f1"] == pytest.approx([0.4, 1.0, 0.0, 2 / 3])
    strict = scoring.fact_set([["Alice lives in Paris"]], [["Alice lives in Paris, France"]], threshold=0.9)
    assert strict["f1"] == [0.0]  # 8/9 < 0.9


@pytest.mark.timeout(120)
def test_event_accuracy_and_macro_f1():
    e = scoring.events(["ADD", "ADD", "NONE", "INVALID"], ["ADD", "UPDATE", "NONE", "NONE"])
    assert e["accuracy"] == 0.5 and e["correct"] == [1, 0, 1, 0]
    # ADD: tp 1 fp 1 -> 2/3; UPDATE: 0; NONE: tp 1 fn 1 -> 2/3; INVALID is no class of its own
    assert e["per_class_f1"] == pytest.approx({"ADD": 2 / 3, "UPDATE": 0.0, "NONE": 2 / 3})
    assert e["macro_f1"] == pytest.approx(4 / 9)
    assert scoring.macro_f1(list(zip(["ADD", "ADD", "NONE", "INVALID"], ["ADD", "UPDATE", "NONE", "NONE"]))) == \
        pytest.approx(4 / 9)


@pytest.mark.timeout(120)
def test_qa_scores_count_adversarial_abstentions_as_correct():
    s = scoring.qa_scores(
        [NOT_MENTIONED, "Paris", "No information available", "in Paris"],
        [NOT_MENTIONED, NOT_MENTIONED, "Lyon", "Paris"],
        [5, 5, 4, 1],
    )
    assert s["token_f1"] == pytest.approx([1.0, 0.0, 0.0, 2 / 3])
    assert s["bleu1"][:3] == [1.0, 0.0, 0.0]


@pytest.mark.timeout(120)
def test_confidence_intervals():
    low, high = wilson(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    p = proportion([True, False, True, True])
    assert p.value == 0.75 and p.n == 4 and p.ci_method == "wilson-95" and p.ci_low < 0.75 < p.ci_high
    b = bootstrap([0.0, 1.0] * 20, samples=500)
    assert b.value == 0.5 and b.ci_low < 0.5 < b.ci_high and b.ci_method == "bootstrap-95"
    assert bootstrap([0.3, 0.3, 0.3], samples=100).ci_low == pytest.approx(0.3)
    assert math.isnan(bootstrap([]).value) and bootstrap([0.7]).ci_method == "none"
    assert percentile([1, 2, 3, 4, 100], 50).value == 3.0
    assert percentile([1.0, 2.0], 95).value == pytest.approx(1.95)


def _row(op, index, parsed, ok=True, ref=None, group=0):
    return {"operation": op, "index": index, "ref_index": index if ref is None else ref, "group": group,
            "parse_ok": ok, "parsed_output": json.dumps(parsed) if ok else None}


@pytest.mark.timeout(120)
def test_agreement_leaves_out_unparsed_teacher_calls_and_zeroes_unparsed_answers():
    teacher = {0: _row("extraction", 0, {"facts": ["Ann has a cat"]}),
               1: _row("extraction", 1, {"facts": []}),
               2: _row("extraction", 2, None, ok=False),           # no reference: left out
               3: _row("update", 3, {"memory": [{"id": "0", "text": "x", "event": "ADD"}]}),
               4: _row("update", 4, {"memory": [{"id": "0", "text": "x", "event": "NONE"}]}),
               5: _row("generation", 5, {"answer": "a cat"})}
    system = [_row("extraction", 0, {"facts": ["Ann has one cat"]}),
              _row("extraction", 1, None, ok=False),               # empty reference, but unparsed: 0
              _row("extraction", 2, {"facts": ["whatever"]}),
              _row("update", 3, {"memory": [{"id": "0", "text": "x", "event": "ADD"}]}),
              _row("update", 4, None, ok=False),
              _row("generation", 5, {"answer": "A cat!"})]
    ex = agreement.score("extraction", system, teacher, 0.5, samples=0)
    assert ex["fact_f1"].n == 2 and ex["fact_f1"].value == pytest.approx(0.5)
    up = agreement.score("update", system, teacher, 0.5, samples=0)
    assert up["event_accuracy"].value == 0.5 and up["event_macro_f1"].value == pytest.approx(1 / 2)
    # Always answering the teacher's most common event (a tie ADD/NONE: ADD, first in EVENTS order).
    assert up["majority_baseline_accuracy"].value == 0.5 and up["majority_baseline_macro_f1"].value == pytest.approx(1 / 3)
    assert (up["reference_add"].value, up["reference_none"].value) == (1, 1)
    assert (up["predicted_add"].value, up["predicted_invalid"].value) == (1, 1)
    gen = agreement.score("generation", system, teacher, 0.5, samples=0)
    assert gen["answer_token_f1"].value == 1.0 and gen["answer_rouge_l"].value == 1.0


@pytest.mark.timeout(60)
def test_free_output_is_checked_like_constrained_output():
    shown = [Memory("a", "Ann has a cat", "", ""), Memory("b", "Ben bakes", "", "")]
    messages = TEMPLATES["update"].messages(render_update(shown, "Ann has two cats", "2"))
    assert update_ids(messages) == (["0", "1"], "2")
    assert parse_output("update", messages, '{"memory": [{"id": "1", "text": "t", "event": "UPDATE"}]}').ok
    assert not parse_output("update", messages, '{"memory": [{"id": "5", "text": "t", "event": "UPDATE"}]}').ok
    schema = reference_schema("update", messages, MemoryConfig())
    assert schema_valid('{"memory": [{"id": "2", "text": "t", "event": "ADD"}]}', schema)
    assert not schema_valid('Sure: {"memory": [{"id": "2", "text": "t", "event": "ADD"}]}', schema)  # prose
    compact = reference_schema("update", messages, MemoryConfig(update_output="compact"))
    assert schema_valid('{"memory": [{"id": "1", "event": "NONE"}]}', compact)
    assert not schema_valid('{"memory": [{"id": "1", "event": "NONE"}]}', schema)  # the full form needs the text
    assert not schema_valid('{"memory": [{"id": "1", "event": "UPDATE"}]}', compact)  # an UPDATE needs it in both
    gen_schema = reference_schema("generation", [], MemoryConfig())
    assert parse_output("generation", [], "a cat").ok and not schema_valid("a cat", gen_schema)


class ScriptedJudge:
    model_id, backend_name = "scripted", "scripted"

    def __init__(self, texts):
        self.texts, self.requests = list(texts), []

    def generate(self, requests):
        self.requests += requests
        return [GenerationResult(self.texts.pop(0), 1, 1, 0.0, len(requests), r.constrained) for r in requests]


@pytest.mark.timeout(60)
def test_judge_labels_asks_once_per_distinct_answer_and_never_for_empty_ones():
    assert parse_label('{"label": "CORRECT"}') == "CORRECT"
    assert parse_label("WRONG, the gold says Paris") == "WRONG"
    assert parse_label("maybe") is None
    qa = [{"system": s, "conversation_id": "c", "question_id": i, "question": "Q?", "gold": "Paris", "answer": a}
          for s, i, a in [("teacher", 0, "Paris"), ("student", 0, "Paris"), ("student", 1, ""), ("x", 2, "Rome")]]
    judge = ScriptedJudge(['{"label": "CORRECT"}', "no idea"])
    labels = judge_answers(judge, qa, max_new_tokens=8)
    assert len(judge.requests) == 2 and all(r.schema["properties"]["label"]["enum"] == ["CORRECT", "WRONG"]
                                            for r in judge.requests)
    assert [j["label"] for j in labels] == ["CORRECT", "CORRECT", "WRONG", "WRONG"]
    assert [j["judged"] for j in labels] == [True, True, False, True]
    assert labels[3]["judge_parse_ok"] is False


@pytest.mark.timeout(120)
def test_metrics_load_from_the_repo_without_network_or_nltk_data(monkeypatch, tmp_path):
    """Sockets refused, nltk without data or download: every metric module loads again by path and computes."""
    import socket

    import nltk

    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(nltk, "download", refuse)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no-nltk-data")])
    scoring.load.cache_clear()
    try:
        assert scoring.token_f1(["a b"], ["a b"]) == [1.0]
        assert scoring.rouge_l(["A b."], ["a b"]) == [1.0]
        assert scoring.bleu1(["a b"], ["a b"]) == [1.0]
        assert scoring.fact_set([["a b"]], [["a b"]], 0.5)["f1"] == [1.0]
        assert scoring.events(["ADD"], ["ADD"])["accuracy"] == 1.0
    finally:
        scoring.load.cache_clear()


@pytest.mark.timeout(60)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_rss_is_the_child_process_own_not_its_parents():
    """A child started by a big parent reports its own (small) peak: getrusage's ru_maxrss would not."""
    code = ("import json; from memlora.evaluation import probes; "
            "print(json.dumps({'peak': probes.peak_rss_mb(), 'ru': probes.ru_maxrss_mb()}))")
    ballast = bytearray(300 * 1024 * 1024)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])  # touch every page: the parent's RSS grows by 300 MiB
    from memlora.evaluation.probes import peak_rss_mb

    parent_peak = peak_rss_mb()
    child = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True, timeout=50).stdout)
    del ballast
    assert parent_peak > 300
    assert 0 < child["peak"] < 150 < parent_peak, child


RESTARTED_PEAK = """
import json
from memlora.evaluation import probes
def touched(mib):
    block = bytearray(mib << 20)
    block[::4096] = b"\\x01" * len(block[::4096])
    return block
first = touched(300)
before = probes.peak_rss_mb()
del first
restarted = probes.restart_peak()
after_restart = probes.peak_rss_mb()
second = touched(100)
print(json.dumps({"before": before, "restarted": restarted, "after_restart": after_restart,
                  "after_second": probes.peak_rss_mb()}))
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_restarted_peak_holds_only_what_came_after_it():
    """What the evaluation reads for the end-to-end phase: 300 MiB freed before the restart are not in the peak
    after it; 100 MiB touched after it are."""
    seen = json.loads(subprocess.run([sys.executable, "-c", RESTARTED_PEAK], capture_output=True, text=True,
                                     check=True, timeout=50).stdout)
    assert seen["restarted"] and seen["before"] > 300
    assert seen["after_restart"] < seen["before"] - 250
    assert seen["after_restart"] + 90 < seen["after_second"] < seen["before"]


@pytest.mark.timeout(30)
def test_a_judge_that_is_the_teacher_stays_out_of_the_headline():
    from memlora.config import parse_config
    from memlora.evaluation.results import headline, independent_judge
    from tests.conftest import TEACHER_REF

    base = {"teacher": {"model": TEACHER_REF}, "student": {"prune": {"from": "teacher", "every": 3}}}
    assert not independent_judge(parse_config(base))
    assert not independent_judge(parse_config({**base, "evaluation": {"judge": {"model": TEACHER_REF}}}))
    assert "qa_judge_accuracy" not in headline([])[0]
    assert "qa_judge_accuracy" in headline([], with_judge=True)[0]


@pytest.mark.timeout(60)
def test_degenerate_outputs_are_counted_and_a_zero_bar_shows_as_zero():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memlora.evaluation.report import _bars
    from memlora.evaluation.results import is_empty

    row = lambda op, text: {"operation": op, "raw_output": text}  # noqa: E731
    assert is_empty(row("generation", '{"answer": " "}')) and is_empty(row("extraction", "  \n"))
    assert not is_empty(row("generation", '{"answer": "Paris"}')) and not is_empty(row("extraction", '{"facts": []}'))
    assert not is_empty(row("generation", "Paris"))  # free text: not blank

    fig, ax = plt.subplots()
    _bars(ax, ["a", "b"], {"teacher": [(0.5, 0.4, 0.6), (0.0, 0.0, 0.1)], "student": [(0.0, None, None), (0.2, None, None)]},
          "score", "t")
    zero_lines = [line for line in ax.lines if list(line.get_ydata()) == [0, 0] and line.get_linewidth() == 3]
    assert len(zero_lines) == 2  # one per zero value, none for the others
    assert sum(t.get_text() == "0" for t in ax.texts) == 2
    plt.close(fig)


@pytest.mark.timeout(60)
def test_a_system_process_progress_reaches_the_caller_as_it_comes(tmp_path):
    import subprocess
    import sys

    from memlora.evaluation.process import wait_following

    log = tmp_path / "system.log"
    script = ("import time\n"
              "print('[12:00:00] teacher: end to end, conversation 1/1, session 1/2', flush=True)\n"
              "print('Loading weights: 100%', flush=True)\n"
              "time.sleep(1.5)\n"
              "print('[12:00:02] teacher: end to end, conversation 1/1, session 2/2', flush=True)\n")
    seen: list[tuple[float, str]] = []
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=fh, stderr=subprocess.STDOUT)
        rc = wait_following(proc, log, 30, lambda line: seen.append((proc.poll(), line)))
    assert rc == 0
    assert [line for _, line in seen] == ["[12:00:00] teacher: end to end, conversation 1/1, session 1/2",
                                          "[12:00:02] teacher: end to end, conversation 1/1, session 2/2"]
    assert seen[0][0] is None  # the first line arrived while the process was still running


def test_the_headline_prints_one_line_per_measure_and_one_column_per_system():
    from memlora.evaluation.report import headline_text

    heads = [{"system": "teacher", "qa_token_f1": 0.219, "parse_ok_free": None},
             {"system": "student+experts", "qa_token_f1": 0.254, "parse_ok_free": None}]
    lines = headline_text(heads).splitlines()
    assert lines[0].split() == ["teacher", "student+experts"]
    assert lines[1].split() == ["qa_token_f1", "0.219", "0.254"] and lines[2].split() == ["parse_ok_free", "-", "-"]
    assert "nothing was evaluated" in headline_text([])


@pytest.mark.timeout(60)
def test_report_shows_update_class_counts_as_counts_out_of_n():
    from memlora.evaluation.report import _table

    def row(system, metric, value, n=74):
        return {"system": system, "section": "agreement", "operation": "update", "metric": metric, "value": value,
                "ci_low": None, "ci_high": None, "ci_method": "none", "n": n}

    rows = [row(s, "predicted_delete", v) for s, v in (("teacher", 3.0), ("student", 52.0), ("student+experts", 0.0))]
    line = _table(rows, [("system says DELETE", "update", "predicted_delete")], counts=True)[-1]
    assert line == "| system says DELETE | 3 of 74 | 52 of 74 | 0 of 74 |"


@pytest.mark.timeout(60)
def test_cohen_kappa_on_hand_made_decisions():
    perfect = [("DELETE", "DELETE"), ("NONE", "NONE"), ("NONE", "NONE"), ("DELETE", "DELETE")]
    assert scoring.cohen_kappa(perfect) == pytest.approx(1.0)
    # the expert's label frequencies match the teacher's (half each) but the decisions are independent of them
    chance = [("DELETE", "DELETE"), ("DELETE", "NONE"), ("NONE", "DELETE"), ("NONE", "NONE")]
    assert scoring.cohen_kappa(chance) == pytest.approx(0.0)
    # always the teacher's majority: 90 % accuracy and no skill at all
    prior = [("NONE", "NONE")] * 9 + [("NONE", "DELETE")]
    assert scoring.cohen_kappa(prior) == pytest.approx(0.0)
    worse = [("DELETE", "NONE"), ("NONE", "DELETE")] * 3
    assert scoring.cohen_kappa(worse) == pytest.approx(-1.0)
    # 3 of 4 agree; p_o = 0.75, p_e = 0.5 * 0.75 + 0.5 * 0.25 = 0.5 -> (0.75 - 0.5) / 0.5
    assert scoring.cohen_kappa([("NONE", "NONE"), ("NONE", "NONE"), ("DELETE", "DELETE"), ("DELETE", "NONE")]) == \
        pytest.approx(0.5)
    assert math.isnan(scoring.cohen_kappa([]))


@pytest.mark.timeout(120)
def test_abstention_rate_and_the_headline_qa_leave_adversarial_questions_aside():
    from memlora.evaluation.report import skill_sentences
    from memlora.evaluation.results import ANSWERABLE, headline, lookup, qa_rows

    def qa(category, gold, answer):
        return {"conversation_id": "c", "question_id": len(items), "category": category, "gold": gold,
                "answer": answer, "answered": True}

    items = []
    for category, gold, answer in [(4, "Paris", "Paris"), (4, "Lyon", NOT_MENTIONED),
                                   (2, "May 2023", "The information is not available in the conversation"),
                                   (1, "a dog", "a dog"), (5, NOT_MENTIONED, NOT_MENTIONED),
                                   (5, NOT_MENTIONED, "Not mentioned.")]:
        items.append(qa(category, gold, answer))
    rows = qa_rows("student+experts", items, {}, samples=200)
    answerable = lookup(rows, "student+experts", ANSWERABLE, "abstain_rate")
    assert answerable["value"] == pytest.approx(0.5) and answerable["n"] == 4
    assert lookup(rows, "student+experts", "qa", "abstain_rate")["value"] == pytest.approx(4 / 6)
    assert lookup(rows, "student+experts", ANSWERABLE, "token_f1")["value"] == pytest.approx(0.5)
    # all categories: the two adversarial abstentions score 1 each and lift the mean
    assert lookup(rows, "student+experts", "qa", "token_f1")["value"] == pytest.approx(4 / 6)
    head = {h["system"]: h for h in headline(rows)}["student+experts"]
    assert head["qa_token_f1"] == 0.5 and head["qa_token_f1_all"] == pytest.approx(0.667, abs=1e-3)
    assert head["qa_abstain_rate"] == 0.5

    def kappa(system, value, low, high):
        return {"system": system, "section": "agreement", "operation": "update", "metric": "cohen_kappa",
                "value": value, "ci_low": low, "ci_high": high, "ci_method": "bootstrap-95", "n": 47}

    said = skill_sentences([kappa("student", 0.03, -0.1, 0.15), kappa("student+experts", 0.5, 0.1, 0.8)])
    assert len(said) == 2 and "student: no measurable update skill" in said[1]


def test_report_says_free_decoding_was_off_and_what_the_headline_pools(tmp_path):
    """A newcomer met an empty free-decoding table, '–' for parse_ok_free with no word why, and the teacher at 1.0
    in the figure's accuracy panel: the report on the embedded default's stored results (free decoding off)."""
    from types import SimpleNamespace

    from memlora.evaluation.report import free_decoded, render_markdown, render_png
    from tests.conftest import REPO

    rows = json.loads((REPO / "bench" / "reference" / "cpu-2core" / "embedded_default.json").read_text())["rows"]
    assert not free_decoded(rows)
    probe = SimpleNamespace(model_id="m", adapters={}, device="cpu", dtype="float32", pid=1, batching="merged")
    meta = {"config_name": "embedded-default", "conversations": ["sample-7", "sample-12"], "questions": 20,
            "judge": "m", "probes": {"teacher": probe, "student": probe, "student+experts": probe}}
    md = render_markdown(rows, meta)
    assert "free decoding was off (`evaluation.free_decoding: false`)" in md
    assert "Not run: `evaluation.free_decoding` is off" in md and "(free) |" not in md
    assert "mean of the three operations' parse rates" in md and "p50 and p95 may be equal" in md
    assert "teacher, student, student+experts: calls were merged into batches decoded to their end" in md
    assert render_png(rows, tmp_path / "report.png").stat().st_size > 10_000
