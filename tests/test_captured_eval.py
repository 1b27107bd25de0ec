"""`memlora evaluate` on an OUT of captured calls (no conversations of ours): the bare student and the student +
experts on capture's test share, per-operation agreement with intervals over conversations, results.parquet,
report.md and report.png (tiny model; the teacher's recorded answers are set so the expert agrees with them)."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memlora.data.io import write_parquet
from memlora.data.schemas import TRACES
from memlora.evaluation.captured import cluster_bootstrap
from memlora.evaluation.scoring import cohen_kappa
from memlora.layout import adapter_dir, report_path, results_path
from memlora.manifest import update_manifest
from memlora.memory.llm import GenerationRequest
from memlora.memory.prompts import TEMPLATES, update_schema
from memlora.student.experts import ExpertBackend
from tests.student_fixtures import pruned_config, saved_expert
from tests.test_improve import CAP, LINES, SCHEMA, trace_row


def update_row(i: int, conversation: str, answer: str) -> dict:
    messages = [{"role": "system", "content": "You are a smart memory manager."},
                {"role": "user", "content": f"Memories: 0. Ann has a cat\nNew fact: fact {i}"}]
    return {**trace_row(i, conversation, "x", answer), "trace_id": f"{conversation}:update:{i}", "operation": "update",
            "messages": messages, "output_schema": json.dumps(update_schema(["0"], "1", 60))}


@pytest.mark.prefect
@pytest.mark.timeout(400)
def test_evaluate_on_captured_calls_reports_agreement_with_intervals(prefect_server, tiny_model_dir, tmp_path):
    # the flow itself, not the CLI under capsys: Prefect's console handler would keep capsys's stream, closed
    # after this test, and every later in-process flow would fail writing its log to it
    from memlora.evaluation.systems import EvalError
    from memlora.flows.evaluation import evaluate
    from memlora.student.build import build_student

    out = tmp_path / "out"
    config_path, config = pruned_config(tmp_path, str(tiny_model_dir))
    config_path.write_text(config_path.read_text() + f"\nmemory: {{operations: {{extraction: "
                                                      f"{{max_new_tokens: {CAP}}}}}}}\n")
    base = build_student(config, out)
    expert = saved_expert(base, tmp_path / "expert", 1)
    backend = ExpertBackend(base, {"extraction": expert}, device="cpu")
    own = [r.text for r in backend.generate([GenerationRequest(
        "extraction", TEMPLATES["extraction"].messages(line), CAP, SCHEMA) for line in LINES])]
    # 12 held-out extraction calls in 4 conversations (the teacher agrees with the expert on 9), 8 that trained,
    # and 6 held-out update calls the teacher answered NONE or DELETE
    rows = [trace_row(i, "c1", LINES[i], own[i]) for i in range(8)]
    rows += [trace_row(i, f"user-{i % 4}-test", LINES[i], own[i] if i < 17 else json.dumps({"facts": ["Zed"]}))
             for i in range(8, 20)]
    update = [update_row(i, f"user-{i % 2}-test", json.dumps({"memory": [{"id": "0", "text": "Ann has a cat",
                                                                          "event": "DELETE" if i < 2 else "NONE"}]}))
              for i in range(6)]
    for op, made in (("extraction", rows), ("update", update)):  # shards under the names capture gives them
        write_parquet(pa.Table.from_pylist(made, schema=TRACES), out / "traces" / op / "part-capture-day1.parquet",
                      "traces")
    shutil.copytree(expert, adapter_dir(out, "extraction"))
    update_manifest(out)

    payload = evaluate(config_path=str(config_path), out=str(out))
    assert payload["captured"] and [h["system"] for h in payload["headline"]] == ["student", "student+experts"]
    results = pq.read_table(results_path(out)).to_pylist()

    def get(system, op, metric):
        return next(r for r in results if (r["system"], r["operation"], r["metric"]) == (system, op, metric))

    experts = get("student+experts", "extraction", "fact_f1")
    assert experts["n"] == 12 and experts["value"] == pytest.approx(9 / 12)  # the expert's own answers: F1 1
    assert experts["ci_method"].startswith("cluster") and experts["ci_low"] < experts["value"] <= experts["ci_high"]
    assert get("student", "extraction", "fact_f1")["value"] < experts["value"]
    assert get("student+experts", "update", "majority_baseline_macro_f1")["n"] == 6
    assert get("student+experts", "update", "reference_delete")["value"] == 2
    assert get("student+experts", "extraction", "parse_ok")["value"] == 1.0
    assert get("student+experts", "model", "peak_rss_mb")["value"] > 0
    report = report_path(out, ".md").read_text()
    assert "captured traffic" in report and "| extraction | fact_f1 |" in report
    assert report_path(out, ".png").stat().st_size > 1000

    # an OUT whose capture held nothing out: a clear error, exit 2
    other = tmp_path / "other"
    shutil.copytree(out, other, symlinks=True)
    shutil.rmtree(other / "eval")
    for f in (other / "traces").rglob("*.parquet"):
        table = pq.read_table(f).to_pylist()
        write_parquet(pa.Table.from_pylist([{**r, "conversation_id": "c9"} for r in table], schema=TRACES), f,
                      "traces")
    update_manifest(other)
    with pytest.raises(EvalError, match="no captured call is in the test share"):
        evaluate(config_path=str(config_path), out=str(other))


@pytest.mark.timeout(30)
def test_cluster_bootstrap_and_kappa():
    est = cluster_bootstrap([1.0, 1.0, 0.0, 0.0], ["a", "a", "b", "b"], lambda xs: sum(xs) / len(xs), 500)
    assert est.value == 0.5 and est.ci_low == 0.0 and est.ci_high == 1.0  # two clusters: all or nothing
    # two conversations of 20 calls: their 3 distinct resamples make too narrow an interval; the per-call one widens it
    items, clusters = [1.0] * 12 + [0.0] * 8 + [1.0] * 8 + [0.0] * 12, ["a"] * 20 + ["b"] * 20
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    narrow = cluster_bootstrap(items, clusters, mean, 500)
    wide = cluster_bootstrap(items, clusters, mean, 500, min_clusters=5)
    assert (narrow.ci_low, narrow.ci_high) == (pytest.approx(0.4), pytest.approx(0.6))
    assert wide.ci_method == "cluster-or-call-bootstrap-95" and wide.ci_low < 0.4 and wide.ci_high > 0.6
    assert cohen_kappa([("NONE", "NONE"), ("DELETE", "DELETE")]) == 1.0
    assert cohen_kappa([("NONE", "NONE"), ("NONE", "DELETE")]) == 0.0  # always NONE: no skill beyond chance
