"""The `improve` flow on the shared Prefect server with a tiny model: new rows -> candidate -> promoted (served
experts snapshotted first, deferral recalibrated), nothing new -> a no-op, a worse candidate -> kept out, a
candidate that fails to train -> the run fails and the served experts stay; then `rollback` brings the earlier
version's answers back, and a tampered version is refused.

The trainer is a stand-in that installs a given adapter (the real DeepSpeed launch is covered in
test_distill_launcher.py); which expert the teacher's held-out answers agree with is set by the test, so the gate
has a right answer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from memlora.data.io import write_parquet
from memlora.data.schemas import TRACES
from memlora.layout import adapter_dir, decisions_path, deferral_path
from memlora.manifest import UntrustedArtifact, update_manifest
from memlora.memory.llm import GenerationRequest
from memlora.memory.prompts import TEMPLATES, extraction_schema
from memlora.student.experts import ExpertBackend
from tests.conftest import REPO
from tests.student_fixtures import pruned_config, saved_expert

LINES = [f"{name}: I {verb}." for name in ("Ann", "Bob", "Eve", "Max") for verb in
         ("have a cat", "live in Porto", "love jazz", "work nights", "swim daily")]
SCHEMA = extraction_schema(3, 40)
CAP = 40  # the extraction cap of the test's config: held-out calls replay with it


def trace_row(i: int, conversation: str, line: str, answer: str) -> dict:
    return {"trace_id": f"{conversation}:extraction:{i}", "operation": "extraction", "conversation_id": conversation,
            "session": 0, "step": i, "messages": TEMPLATES["extraction"].messages(line),
            "output_schema": json.dumps(SCHEMA), "raw_output": answer, "parsed_output": answer, "parse_ok": True,
            "constrained": True, "finish_reason": "stop", "prompt_tokens": 10, "completion_tokens": 5,
            "latency_s": 0.1, "batch_size": 1, "model_id": "teacher", "backend": "capture", "template_hash": "x"}


def standin_trainer(sources: list[Path], calls: list[str]):
    """run_training's stand-in: installs the next adapter of `sources` with a training record like the real one."""
    def run(config, out, operation, base, cache, on_line):
        if not sources:
            raise RuntimeError("rank 0 died: CUDA out of memory (stand-in)")
        folder = adapter_dir(out, operation)
        shutil.copytree(sources.pop(0), folder, dirs_exist_ok=True)
        record = {"operation": operation, "steps": 1, "loss_curve": [1.0], "loss_before": 2.0, "loss_after": 1.0,
                  "rows_used": 20, "rows_total": 20, "world_size": 1, "deepspeed_stage": 2,
                  "cache_key": cache["key"], "traces_sha256": cache["traces_sha256"],
                  "config_fingerprint": cache["config_fingerprint"]}
        (folder / "training.json").write_text(json.dumps(record))
        calls.append(operation)
        on_line(f"stand-in trained {operation}")
        return record
    return run


@pytest.mark.prefect
@pytest.mark.timeout(600)
def test_improve_promotes_the_better_keeps_out_the_worse_and_rolls_back(prefect_server, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    import memlora.student.distill as distill_module
    from memlora.flows.improve import improve
    from memlora.student.build import build_student
    from memlora.student.versions import rollback, verified_version, versions

    out = tmp_path / "out"
    config_path, config = pruned_config(tmp_path, str(tiny_model_dir))
    raw = yaml.safe_load(config_path.read_text())
    raw["deferral"] = {"budget": 0.5}
    raw["improve"] = {"margin": 0.05, "samples": 200}
    raw["memory"]["operations"] = {"extraction": {"max_new_tokens": CAP}}  # short answers: a quicker test
    config_path.write_text(yaml.safe_dump(raw))
    base = build_student(config, out)
    good, bad = saved_expert(base, tmp_path / "good", 1), saved_expert(base, tmp_path / "bad", 2)

    def answers(folder: Path) -> list[str]:
        backend = ExpertBackend(base, {"extraction": folder}, device="cpu")
        return [r.text for r in backend.generate([GenerationRequest(
            "extraction", TEMPLATES["extraction"].messages(line), CAP, SCHEMA) for line in LINES])]

    right, wrong = answers(good), answers(bad)
    assert right != wrong
    # the teacher's answers are the good expert's: train rows, validation rows, and test calls from another block
    rows = [trace_row(i, "c1", line, right[i]) for i, line in enumerate(LINES[:8])]
    rows += [trace_row(i, "cap-validation", line, right[i]) for i, line in enumerate(LINES[:10]) if i >= 8]
    rows += [trace_row(i, f"user-{i % 3}-test", line, right[i]) for i, line in enumerate(LINES) if i >= 10]
    write_parquet(pa.Table.from_pylist(rows, schema=TRACES), out / "traces" / "extraction" / "part-day1.parquet",
                  "traces")
    # served today: the bad expert, trained on traces that were different then
    shutil.copytree(bad, adapter_dir(out, "extraction"))
    (adapter_dir(out, "extraction") / "training.json").write_text(json.dumps(
        {"operation": "extraction", "traces_sha256": "older traces", "rows_total": 4}))
    update_manifest(out)

    calls: list[str] = []
    monkeypatch.setattr(distill_module, "run_training", standin_trainer([good], calls))
    result = improve(config_path=str(config_path), out=str(out))
    assert result["new_rows"] == {"extraction": 16} and calls == ["extraction"]
    assert result["promoted"] == ["extraction"], result["decisions"]
    decision = result["decisions"][0]
    assert decision["candidate"] == 1.0 and decision["current"] < decision["candidate"] and decision["n"] == 10
    assert answers(adapter_dir(out, "extraction")) == right  # the candidate is what serves now
    before = result["version_before"]
    assert versions(out) == [before] and deferral_path(out).is_file()

    assert improve(config_path=str(config_path), out=str(out)) == {"new_rows": {"extraction": 0}, "promoted": []}

    # a new day's rows, and a candidate that is worse: kept out, the served expert unchanged
    write_parquet(pa.Table.from_pylist([trace_row(99, "c2", LINES[0], right[0])], schema=TRACES),
                  out / "traces" / "extraction" / "part-day2.parquet", "traces")
    monkeypatch.setattr(distill_module, "run_training", standin_trainer([bad], calls))
    worse = improve(config_path=str(config_path), out=str(out))
    assert worse["promoted"] == [] and "worse than the current expert" in worse["decisions"][0]["reason"]
    assert answers(adapter_dir(out, "extraction")) == right and versions(out) == [before]
    table = pq.read_table(decisions_path(out)).to_pylist()
    assert [r["promote"] for r in table] == [True, False] and table[0]["version"] == before

    # a candidate that fails to train: the run fails with the reason, the served expert stays
    monkeypatch.setattr(distill_module, "run_training", standin_trainer([], calls))
    state = improve(config_path=str(config_path), out=str(out), return_state=True)
    assert state.is_failed() and answers(adapter_dir(out, "extraction")) == right

    # rollback: the earlier version's answers are back; the version served until then is kept too
    assert rollback(out, before) == ["extraction"]
    assert answers(adapter_dir(out, "extraction")) == wrong and len(versions(out)) == 2
    (tmp_path / "tamper").write_text("")
    weights = Path(verified_version(out, before)["extraction"]) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UntrustedArtifact, match="adapter_model.safetensors: differs"):
        rollback(out, before)
    with pytest.raises(UntrustedArtifact, match="no such version"):
        rollback(out, "v9999")


@pytest.mark.timeout(30)
def test_the_nightly_improve_deployment_is_scheduled():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    improve = [d for d in deployments if d["entrypoint"] == "flows/improve.py:improve"]
    assert len(improve) == 1 and improve[0]["schedules"][0]["cron"] == "0 3 * * *"
