"""Evaluating captured traffic: an OUT whose traces came from `memlora capture` (no conversations of ours) is
judged on the calls capture put in its test share (`capture.test_ratio`), never trained on nor used for early
stopping. Each held-out call is replayed as the client sent it (its messages and schema) by the bare student and
by the student with its experts, and scored against the teacher's recorded answer with the operation's own
metric; intervals resample whole conversations (calls of one conversation are not independent).

Both systems run in this one process on one base (the experts switched off for the bare student), so the peak
RSS reported is the process's: the base with every expert, as `serve-experts` holds it.
"""

from __future__ import annotations

import math
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from memlora.config import OPERATIONS, Config
from memlora.data.io import write_text
from memlora.evaluation import scoring
from memlora.evaluation.agreement import INVALID, event_of
from memlora.evaluation.deferral import HeldOutCall, test_calls
from memlora.evaluation.results import _row, write_results
from memlora.evaluation.stats import Estimate
from memlora.evaluation.systems import EvalError
from memlora.layout import conversations_file, report_path, trace_files
from memlora.llm.client_template import MISMATCH
from memlora.memory.llm import GenerationRequest
from memlora.memory.parsing import extract_json
from memlora.memory.prompts import EVENTS

SYSTEMS = ("student", "student+experts")


def is_captured(out: str | Path) -> bool:
    """An OUT of captured calls: shards `capture` (or a deferring server) wrote, and no conversations of ours."""
    return not conversations_file(out).is_file() and any(
        f.name.startswith("part-capture-") for op in OPERATIONS for f in trace_files(out, op))


def cluster_bootstrap(items: list, clusters: list[str], statistic, samples: int, seed: int = 0,
                      min_clusters: int = 1) -> Estimate:
    """`statistic(items)` with a 95 % percentile interval from resampling whole clusters. Below `min_clusters`
    clusters that interval is too narrow (two conversations give three distinct resamples), so it is widened to
    hold the interval from resampling single items as well (as the promotion gate does)."""
    if not items:
        return Estimate(math.nan, 0)
    point = float(statistic(items))
    names = sorted(set(clusters))
    if len(names) < min_clusters:
        by_call = cluster_bootstrap(items, [str(i) for i in range(len(items))], statistic, samples, seed)
        if len(names) < 2 or samples <= 0:
            return by_call
        by_cluster = cluster_bootstrap(items, clusters, statistic, samples, seed)
        return Estimate(point, len(items), min(by_call.ci_low, by_cluster.ci_low),
                        max(by_call.ci_high, by_cluster.ci_high), "cluster-or-call-bootstrap-95")
    if len(names) < 2 or samples <= 0:
        return Estimate(point, len(items))
    groups = [[x for x, c in zip(items, clusters) if c == name] for name in names]
    rng = np.random.default_rng(seed)
    draws = [statistic([x for g in pick for x in groups[g]]) for pick in rng.integers(0, len(names),
                                                                                     size=(samples, len(names)))]
    low, high = np.percentile(draws, [2.5, 97.5])
    return Estimate(point, len(items), float(low), float(high), "cluster-bootstrap-95")


def agreement_rows(system: str, operation: str, outputs: list[dict | None], calls: list[HeldOutCall],
                   config: Config) -> list[dict]:
    clusters = [c.conversation_id for c in calls]
    samples = config.evaluation.bootstrap_samples

    def est(items, statistic):
        return cluster_bootstrap(items, clusters, statistic, samples, min_clusters=config.improve.min_clusters)

    if operation == "extraction":
        mine = [scoring.extracted_facts(o) for o in outputs]
        theirs = [scoring.extracted_facts(c.reference) for c in calls]
        f1 = scoring.fact_set(mine, theirs, config.evaluation.fact_match_threshold)["f1"]
        f1 = [v if o is not None else 0.0 for v, o in zip(f1, outputs)]
        return [_row(system, "agreement", operation, "fact_f1", est(f1, np.mean))]
    if operation == "update":
        pairs = [(event_of(o), event_of(c.reference)) for o, c in zip(outputs, calls)]
        majority = max(EVENTS, key=[g for _, g in pairs].count)
        return [
            _row(system, "agreement", operation, "event_macro_f1", est(pairs, scoring.macro_f1)),
            _row(system, "agreement", operation, "event_accuracy", est([p == g for p, g in pairs], np.mean)),
            _row(system, "agreement", operation, "cohen_kappa", est(pairs, scoring.cohen_kappa)),
            _row(system, "agreement", operation, "majority_baseline_macro_f1",
                 est([(majority, g) for _, g in pairs], scoring.macro_f1)),
            _row(system, "agreement", operation, "predicted_delete",
                 Estimate(float(sum(p == "DELETE" for p, _ in pairs)), len(pairs)), unit="count"),
            _row(system, "agreement", operation, "reference_delete",
                 Estimate(float(sum(g == "DELETE" for _, g in pairs)), len(pairs)), unit="count"),
            _row(system, "agreement", operation, "invalid",
                 Estimate(float(sum(p == INVALID for p, _ in pairs)), len(pairs)), unit="count"),
        ]
    answers = [str((o or {}).get("answer", "")) for o in outputs]
    f1 = scoring.token_f1(answers, [str(c.reference.get("answer", "")) for c in calls])
    return [_row(system, "agreement", operation, "answer_token_f1", est(f1, np.mean))]


def evaluate_captured(config: Config, out: str | Path, backend, on_line=print) -> list[dict]:
    """Results rows (the RESULTS schema) of the bare student and the student + experts on the captured test
    share; raises EvalError when capture held no call out for testing."""
    operations = list(OPERATIONS)
    calls = test_calls(out, config, operations)
    if not calls:
        raise EvalError(f"{Path(out) / 'traces'}: no captured call is in the test share (set capture.test_ratio "
                         "above 0 before capturing; whole conversations or blocks of calls are held out)")
    on_line(f"evaluating on {len(calls)} held-out captured calls from "
            f"{len({c.conversation_id for c in calls})} conversations or blocks")
    rows = []
    for system in SYSTEMS:
        requests = [GenerationRequest(c.operation, c.messages, c.max_new_tokens, c.schema) for c in calls]
        started = time.perf_counter()
        with backend.bare() if system == "student" else nullcontext():
            results = backend.generate(requests)
        on_line(f"{system}: {len(calls)} calls in {time.perf_counter() - started:.1f} s")
        for op in operations:
            pick = [i for i, c in enumerate(calls) if c.operation == op]
            if not pick:
                continue
            parsed = [extract_json(results[i].text) for i in pick]
            outputs = [p.value if p.ok else None for p in parsed]
            rows += agreement_rows(system, op, outputs, [calls[i] for i in pick], config)
            tokens = [results[i].completion_tokens for i in pick]
            per_token = [results[i].latency_s / max(1, results[i].completion_tokens) for i in pick]
            # What the model read: the client's whole prompt (the bare student), or what the expert reads of it
            # (cut to its changing parts by the client template it was trained on)
            read = [results[i].prompt_tokens for i in pick]
            if system == "student+experts" and hasattr(backend, "expert_view"):
                mismatched = sum(backend.expert_view(op, calls[i].messages)[1] == MISMATCH for i in pick)
                rows.append(_row(system, "validity", op, "template_mismatch", Estimate(float(mismatched), len(pick)),
                                 unit="count"))
            rows += [
                _row(system, "latency", op, "prompt_tokens", Estimate(float(np.mean(read)), len(pick)),
                     unit="tokens"),
                _row(system, "validity", op, "parse_ok", Estimate(float(np.mean([p.ok for p in parsed])), len(pick))),
                _row(system, "latency", op, "completion_tokens", Estimate(float(np.mean(tokens)), len(pick)),
                     unit="tokens"),
                _row(system, "latency", op, "seconds_per_token", Estimate(float(np.median(per_token)), len(pick)),
                     unit="s"),
            ]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append(_row("student+experts", "memory", "model", "peak_rss_mb", Estimate(peak, 1), unit="MiB"))
    return rows


def write_captured_report(rows: list[dict], out: str | Path, calls_note: str) -> tuple[Path, Path]:
    """results.parquet, report.md (a table per operation) and report.png (agreement with intervals)."""
    write_results(rows, out)
    lines = ["# Evaluation of captured traffic: bare student vs student + experts", "", calls_note, "",
             "| operation | metric | student | student+experts | n |", "|---|---|---|---|---|"]
    keyed = {(r["system"], r["operation"], r["metric"]): r for r in rows}
    for op, metric in dict.fromkeys((r["operation"], r["metric"]) for r in rows):
        cells = []
        for system in SYSTEMS:
            r = keyed.get((system, op, metric))
            if r is None or r["value"] is None:
                cells.append("-")
            elif r["ci_low"] is not None:
                cells.append(f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
            else:
                cells.append(f"{r['value']:.3f}")
        n = next(r["n"] for r in rows if (r["operation"], r["metric"]) == (op, metric))
        lines.append(f"| {op} | {metric} | {cells[0]} | {cells[1]} | {n} |")
    md = write_text("\n".join(lines) + "\n", report_path(out, ".md"))
    png = report_path(out, ".png")
    _plot(rows, png)
    return md, png


def _plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = {"extraction": "fact_f1", "update": "event_macro_f1", "generation": "answer_token_f1"}
    ops = [op for op in OPERATIONS if any(r["operation"] == op and r["metric"] == primary[op] for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, system in enumerate(SYSTEMS):
        found = [next((r for r in rows if (r["system"], r["operation"], r["metric"]) == (system, op, primary[op])),
                      None) for op in ops]
        values = [r["value"] or 0 for r in found]
        errors = [[max(0.0, v - (r["ci_low"] if r["ci_low"] is not None else v)) for v, r in zip(values, found)],
                  [max(0.0, (r["ci_high"] if r["ci_high"] is not None else v) - v) for v, r in zip(values, found)]]
        ax.bar([i + 0.4 * k for i in range(len(ops))], values, 0.4, yerr=errors, label=system, capsize=3)
    ax.set_xticks([i + 0.2 for i in range(len(ops))], [f"{op}\n{primary[op]}" for op in ops])
    ax.set_ylim(0, 1)
    ax.set_ylabel("agreement with the teacher")
    ax.set_title("Captured calls held out for testing")
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def captured_headline(rows: list[dict]) -> list[dict]:
    """One line per system, for the terminal and the Prefect table artifact."""
    def v(system, op, metric):
        r = next((r for r in rows if (r["system"], r["operation"], r["metric"]) == (system, op, metric)), None)
        return None if r is None or r["value"] is None else round(r["value"], 3)

    return [{"system": s, "extraction_fact_f1": v(s, "extraction", "fact_f1"),
             "update_event_macro_f1": v(s, "update", "event_macro_f1"),
             "update_majority_macro_f1": v(s, "update", "majority_baseline_macro_f1"),
             "update_cohen_kappa": v(s, "update", "cohen_kappa"),
             "generation_token_f1": v(s, "generation", "answer_token_f1"),
             "parse_ok": _mean([v(s, op, "parse_ok") for op in OPERATIONS])} for s in SYSTEMS]


def _mean(values):
    values = [x for x in values if x is not None]
    return round(sum(values) / len(values), 3) if values else None
