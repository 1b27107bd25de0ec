"""OUT/eval/results.parquet: one row per (system, operation, metric), merged from the per-system files.

Sections: `agreement` (teacher-forced, per operation), `validity` (parse_ok and strict schema validity, per
operation, constrained and free), `latency` (per operation, on the teacher-forced requests, sent in the same
groups by every system), `qa` (end to end, overall as operation `qa` and per LoCoMo category as `qa/cat-N`), `memory`
(per system, operation `model`), `served` (who answered a served system's calls, and every system's DELETEs end to
end). A metric measured under free decoding carries the suffix `_free`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from memlora.config import OPERATIONS, Config
from memlora.data.io import write_parquet
from memlora.evaluation import agreement, scoring
from memlora.evaluation.replay import E2E, FORCED, FORCED_FREE
from memlora.evaluation.probes import Probe
from memlora.evaluation.stats import Estimate, bootstrap, percentile, proportion
from memlora.evaluation.systems import SYSTEMS, in_rows, systems
from memlora.layout import calls_path, judgements_path, probe_path, qa_path, results_path
from memlora.llm.confidence import answer_events
from memlora.llm.guard import DEMOTED, EXPERT, TEACHER, UNSURE

RESULTS = pa.schema([
    pa.field("system", pa.string(), nullable=False),
    pa.field("section", pa.string(), nullable=False),
    pa.field("operation", pa.string(), nullable=False),
    pa.field("metric", pa.string(), nullable=False),
    pa.field("decoding", pa.string()),        # constrained | free | null (not a decoding matter)
    pa.field("value", pa.float64()),
    pa.field("n", pa.int64(), nullable=False),
    pa.field("ci_low", pa.float64()),
    pa.field("ci_high", pa.float64()),
    pa.field("ci_method", pa.string(), nullable=False),  # wilson-95 | bootstrap-95 | none
    pa.field("unit", pa.string(), nullable=False),
])


def _row(system, section, operation, metric, estimate: Estimate, unit="ratio", decoding=None) -> dict:
    nan = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)  # noqa: E731
    return {"system": system, "section": section, "operation": operation, "metric": metric, "decoding": decoding,
            "value": nan(estimate.value), "n": estimate.n, "ci_low": nan(estimate.ci_low),
            "ci_high": nan(estimate.ci_high), "ci_method": estimate.ci_method, "unit": unit}


def _plain(value, n=1) -> Estimate:
    return Estimate(float("nan") if value is None else float(value), n)


def load_system(out: Path, system: str) -> dict:
    calls = pq.read_table(calls_path(out, system)).to_pylist()
    return {
        "calls": calls,
        "qa": pq.read_table(qa_path(out, system)).to_pylist(),
        "probe": Probe.read(probe_path(out, system)),
    }


def _decoding_rows(system, rows, reference, label, config: Config) -> list[dict]:
    suffix = "" if label == "constrained" else "_free"
    ev = config.evaluation
    out = []
    for op in OPERATIONS:
        op_rows = [r for r in rows if r["operation"] == op]
        out.append(_row(system, "validity", op, "parse_ok" + suffix, proportion([r["parse_ok"] for r in op_rows]),
                        decoding=label))
        out.append(_row(system, "validity", op, "schema_valid" + suffix,
                        proportion([r["schema_valid"] for r in op_rows]), decoding=label))
        out.append(_row(system, "validity", op, "empty" + suffix, proportion([is_empty(r) for r in op_rows]),
                        decoding=label))
        out.append(_row(system, "validity", op, "cut_at_limit" + suffix,
                        proportion([r["finish_reason"] == "length" for r in op_rows]), decoding=label))
        for metric, estimate in agreement.score(op, op_rows, reference, ev.fact_match_threshold,
                                                ev.bootstrap_samples).items():
            unit = "calls" if metric.startswith(("predicted_", "reference_")) else "ratio"
            out.append(_row(system, "agreement", op, metric + suffix, estimate, unit, decoding=label))
    return out


def is_empty(row: dict) -> bool:
    """A degenerate output: nothing but whitespace, or a generation whose answer is blank (`{"answer": " "}` is
    valid under the schema, and says nothing)."""
    text = row["raw_output"].strip()
    if not text:
        return True
    if row["operation"] == "generation":
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return isinstance(value, dict) and isinstance(value.get("answer"), str) and not value["answer"].strip()
    return False


def latency_rows(system, rows, samples) -> list[dict]:
    out = []
    for op in OPERATIONS:
        op_rows = [r for r in rows if r["operation"] == op]
        lat = [r["latency_s"] for r in op_rows]
        completion = sum(r["completion_tokens"] for r in op_rows)
        total_s = sum(lat)
        out += [
            _row(system, "latency", op, "latency_p50", percentile(lat, 50, samples=samples), "s"),
            _row(system, "latency", op, "latency_p95", percentile(lat, 95, samples=samples), "s"),
            _row(system, "latency", op, "prompt_tokens", bootstrap([r["prompt_tokens"] for r in op_rows],
                                                                  samples=samples), "tokens"),
            _row(system, "latency", op, "completion_tokens", bootstrap([r["completion_tokens"] for r in op_rows],
                                                                      samples=samples), "tokens"),
            _row(system, "latency", op, "tokens_per_s",
                 _plain(completion / total_s if total_s > 0 else None, len(op_rows)), "tokens/s"),
            # Seconds per generated token: a short or truncated answer makes a call fast, not the model.
            _row(system, "latency", op, "s_per_token",
                 _plain(total_s / completion if completion > 0 else None, len(op_rows)), "s/token"),
            _row(system, "latency", op, "batch_size", bootstrap([r["batch_size"] for r in op_rows], samples=0),
                 "calls"),
        ]
    return out


# The headline's QA: LoCoMo's categories 1-4, whose gold answer is in the conversation. On category 5 an answer
# scores 1 for abstaining, so a system that abstains on everything would lead an all-category mean.
ANSWERABLE = "qa/answerable"


def qa_rows(system, qa, judged: dict, samples) -> list[dict]:
    out = []
    groups = [("qa", qa), (ANSWERABLE, [q for q in qa if q["category"] != 5])] + [
        (f"qa/cat-{c}", [q for q in qa if q["category"] == c]) for c in sorted({q["category"] for q in qa})]
    for operation, items in groups:
        s = scoring.qa_scores([q["answer"] for q in items], [q["gold"] for q in items],
                              [q["category"] for q in items]) if items else {"token_f1": [], "bleu1": []}
        labels = [judged.get((q["conversation_id"], q["question_id"])) for q in items]
        out += [
            _row(system, "qa", operation, "token_f1", bootstrap(s["token_f1"], samples=samples)),
            _row(system, "qa", operation, "bleu1", bootstrap(s["bleu1"], samples=samples)),
            _row(system, "qa", operation, "judge_accuracy",
                 proportion([label == "CORRECT" for label in labels if label is not None])),
            _row(system, "qa", operation, "answered", proportion([q["answered"] for q in items])),
            # "Not mentioned in the conversation" and its kin: right on category 5, a miss everywhere else.
            _row(system, "qa", operation, "abstain_rate", proportion([scoring.abstains(q["answer"]) for q in items])),
        ]
    return out


def memory_rows(system, probe: Probe) -> list[dict]:
    params = probe.parameters or {}
    adapters = probe.adapters
    cuda = probe.cuda_peak_mb or {}
    values = [
        ("params_base", params.get("base"), "parameters"),
        ("params_adapters", params.get("adapters", 0) if params else None, "parameters"),
        ("adapter_bytes", sum(a["bytes"] for a in adapters.values()), "bytes"),
        ("peak_rss_mb", probe.peak_rss_mb, "MiB"),
        ("peak_rss_e2e_mb", probe.peak_rss_e2e_mb, "MiB"),
        ("ru_maxrss_mb", probe.ru_maxrss_mb, "MiB"),
        ("rss_after_load_mb", (probe.after_load or {}).get("rss_mb"), "MiB"),
        ("rss_baseline_mb", (probe.baseline or {}).get("rss_mb"), "MiB"),
        ("load_s", probe.load_s, "s"),
    ]
    if cuda:  # on a GPU only
        values += [("peak_cuda_allocated_mb", cuda["allocated"], "MiB"),
                   ("peak_cuda_reserved_mb", cuda["reserved"], "MiB")]
    return [_row(system, "memory", "model", metric, _plain(value), unit) for metric, value, unit in values]


SERVED_AS = {EXPERT: "kept_by_expert", DEMOTED: "demoted", UNSURE: "unsure",
             TEACHER: "deferred_to_teacher"}  # a served call's `answered_by` -> its metric


def served_rows(system, calls) -> list[dict]:
    """Who answered a served system's calls (`evaluation.served`), per operation, on the teacher's requests and
    end to end (`_e2e`); for every system, the DELETEs its update calls made end to end (memories a user loses)."""
    out = []
    e2e_updates = [r for r in calls if r["phase"] == E2E and r["operation"] == "update"]
    deletes = sum(answer_events(r["raw_output"]).count("DELETE") for r in e2e_updates if r["parse_ok"])
    out.append(_row(system, "served", "update", "deletes_e2e", _plain(deletes, len(e2e_updates)), "events"))
    if not any(r.get("answered_by") for r in calls):
        return out
    for op in OPERATIONS:
        for phase, suffix in ((FORCED, ""), (E2E, "_e2e")):
            mine = [r.get("answered_by") for r in calls if r["phase"] == phase and r["operation"] == op]
            for who, metric in SERVED_AS.items():
                out.append(_row(system, "served", op, metric + suffix, proportion([w == who for w in mine])))
    return out


def build_results(out: str | Path, config: Config) -> list[dict]:
    out = Path(out)
    data = {s: load_system(out, s) for s in systems(config)}
    reference = {r["index"]: r for r in data["teacher"]["calls"] if r["phase"] == E2E}
    judged = {}
    if judgements_path(out).is_file():
        for j in pq.read_table(judgements_path(out)).to_pylist():
            judged[(j["system"], j["conversation_id"], j["question_id"])] = j["label"]
    samples = config.evaluation.bootstrap_samples
    rows = []
    for system in data:
        calls = data[system]["calls"]
        forced = [r for r in calls if r["phase"] == FORCED]
        constrained = [r for r in forced if r["constrained"]]
        free = [r for r in forced if not r["constrained"]] + [r for r in calls if r["phase"] == FORCED_FREE]
        rows += _decoding_rows(system, constrained, reference, "constrained", config)
        if free:
            rows += _decoding_rows(system, free, reference, "free", config)
        rows += latency_rows(system, forced, samples)
        mine = {(c, q): label for (s, c, q), label in judged.items() if s == system}
        rows += qa_rows(system, data[system]["qa"], mine, samples)
        rows += memory_rows(system, data[system]["probe"])
        rows += served_rows(system, calls)
    return rows


def write_results(rows: list[dict], out: str | Path) -> Path:
    return write_parquet(pa.Table.from_pylist(rows, schema=RESULTS), results_path(out), "eval-results")


def lookup(rows: list[dict], system: str, operation: str, metric: str) -> dict | None:
    for r in rows:
        if (r["system"], r["operation"], r["metric"]) == (system, operation, metric):
            return r
    return None


def independent_judge(config: Config) -> bool:
    """A judge that is not the teacher being judged (by default the teacher judges, a 135M model here: it labelled
    all its own answers CORRECT, "2023" for "autumn 2024" included). Only such a judge makes the headline."""
    judge = config.evaluation.judge
    return judge is not None and judge.model != config.teacher.model


def headline(rows: list[dict], with_judge: bool = False) -> list[dict]:
    """One line per system: the numbers a reader wants first (the Prefect table artifact). The judge's accuracy
    is in it only `with_judge` (an independent judge)."""
    def v(system, operation, metric):
        r = lookup(rows, system, operation, metric)
        return None if r is None or r["value"] is None else round(r["value"], 3)

    table = []
    for system in in_rows(rows) or SYSTEMS:  # no rows yet: the columns every evaluation has
        table.append({
            "system": system,
            "extraction_fact_f1": v(system, "extraction", "fact_f1"),
            "update_event_macro_f1": v(system, "update", "event_macro_f1"),
            "update_majority_macro_f1": v(system, "update", "majority_baseline_macro_f1"),
            "update_event_accuracy": v(system, "update", "event_accuracy"),
            "update_cohen_kappa": v(system, "update", "cohen_kappa"),
            "generation_token_f1": v(system, "generation", "answer_token_f1"),
            "parse_ok_constrained": _mean([v(system, op, "parse_ok") for op in OPERATIONS]),
            "parse_ok_free": _mean([v(system, op, "parse_ok_free") for op in OPERATIONS]),
            "qa_token_f1": v(system, ANSWERABLE, "token_f1"),  # categories 1-4
            "qa_abstain_rate": v(system, ANSWERABLE, "abstain_rate"),
            "qa_token_f1_all": v(system, "qa", "token_f1"),
            **({"qa_judge_accuracy": v(system, "qa", "judge_accuracy")} if with_judge else {}),
            "peak_rss_mb": round(v(system, "model", "peak_rss_mb") or 0, 1) or None,
            "peak_rss_e2e_mb": round(v(system, "model", "peak_rss_e2e_mb") or 0, 1) or None,
            **{key: value for op in OPERATIONS for key, value in (
                (f"{op}_p50_s", v(system, op, "latency_p50")),
                (f"{op}_tokens_per_call", v(system, op, "completion_tokens")))},
        })
    return table


def _mean(values):
    values = [x for x in values if x is not None]
    return round(sum(values) / len(values), 3) if values else None

