"""Deferral's two halves on hand-made data: calibration meets its budget at the upper 95 % bound and defers the
least it can; the confidence of an update answer is read from its decision tokens only (real tokenizer)."""

from __future__ import annotations

import json
import math
import random

import pytest

from memlora.evaluation.calibration import CalibrationError, budget_to_keep, calibrate, keep_curve, served
from memlora.evaluation.stats import wilson
from memlora.llm.confidence import (
    answer_events, confidence, demoted, event_token_indices, is_destructive, low_quantile,
)


def made_pairs(n: int = 600, seed: int = 0) -> list[tuple[float, bool]]:
    """Confident answers mostly agree, unsure ones often do not: disagreement 1 % above a log-prob of -1, 10 %
    down to -2, 50 % below."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        conf = round(-rng.random() * 3, 2)  # a log-prob quantile in (-3, 0], with ties
        wrong = 0.01 if conf > -1 else 0.1 if conf > -2 else 0.5
        pairs.append((conf, rng.random() >= wrong))
    return pairs


@pytest.mark.timeout(30)
@pytest.mark.parametrize("budget", [0.05, 0.1, 0.2])
def test_calibration_meets_its_budget_and_defers_the_least_it_can(budget):
    pairs = made_pairs()
    threshold = calibrate(pairs, budget)
    assert threshold.kept > 0 and threshold.upper <= budget
    kept = [a for c, a in pairs if c >= threshold.value]
    assert len(kept) == threshold.kept and sum(not a for a in kept) == threshold.disagree
    for cut in {c for c, _ in pairs}:  # brute force: no cut that keeps more calls meets the budget
        chosen = [a for c, a in pairs if c >= cut]
        if len(chosen) > threshold.kept:
            assert wilson(sum(not a for a in chosen), len(chosen))[1] > budget
    # the budget holds on calls calibration never saw, at the point estimate (n large enough here)
    check = served(threshold, made_pairs(seed=1))
    assert check.disagree / check.kept <= budget + 0.03
    assert check.served_agreement >= 1 - budget


@pytest.mark.timeout(30)
def test_ties_are_kept_or_deferred_together_and_hopeless_experts_defer_everything():
    pairs = [(-0.1, True)] * 100 + [(-0.5, True)] * 100 + [(-0.5, False)] * 6
    threshold = calibrate(pairs, 0.05)  # within the tie, keeping 200 of 206 would meet it: not a cut
    assert threshold.value == -0.1 and threshold.kept == 100 and threshold.upper <= 0.05
    nothing = calibrate([(-0.1, False)] * 10 + [(-1.0, True)] * 10, 0.05)
    assert nothing.value == math.inf and nothing.kept == 0 and nothing.keep_share == 0
    assert served(nothing, pairs).served_agreement == 1.0
    curve = keep_curve(pairs)
    assert curve[0] == (math.inf, 0.0, 1.0) and curve[-1][1] == 1.0
    assert curve[-1][2] == pytest.approx(200 / 206)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("share", [0.1, 0.3, 0.5, 1.0])
def test_the_least_budget_to_keep_a_share_is_the_one_calibration_needs(share):
    pairs = made_pairs(200)
    least = budget_to_keep(pairs, share)
    assert calibrate(pairs, least).keep_share >= share  # that budget keeps the share...
    assert calibrate(pairs, least - 1e-9).keep_share < share  # ...and none below it does
    # an expert that is wrong where it is surest: only a loose budget keeps anything
    hopeless = [(-0.1, False)] * 10 + [(-1.0, True)] * 10
    assert calibrate(hopeless, 0.2).kept == 0
    # the surest 10 are all wrong (upper bound 1): keeping all 20 is what the least budget buys
    assert budget_to_keep(hopeless, 0.3) == budget_to_keep(hopeless, 1.0) == pytest.approx(wilson(10, 20)[1])
    assert math.isnan(budget_to_keep([], 0.3))


@pytest.mark.timeout(30)
def test_calibration_refuses_what_it_cannot_calibrate():
    with pytest.raises(CalibrationError, match="strictly between 0 and 1"):
        calibrate(made_pairs(), 1.0)
    with pytest.raises(CalibrationError, match="strictly between 0 and 1"):
        calibrate(made_pairs(), 0.0)
    with pytest.raises(CalibrationError, match="0 held-out calls to calibrate on; at least 1"):
        calibrate([], 0.05)
    with pytest.raises(CalibrationError, match="3 held-out calls .* at least 20"):
        calibrate(made_pairs(3), 0.05, min_calls=20)


@pytest.mark.timeout(60)
def test_an_update_answers_confidence_comes_from_its_decision_tokens(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    answer = json.dumps({"memory": [{"id": "0", "text": "Ann moved to Porto in 2023", "event": "DELETE"},
                                    {"id": "1", "text": "Ann has a cat called Ziggy", "event": "NONE"}]},
                        separators=(",", ":"))
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    chosen = event_token_indices(tok, ids)
    assert "".join(tok.decode([ids[i]]) for i in chosen).replace('"', "") in ("DELETENONE", "DELETE NONE")
    # copied memory text written with certainty, the decisions unsure: the update's confidence is the decisions'
    logprobs = [-2.5 if i in chosen else -0.01 for i in range(len(ids))]
    assert confidence("update", answer, ids, logprobs, tok) == -2.5
    assert confidence("extraction", answer, ids, logprobs, tok) == low_quantile(logprobs) == -0.01
    assert answer_events(answer) == ["DELETE", "NONE"] and is_destructive("update", answer)
    assert not is_destructive("update", answer.replace("DELETE", "NONE"))
    assert low_quantile([]) == -math.inf and low_quantile([-1.0, -3.0, -2.0], q=0.5) == -2.0


@pytest.mark.timeout(30)
def test_the_served_answers_delete_and_abstain_as_the_kept_and_deferred_mix_says():
    from memlora.evaluation.deferral import DESTRUCTIVE, KEEP, Scored, check

    def update(event: str) -> str:
        return json.dumps({"memory": [{"id": "0", "text": "x", "event": event}]})

    none, delete = json.loads(update("NONE")), json.loads(update("DELETE"))
    scored = [  # a sure NONE kept, an unsure DELETE deferred (the teacher said NONE), a sure DELETE kept
        Scored("update", -0.1, True, False, update("NONE"), none),
        Scored("update", -2.0, False, True, update("DELETE"), none),
        Scored("update", -0.1, True, True, update("DELETE"), delete),
        Scored("generation", -0.1, True, False, '{"answer": "Not mentioned in the conversation"}',
               {"answer": "Not mentioned in the conversation"}),
        Scored("generation", -3.0, False, False, '{"answer": "Not mentioned in the conversation"}',
               {"answer": "Porto"}),
    ]
    policy = {"update": {KEEP: {"value": -1.0}, DESTRUCTIVE: {"value": -0.5}}, "generation": {KEEP: {"value": -1.0}}}
    report = check(policy, scored)
    assert report["update"] | {"disagreement_ci": None} == {
        "n": 3, "kept": 2, "disagree": 0, "disagreement_ci": None, "served_agreement": 1.0,
        "served_deletes": 1, "teacher_deletes": 1, "expert_deletes": 2,
        # without a teacher (--guard) the unsure DELETE becomes NONE, which is what the teacher said
        "guarded_deletes": 1, "expert_agree": 2, "guarded_agree": 3}
    assert report["generation"]["served_abstains"] == 1 and report["generation"]["expert_abstains"] == 2
    assert report["generation"]["teacher_abstains"] == 1 and report["generation"]["kept"] == 1


@pytest.mark.timeout(30)
def test_a_demoted_update_answer_loses_no_memory():
    """--guard's rewrite: DELETE -> NONE (the memory stays), UPDATE -> ADD of the new text (the old one stays
    beside it), every other entry and field as it was; what is not an update answer comes back unchanged."""
    from memlora.memory.parsing import parse_update

    answer = json.dumps({"memory": [
        {"id": "0", "event": "DELETE", "text": "Ann lives in Porto"},
        {"id": "1", "event": "UPDATE", "text": "Ann has two cats", "old_memory": "Ann has a cat"},
        {"id": "2", "event": "NONE", "text": "Ann is a nurse"},
        {"id": "3", "event": "ADD", "text": "Ann plays jazz"}]})
    safe = demoted(answer)
    assert json.loads(safe) == {"memory": [
        {"id": "0", "event": "NONE", "text": "Ann lives in Porto"},
        {"id": "1", "event": "ADD", "text": "Ann has two cats"},
        {"id": "2", "event": "NONE", "text": "Ann is a nurse"},
        {"id": "3", "event": "ADD", "text": "Ann plays jazz"}]}
    assert not is_destructive("update", safe) and answer_events(safe) == ["NONE", "ADD", "NONE", "ADD"]
    # our memory system applies it: nothing deleted or rewritten, the update's new text added under a new id
    parsed = parse_update(safe, ["0", "1", "2"], "3")
    assert parsed.ok and [(e["id"], e["event"]) for e in parsed.value["memory"]] == [
        ("0", "NONE"), ("3", "ADD"), ("2", "NONE"), ("3", "ADD")]
    for text in ("not json", '["a list"]', '{"facts": ["x"]}', '{"memory": "x"}'):
        assert demoted(text) == text
