"""Calibrating deferral (`memlora calibrate`): the experts answer held-out calls the teacher answered, each answer's
confidence is read from its own token log-probs, and each operation gets the threshold that keeps the most calls
within the disagreement budget. Calibration uses the validation split's trace rows (ours or captured), and the
calls a served expert has not been trained on since it was (`fresh_calls`); the
test conversations' teacher calls, where an evaluation has run, check the thresholds on calls calibration never
saw. Update answers that delete or rewrite a memory are calibrated apart: a destructive answer is kept only where
such answers' own agreement on the validation calls clears the budget."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

from memlora.config import Config
from memlora.data.compaction import rows_not_from
from memlora.data.io import write_json
from memlora.data.split import captured_split
from memlora.evaluation import scoring
from memlora.evaluation.calibration import (
    CalibrationError, DeferralPolicy, Threshold, budget_to_keep, calibrate, in_audit_sample, keep_curve, served,
)
from memlora.layout import adapter_dir, calls_path, deferral_path, trace_files
from memlora.llm.confidence import answer_events, confidence, demoted, is_destructive
from memlora.memory.llm import GenerationRequest, LLMBackend
from memlora.memory.parsing import extract_json
from memlora.student.examples import conversation_splits, load_traces, split_rows
from memlora.student.experts import expert_digests, expert_folders
from memlora.student.records import TRAINING_FILE, TrainingRecord

KEEP, DESTRUCTIVE = "keep", "destructive"  # the two classes of an operation's answers, calibrated apart
# Shares of calls for which calibration also says the least budget that would keep them (`budgets_to_keep`)
KEEP_SHARES = (0.1, 0.3, 0.5)


@dataclass(frozen=True)
class HeldOutCall:
    operation: str
    messages: list[dict]
    schema: dict | None
    max_new_tokens: int
    reference: dict  # the teacher's parsed answer
    conversation_id: str = ""  # the cluster its call belongs to (intervals resample conversations)


@dataclass(frozen=True)
class Scored:
    operation: str
    confidence: float
    agrees: bool
    destructive: bool
    text: str = ""  # the expert's answer
    reference: dict | None = None  # the teacher's parsed answer


def parsed_value(text: str) -> dict | None:
    parsed = extract_json(text)
    return parsed.value if parsed.ok else None


def agrees(operation: str, text: str, reference: dict, config: Config) -> bool:
    """Whether an answer agrees with the teacher's, by the operation's rule (config `deferral`, documented in the
    README): the same update events entry by entry; extraction fact F1 and answer token F1 at least their
    thresholds; for a client's own operation, the same JSON."""
    value = parsed_value(text)
    if value is None:
        return False
    if operation == "update":
        return answer_events(json.dumps(value)) == answer_events(json.dumps(reference))
    if operation == "extraction":
        mine, theirs = scoring.extracted_facts(value), scoring.extracted_facts(reference)
        if not mine or not theirs:
            return not mine and not theirs
        f1 = scoring.fact_set([mine], [theirs], config.evaluation.fact_match_threshold)["f1"][0]
        return f1 >= config.deferral.fact_f1
    if operation == "generation":
        return scoring.token_f1([str(value.get("answer", ""))], [str(reference.get("answer", ""))])[0] \
            >= config.deferral.answer_f1
    return value == reference


def max_tokens(operation: str, config: Config) -> int:
    """The cap the memory system decodes an operation with; a client's own operation: `deferral.max_tokens`."""
    ours = config.memory.operations.get(operation)
    return ours.max_new_tokens if ours is not None else config.deferral.max_tokens


def held_out_call(row: dict, config: Config) -> HeldOutCall:
    return HeldOutCall(row["operation"], row["messages"], json.loads(row["output_schema"]) if row["output_schema"]
                       else None, max_tokens(row["operation"], config), json.loads(row["parsed_output"]),
                       row["conversation_id"])


def _usable(row: dict, config: Config) -> bool:
    return row["parse_ok"] and bool(row["parsed_output"]) and in_audit_sample(row, config.deferral.audit_share)


def validation_calls(out: str | Path, config: Config, operations: list[str]) -> list[HeldOutCall]:
    """The validation split's trace rows whose teacher answer parsed: early stopping's rows, never trained on
    (of the calls serve-experts recorded, the audit sample only)."""
    splits = conversation_splits(out)
    calls = []
    for op in operations:
        _, held = split_rows(load_traces(trace_files(out, op)), splits)
        calls += [held_out_call(row, config) for row in held.to_pylist() if _usable(row, config)]
    return calls


def fresh_calls(out: str | Path, config: Config, operations: list[str]) -> list[HeldOutCall]:
    """Training-split calls that arrived after the served expert of their operation was trained (trace files its
    training.json does not list), in the audit sample: held out for that expert, though the next candidate
    trains on them. They let a served expert's thresholds follow the traffic it serves."""
    splits = conversation_splits(out)
    calls = []
    for op in operations:
        record = adapter_dir(out, op) / TRAINING_FILE
        if not record.is_file():
            continue
        trained = set(TrainingRecord.read(record).trace_files)
        if not trained:
            continue
        fresh = rows_not_from(trace_files(out, op), trained)  # by shard: a merged file holds old and new calls
        if not fresh.num_rows:
            continue
        train, _ = split_rows(fresh, splits)
        calls += [held_out_call(row, config) for row in train.to_pylist() if _usable(row, config)]
    return calls


def calibration_calls(out: str | Path, config: Config, operations: list[str]) -> list[HeldOutCall]:
    """What the served experts are calibrated on: the validation calls, and the calls each has not been trained
    on since it was."""
    return validation_calls(out, config, operations) + fresh_calls(out, config, operations)


def test_calls(out: str | Path, config: Config, operations: list[str]) -> list[HeldOutCall]:
    """Calls calibration never saw: the captured calls in capture's test share, and the teacher's own calls on
    the test conversations from an evaluation's run (none if none ran)."""
    calls = []
    for op in operations:
        calls += [held_out_call(row, config) for row in load_traces(trace_files(out, op)).to_pylist()
                  if captured_split(row["conversation_id"]) == "test" and _usable(row, config)]
    path = calls_path(out, "teacher")
    if not path.is_file():
        return calls
    for row in pq.read_table(path).to_pylist():
        if row["phase"] == "e2e" and row["operation"] in operations and row["parse_ok"] and row["parsed_output"]:
            calls.append(HeldOutCall(row["operation"], json.loads(row["messages"]),
                                     json.loads(row["output_schema"]) if row["output_schema"] else None,
                                     int(row["max_new_tokens"]), json.loads(row["parsed_output"]),
                                     row["conversation_id"]))
    return calls


def score(backend: LLMBackend, tokenizer, calls: list[HeldOutCall], config: Config) -> list[Scored]:
    """Each call answered by its expert (greedy, its schema, the chosen tokens' log-probs kept) and scored."""
    requests = [GenerationRequest(c.operation, c.messages, c.max_new_tokens, c.schema, logprobs_top_k=1)
                for c in calls]
    results = backend.generate(requests)
    return [Scored(c.operation,
                   confidence(c.operation, r.text, r.token_ids or [], r.token_logprobs or [], tokenizer,
                              config.deferral.quantile),
                   agrees(c.operation, r.text, c.reference, config), is_destructive(c.operation, r.text), r.text,
                   c.reference)
            for c, r in zip(calls, results)]


def _pairs(scored: list[Scored], operation: str, destructive: bool) -> list[tuple[float, bool]]:
    return [(s.confidence, s.agrees) for s in scored if s.operation == operation and s.destructive == destructive]


def fit(scored: list[Scored], operations: list[str], config: Config) -> dict:
    """Thresholds per operation and class, with the validation curves; a class with no calls defers always."""
    budget = config.deferral.budget
    policy = {}
    for op in operations:
        n = sum(s.operation == op for s in scored)
        if n < config.deferral.min_calls:
            raise CalibrationError(f"{op}: {n} held-out calls to calibrate on; at least "
                                   f"{config.deferral.min_calls} are needed (deferral.min_calls)")
        classes = {}
        for name, destructive in ((KEEP, False), (DESTRUCTIVE, True)):
            pairs = _pairs(scored, op, destructive)
            if not pairs and destructive and op != "update":
                continue
            threshold = calibrate(pairs, budget) if pairs else Threshold(math.inf, budget, 0, 0, 0, math.nan)
            classes[name] = {**asdict(threshold), "curve": keep_curve(pairs),
                             "budgets_to_keep": {str(share): budget_to_keep(pairs, share) for share in KEEP_SHARES}}
        policy[op] = classes
    return policy


def _deletes(texts: list[str]) -> int:
    return sum(answer_events(t).count("DELETE") for t in texts)


def _abstains(texts: list[str]) -> int:
    return sum(scoring.abstains(str((parsed_value(t) or {}).get("answer", ""))) for t in texts)


def kept(policy: dict, s: Scored) -> bool:
    classes = policy.get(s.operation, {})
    name = DESTRUCTIVE if s.destructive else KEEP
    return name in classes and s.confidence >= classes[name]["value"]


def guarded(policy: dict, s: Scored) -> str:
    """What `serve-experts --guard` answers: the expert's answer, its destructive events demoted where unsure."""
    return demoted(s.text) if s.destructive and not kept(policy, s) else s.text


def check(policy: dict, scored: list[Scored]) -> dict:
    """Each operation's thresholds on other calls: share kept, disagreement of the kept (Wilson 95 %), and what
    the served answers (the expert's where kept, the teacher's where deferred) do that a user would feel: update
    DELETEs and abstaining answers, against the teacher's own on the same calls."""
    report = {}
    for op in policy:
        calls = [s for s in scored if s.operation == op]
        if not calls:
            continue
        result = served(-math.inf, [(s.confidence, s.agrees) for s in calls if kept(policy, s)])
        entry = {"n": len(calls), "kept": result.kept, "disagree": result.disagree,
                 "disagreement_ci": list(result.disagreement_ci),
                 "served_agreement": 1 - result.disagree / len(calls)}
        teacher_texts = [json.dumps(s.reference) for s in calls]
        served_texts = [s.text if kept(policy, s) else t for s, t in zip(calls, teacher_texts)]
        expert_texts = [s.text for s in calls]
        if op == "update":
            guarded_texts = [guarded(policy, s) for s in calls]
            entry.update(served_deletes=_deletes(served_texts), teacher_deletes=_deletes(teacher_texts),
                         expert_deletes=_deletes(expert_texts), guarded_deletes=_deletes(guarded_texts),
                         expert_agree=sum(s.agrees for s in calls),
                         guarded_agree=sum(s.agrees if g == s.text else answer_events(g) == answer_events(t)
                                           for s, g, t in zip(calls, guarded_texts, teacher_texts)))
        if op == "generation":
            entry.update(served_abstains=_abstains(served_texts), teacher_abstains=_abstains(teacher_texts),
                         expert_abstains=_abstains(expert_texts))
        report[op] = entry
    return report


def summary(result: dict) -> str:
    """What `memlora calibrate` prints: per operation, the thresholds and what they keep on validation and test."""
    lines = [f"budget: at most {result['budget']:.0%} of kept answers disagree with the teacher (upper 95 % bound)",
             "operation   class        threshold  kept/n (validation)  upper   budget to keep 30 %  "
             "test: kept/n  disagreement of kept"]
    for op, classes in result["operations"].items():
        test = result["test"].get(op)
        for i, (name, t) in enumerate(classes.items()):
            upper = "-" if math.isnan(t["upper"]) else f"{t['upper']:.3f}"
            needed = _budget_text(t.get("budgets_to_keep", {}).get("0.3", math.nan))
            tested = ""
            if test and i == 0:
                low, high = test["disagreement_ci"]
                ci = "-" if test["kept"] == 0 else f"{test['disagree'] / test['kept']:.3f} [{low:.3f}, {high:.3f}]"
                tested = f"{test['kept']}/{test['n']}  {ci}"
            lines.append(f"{op:<11} {name:<12} {t['value']:>9.3f}  {t['kept']:>4}/{t['n']:<15} {upper:<7} "
                         f"{needed:<20} {tested}")
    for split in ("validation", "test"):
        update = result.get(split, {}).get("update")
        if update and "guarded_agree" in update:
            lines.append(f"update without a teacher (--guard), {split}: {update['guarded_agree']}/{update['n']} "
                         f"agree (the expert alone {update['expert_agree']}), DELETEs {update['guarded_deletes']} "
                         f"(the expert alone {update['expert_deletes']}, the teacher {update['teacher_deletes']})")
    policy = DeferralPolicy(result)
    nothing = [op for op in result["operations"] if policy.keeps_nothing(op)]
    if nothing:
        lines.append(f"no threshold keeps an answer of {', '.join(nothing)}: `serve-experts --fallback` sends those "
                     "calls straight to the teacher, without the expert")
    return "\n".join(lines)


def _budget_text(budget: float) -> str:
    """A budget calibration could be given: none where no budget below 1 would do (every kept answer may
    disagree)."""
    return "-" if math.isnan(budget) or budget >= 1 else f"{budget:.3f}"


def test_check(config: Config, out: str | Path, backend, policy: dict, operations: list[str],
               on_line=lambda line: None) -> dict:
    """`check` of `policy` on OUT's calls calibration never saw, answered by `backend`."""
    tests = test_calls(out, config, operations)
    if tests:
        on_line(f"checking on {len(tests)} test calls")
    return check(policy, score(backend, backend.tokenizer, tests, config))


def stale_thresholds(out: str | Path) -> list[str]:
    """Operations whose thresholds in OUT/deferral.json were fitted on another expert than the one OUT serves now
    (a `memlora distill` or a rollback since): a server defers all their calls until they are recalibrated."""
    if not deferral_path(out).is_file():
        return []
    return DeferralPolicy.read(deferral_path(out)).for_experts(expert_digests(expert_folders(out))).stale


def calibrate_out(config: Config, out: str | Path, backend, operations: list[str], held: list[HeldOutCall],
                  on_line=lambda line: None) -> dict:
    """Thresholds fitted on `held` and checked on OUT's test calls, written to OUT/deferral.json (what
    `memlora calibrate` does, and `improve` every night it has new rows)."""
    on_line(f"calibrating on {len(held)} held-out calls")
    scored = score(backend, backend.tokenizer, held, config)
    policy = fit(scored, operations, config)
    result = {"budget": config.deferral.budget, "quantile": config.deferral.quantile, "operations": policy,
              # the experts these thresholds hold for: a server drops those of an expert replaced since
              "experts": {op: d for op, d in getattr(backend, "digests", {}).items() if op in policy},
              "validation": check(policy, scored),
              "test": test_check(config, out, backend, policy, operations, on_line)}
    write_json(result, deferral_path(out))
    return result
