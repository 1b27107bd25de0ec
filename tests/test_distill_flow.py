"""The `distill` Prefect flow on the shared test server: one training task for every operation, the launcher's
log in the task log, the manifest's distill section, finished experts kept on a rerun; then `memlora export`.

The launcher itself is replaced here by a stand-in that writes a real (untrained) DeLoRA adapter: the real
launch is covered in test_distill_launcher.py, and three more launches would cost a minute of CPU."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pyarrow as pa
import pytest

from memlora.config import OPERATIONS
from memlora.manifest import read_manifest
from memlora.data.io import write_parquet
from memlora.data.schemas import TRACES
from tests.student_fixtures import distill_config, perturb, trace_rows, write_traces


def fake_run_trainings(calls: list):
    """Stands in for `run_trainings` (one launch for every expert): a real, untrained DeLoRA adapter per job."""
    def run(config, out, base, jobs, on_line=print, on_record=lambda record: None):
        from memlora.layout import adapter_dir, trace_files
        from memlora.llm.hf_backend import load_causal_lm
        from memlora.student.experts import attach_expert

        records = {}
        for job in jobs:
            calls.append(job.operation)
            on_line(f"[launch.py] fake rank 0 for {job.operation}")
            model, _, _ = load_causal_lm(str(base), dtype="float32", device="cpu")
            peft_model = attach_expert(model, config.student.expert)
            perturb(peft_model, seed=len(calls))
            folder = adapter_dir(out, job.operation)
            peft_model.save_pretrained(str(folder), safe_serialization=True)
            record = {"operation": job.operation, "steps": 1, "loss_curve": [1.0], "loss_before": 2.0,
                      "loss_after": 1.0, "rows_used": 5, "rows_skipped": {"parse_failed": 1}, "world_size": 1,
                      "deepspeed_stage": 2, "cache_key": job.cache["key"], "traces_sha256": job.cache["traces_sha256"],
                      "config_fingerprint": job.cache["config_fingerprint"],
                      "trace_files": [f.name for f in trace_files(out, job.operation)]}
            (folder / "training.json").write_text(json.dumps(record))
            records[job.operation] = record
            on_record(record)
        return records

    return run


async def flow_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


@pytest.mark.prefect
@pytest.mark.timeout(240)
def test_distill_flow_trains_each_operation_once_and_records_it(prefect_server, tiny_model_dir, tmp_path,
                                                                monkeypatch):
    from transformers import AutoTokenizer

    import memlora.student.distill as distill_module
    from memlora.cli import main
    from memlora.flows.distill import distill

    out = tmp_path / "out"
    write_traces(out, AutoTokenizer.from_pretrained(tiny_model_dir))
    config, _ = distill_config(tmp_path / "c.yaml", str(tiny_model_dir),
                               student={"prune": {"from": "teacher", "keep_layers": [0, 2]}})
    calls: list[str] = []
    monkeypatch.setattr(distill_module, "run_trainings", fake_run_trainings(calls))

    state = distill(config_path=str(config), out=str(out), return_state=True)
    records = state.result()
    assert calls == list(OPERATIONS)  # one after another, in order
    assert set(records) == set(OPERATIONS) and not any(r.get("skipped") for r in records.values())
    assert (out / "student" / "base" / "model.safetensors").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    section = manifest["distill"]
    assert section["student_base"] == str(out / "student" / "base")
    assert {op: e["cache_key"] for op, e in section["experts"].items()} == {
        op: r["cache_key"] for op, r in records.items()}
    paths = {f["path"] for f in manifest["files"]}
    assert {f"adapters/{op}/adapter_model.safetensors" for op in OPERATIONS} <= paths

    expected = {f"[launch.py] fake rank 0 for {op}" for op in OPERATIONS}  # the subprocess lines reach the task log
    deadline = time.monotonic() + 60
    while not expected <= set(messages := asyncio.run(flow_logs(state.state_details.flow_run_id))):
        assert time.monotonic() < deadline, f"missing from the flow's logs: {expected - set(messages)}"
        time.sleep(1)  # Prefect ships logs in batches, in the background

    again = distill(config_path=str(config), out=str(out))
    assert calls == list(OPERATIONS) and all(r["skipped"] for r in again.values())

    # Served and calibrated, then retrained on changed traces (the nightly pipeline after a day of deferred calls):
    # the experts served until then stay as a version with their thresholds, and the new ones get thresholds
    from memlora.evaluation.deferral import stale_thresholds
    from memlora.layout import deferral_path
    from memlora.student.experts import expert_digests, expert_folders
    from memlora.student.versions import verified_version, versions

    served = expert_digests(expert_folders(out))
    thresholds = {"operations": {op: {"keep": {"value": 0.5}} for op in OPERATIONS}, "experts": served}
    deferral_path(out).write_text(json.dumps(thresholds))
    write_traces(out, AutoTokenizer.from_pretrained(tiny_model_dir), operations=["generation"], seed=1)
    retrained = distill(config_path=str(config), out=str(out))
    assert calls == [*OPERATIONS, "generation"] and not retrained["generation"]["skipped"]
    [kept] = versions(out)
    assert expert_digests(verified_version(out, kept)) == served
    assert json.loads((out / "versions" / kept / "deferral.json").read_text()) == thresholds
    assert expert_digests(expert_folders(out))["generation"] != served["generation"]
    # these traces hold no validation calls to refit on: generation's thresholds are left as they were, and a
    # server sends every generation call to the teacher (test_hot_reload); the others still hold
    assert stale_thresholds(out) == ["generation"] and json.loads(deferral_path(out).read_text()) == thresholds

    # the calls serve-experts deferred to the teacher (or capture recorded) are improve's to learn from, through its
    # gate: the pipeline's distill keeps the served expert; a conversation the pipeline traced is its own to train on
    served_calls = [{**row, "trace_id": f"d:{i}", "conversation_id": "user-1", "backend": "deferred"}
                    for i, row in enumerate(trace_rows(AutoTokenizer.from_pretrained(tiny_model_dir), "update"))]
    write_parquet(pa.Table.from_pylist(served_calls, schema=TRACES),
                  out / "traces" / "update" / "part-capture-000001.parquet", "traces")
    kept_served = distill(config_path=str(config), out=str(out))
    assert calls == [*OPERATIONS, "generation"] and kept_served["update"]["skipped"]
    write_parquet(pa.Table.from_pylist([{**served_calls[0], "trace_id": "c2:0", "conversation_id": "c2",
                                         "backend": "transformers"}], schema=TRACES),
                  out / "traces" / "update" / "part-c2.parquet", "traces")
    distill(config_path=str(config), out=str(out))
    assert calls == [*OPERATIONS, "generation", "update"]

    # Export to plain LoRA from the command line.
    assert main(["export", "--out", str(out), "--format", "lora"]) == 0
    for op in OPERATIONS:
        folder: Path = out / "export" / "lora" / op
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert (folder / "adapter_model.safetensors").is_file()
    # ... and the export is in OUT's manifest, so `memlora verify OUT` vouches for it too
    from memlora.release import verify_release

    listed = {f["path"] for f in read_manifest(out)["files"]}
    assert {f"export/lora/{op}/adapter_model.safetensors" for op in OPERATIONS} <= listed
    assert verify_release(out) == []


@pytest.mark.timeout(60)
def test_distill_without_traces_says_what_to_run(tiny_model_dir, tmp_path):
    from memlora.student.distill import distill_operation
    from memlora.student.launch import TrainingFailed

    _, config = distill_config(tmp_path / "c.yaml", str(tiny_model_dir),
                               student={"prune": {"from": "teacher", "keep_layers": [0, 2]}})
    with pytest.raises(TrainingFailed, match="memlora traces"):
        distill_operation(config, tmp_path / "out", "update", tmp_path / "base")
