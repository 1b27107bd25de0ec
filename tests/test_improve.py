"""The `improve` flow on the shared Prefect server with a tiny model: new rows -> candidate -> promoted (served
experts snapshotted first, deferral recalibrated), nothing new -> a no-op, a worse candidate -> kept out (and the
served expert recalibrated on the new call it was not trained on), a
candidate that fails to train -> the run fails and the served experts stay; then `rollback` brings the earlier
version's answers back, and a tampered version is refused.

The trainer is a stand-in that installs a given adapter (the real DeepSpeed launch is covered in
test_distill_launcher.py); which expert the teacher's held-out answers agree with is set by the test, so the gate
has a right answer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from memlora.data.io import write_parquet
from memlora.data.schemas import TRACES
from memlora.evaluation.deferral import stale_thresholds
from memlora.layout import adapter_dir, decisions_path, deferral_path, trace_files
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


def standin_trainer(sources: list[Path], calls: list[str], starts: list | None = None):
    """run_trainings' stand-in: installs the next adapter of `sources` per job with a training record like the real
    one (and notes in `starts` the adapter each job was told to start from)."""
    def run(config, out, base, jobs, on_line=print, on_record=lambda record: None):
        records = {}
        for job in jobs:
            operation, cache = job.operation, job.cache
            if starts is not None:
                starts.append(job.init)
            if not sources:
                raise RuntimeError("rank 0 died: CUDA out of memory (stand-in)")
            folder = adapter_dir(out, operation)
            shutil.copytree(sources.pop(0), folder, dirs_exist_ok=True)
            record = {"operation": operation, "steps": 1, "loss_curve": [1.0], "loss_before": 2.0, "loss_after": 1.0,
                      "rows_used": 20, "rows_total": 20, "world_size": 1, "deepspeed_stage": 2,
                      "cache_key": cache["key"], "traces_sha256": cache["traces_sha256"],
                      "config_fingerprint": cache["config_fingerprint"],
                      "trace_files": [f.name for f in trace_files(out, operation)]}
            (folder / "training.json").write_text(json.dumps(record))
            calls.append(operation)
            on_line(f"stand-in trained {operation}")
            records[operation] = record
            on_record(record)
        return records
    return run


@pytest.mark.prefect
@pytest.mark.timeout(600)
def test_improve_promotes_the_better_keeps_out_the_worse_and_rolls_back(prefect_server, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    import memlora.student.distill as distill_module
    from memlora.flows.improve import improve
    from memlora.student.build import build_student
    from memlora.student.versions import rollback, snapshot, verified_version, versions

    out = tmp_path / "out"
    config_path, config = pruned_config(tmp_path, str(tiny_model_dir))
    raw = yaml.safe_load(config_path.read_text())
    raw["deferral"] = {"budget": 0.5}
    raw["improve"] = {"margin": 0.05, "samples": 200, "keep_versions": 1}
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
    earlier = snapshot(out, "an earlier night")  # what keep_versions 1 removes at the next promotion

    calls: list[str] = []
    monkeypatch.setattr(distill_module, "run_trainings", standin_trainer([good], calls))
    result = improve(config_path=str(config_path), out=str(out))
    assert result["new_rows"] == {"extraction": 16} and calls == ["extraction"]
    assert result["promoted"] == ["extraction"], result["decisions"]
    decision = result["decisions"][0]
    assert decision["candidate"] == 1.0 and decision["current"] < decision["candidate"] and decision["n"] == 10
    assert answers(adapter_dir(out, "extraction")) == right  # the candidate is what serves now
    before = result["version_before"]
    assert versions(out) == [before] != [earlier] and deferral_path(out).is_file()
    calibrated_on = json.loads(deferral_path(out).read_text())["operations"]["extraction"]["keep"]["n"]
    assert calibrated_on == 2  # the validation calls: the new expert was trained on every other call

    assert improve(config_path=str(config_path), out=str(out)) == {"new_rows": {"extraction": 0}, "promoted": [],
                                                                    "recalibrated": []}

    # a new day's rows, and a candidate (warm-started from the served expert) that is worse: kept out, the served
    # expert unchanged
    # (recorded as capture records a call: a shard of its own, which improve merges first with compact_at 1)
    write_parquet(pa.Table.from_pylist([trace_row(99, "c2", LINES[0], right[0])], schema=TRACES),
                  out / "traces" / "extraction" / "part-capture-day2-000000.parquet", "traces")
    raw["capture"] = {"compact_at": 1}
    raw["improve"]["warm_start"] = True
    raw["student"]["expert"]["r"] = 4  # the served expert's shape (an expert of another shape is not resumed)
    config_path.write_text(yaml.safe_dump(raw))
    starts: list = []
    monkeypatch.setattr(distill_module, "run_trainings", standin_trainer([bad], calls, starts))
    worse = improve(config_path=str(config_path), out=str(out))
    assert starts == [str(adapter_dir(out, "extraction"))]
    assert [f.name[:21] for f in trace_files(out, "extraction")] == ["part-capture-compact-", "part-day1.parquet"]
    shard = out / "traces" / "extraction" / "part-capture-day2-000000.parquet"
    assert shard.is_file()  # merged, unread, left for the next night: a reader may have listed it just before
    assert worse["promoted"] == [] and "worse than the current expert" in worse["decisions"][0]["reason"]
    assert answers(adapter_dir(out, "extraction")) == right and versions(out) == [before]
    # nothing promoted, but the served expert has not been trained on the new day's call: recalibrated with it
    assert json.loads(deferral_path(out).read_text())["operations"]["extraction"]["keep"]["n"] == calibrated_on + 1
    table = pq.read_table(decisions_path(out)).to_pylist()
    assert [r["promote"] for r in table] == [True, False] and table[0]["version"] == before

    # a candidate that fails to train: the run fails with the reason, the served expert stays
    monkeypatch.setattr(distill_module, "run_trainings", standin_trainer([], calls))
    state = improve(config_path=str(config_path), out=str(out), return_state=True)
    assert state.is_failed() and answers(adapter_dir(out, "extraction")) == right
    assert not shard.is_file()  # that night's compaction removed it

    # rollback: the earlier version's answers are back; the version served until then is kept too, with the
    # thresholds fitted on it. The earlier one was snapshotted before any calibration: the thresholds left serving
    # were fitted on the other expert, so a server defers every extraction call until they are refitted
    fitted = deferral_path(out).read_text()
    assert rollback(out, before) == ["extraction"]
    assert answers(adapter_dir(out, "extraction")) == wrong and len(versions(out)) == 2
    assert stale_thresholds(out) == ["extraction"]
    undo = next(v for v in versions(out) if v != before)
    assert (out / "versions" / undo / "deferral.json").read_text() == fitted
    (tmp_path / "tamper").write_text("")
    weights = Path(verified_version(out, before)["extraction"]) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UntrustedArtifact, match="adapter_model.safetensors: differs"):
        rollback(out, before)
    with pytest.raises(UntrustedArtifact, match="no such version"):
        rollback(out, "v9999")
    # undoing the rollback brings the promoted expert back with its own thresholds
    assert rollback(out, undo) == ["extraction"]
    assert answers(adapter_dir(out, "extraction")) == right and deferral_path(out).read_text() == fitted
    assert stale_thresholds(out) == []


@pytest.mark.timeout(30)
def test_the_nightly_improve_deployment_is_scheduled():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    improve = [d for d in deployments if d["entrypoint"] == "flows/improve.py:improve"]
    assert len(improve) == 1 and improve[0]["schedules"][0]["cron"] == "0 3 * * *"


FULL_DISK_PROMOTION = r"""
set -e
mount -t tmpfs -o size=2m tmpfs "$MNT" || exit 77
exec "$BIN/python" - <<'PY'
import errno, json, os, shutil, sys
from pathlib import Path
from memlora.manifest import update_manifest
from memlora.student.experts import verified_expert_folders
from memlora.student.versions import KEPT_FILES, install, snapshot, versions

out = Path(os.environ["MNT"]) / "out"
shutil.copytree(os.environ["V1"], out / "adapters" / "extraction")
update_manifest(out)
served = {p.name: p.read_bytes() for p in (out / "adapters" / "extraction").iterdir()}
manifest = (out / "manifest.json").read_bytes()
filler = Path(os.environ["MNT"]) / "filler"
with open(filler, "wb", buffering=0) as f:  # the disk full to the last page
    try:
        while True:
            f.write(b"\0" * 4096)
    except OSError:
        pass
size = filler.stat().st_size
new = [p for p in Path(os.environ["V2"]).iterdir() if p.name in KEPT_FILES]
pages = sum(-(-p.stat().st_size // 4096) for p in new)
results = {}
for case, free in (("no room to stage", 0), ("room to stage, not for the manifest", pages)):
    os.truncate(filler, size - free * 4096)
    try:
        install(out, {"extraction": Path(os.environ["V2"])})
        results[case] = "installed"
    except OSError as err:
        results[case] = errno.errorcode.get(err.errno, str(err))
    same = {p.name: p.read_bytes() for p in (out / "adapters" / "extraction").iterdir()} == served
    results[case] += f" same={same and (out / 'manifest.json').read_bytes() == manifest}"
    verified_expert_folders(out)  # the served set still matches its manifest (raises otherwise)
os.truncate(filler, size)
try:
    snapshot(out, "on a full disk")
    results["snapshot"] = "written"
except OSError as err:
    results["snapshot"] = errno.errorcode.get(err.errno, str(err))
results["versions"] = versions(out)
results["hidden"] = sorted(str(p.relative_to(out)) for p in out.rglob(".*"))
print(json.dumps(results))
PY
"""


@pytest.mark.timeout(120)
def test_a_disk_that_fills_during_a_promotion_changes_nothing_served(tiny_model_dir, tmp_path):
    """A real full filesystem (a 2 MB tmpfs in a private mount namespace): installing the promoted experts fails
    while staging, or after staging when the manifest cannot be written; either way the served files and the
    manifest are what they were, and a snapshot that cannot be written leaves no half version."""
    import os
    import subprocess
    import sys

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs `unshare -m` as root to mount a private tmpfs")
    v1 = saved_expert(tiny_model_dir, tmp_path / "v1", seed=1)
    v2 = saved_expert(tiny_model_dir, tmp_path / "v2", seed=2)
    (tmp_path / "mnt").mkdir()
    env = dict(os.environ, MNT=str(tmp_path / "mnt"), V1=str(v1), V2=str(v2), BIN=str(Path(sys.executable).parent),
               PYTHONPATH=str(REPO))
    result = subprocess.run(["unshare", "-m", "bash", "-c", FULL_DISK_PROMOTION], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=100)
    if result.returncode == 77:
        pytest.skip("tmpfs cannot be mounted here")
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["no room to stage"] == "ENOSPC same=True", seen
    assert seen["room to stage, not for the manifest"] == "ENOSPC same=True", seen
    assert (seen["snapshot"], seen["versions"], seen["hidden"]) == ("ENOSPC", [], []), seen


def test_with_few_held_out_conversations_the_gate_interval_is_not_narrower_than_per_call():
    from memlora.evaluation.gate import paired_difference

    # Two conversations in which the candidate wins on the same 4 of 20 calls: resampling the two conversations
    # can only draw +0.20, a zero-width interval; resampling calls sees that 8 wins in 40 calls are noisy.
    current = [False] * 40
    candidate = ([True] * 4 + [False] * 16) * 2
    two = ["a"] * 20 + ["b"] * 20
    point, low, high = paired_difference(current, candidate, two, 2000)
    assert (round(point, 3), round(low, 3), round(high, 3)) == (0.2, 0.2, 0.2)
    guarded = paired_difference(current, candidate, two, 2000, min_clusters=5)
    _, call_low, call_high = paired_difference(current, candidate, [str(i) for i in range(40)], 2000)
    assert guarded == (point, call_low, call_high) and call_low < 0.12 and call_high > 0.28
    five = [c for c in "abcde" for _ in range(8)]  # from min_clusters conversations on: the clustered one alone
    assert paired_difference(current, candidate, five, 2000, min_clusters=5) == \
        paired_difference(current, candidate, five, 2000)


@pytest.mark.timeout(60)
def test_earlier_candidate_folders_are_removed_beyond_keep_candidates_and_what_they_link_to_stays(tmp_path):
    from memlora.config import load_config
    from memlora.layout import candidates_root
    from memlora.student.improve import prepare_candidate

    out = tmp_path / "out"
    (out / "student" / "base").mkdir(parents=True)
    (out / "student" / "base" / "model.safetensors").write_bytes(b"base")
    for night in range(1, 6):  # five earlier nights, each with its trained candidate and its links into OUT
        folder = candidates_root(out) / f"2026120{night}T030000"
        (folder / "adapters" / "extraction").mkdir(parents=True)
        (folder / "adapters" / "extraction" / "adapter_model.safetensors").write_bytes(b"weights")
        os.symlink((out / "student").resolve(), folder / "student")
    config = load_config(REPO / "configs" / "default.yaml")
    config = config.model_copy(update={"improve": config.improve.model_copy(update={"keep_candidates": 3})})
    candidate = prepare_candidate(config, out, {"extraction": 1})
    left = sorted(p.name for p in candidates_root(out).iterdir())
    assert left == ["20261204T030000", "20261205T030000", candidate.run]  # tonight's and the two before it
    assert (candidate.out / "student").is_symlink()
    assert (out / "student" / "base" / "model.safetensors").read_bytes() == b"base"  # links removed, not followed


@pytest.mark.timeout(60)
def test_train_on_new_trains_a_warm_candidate_on_the_calls_its_start_had_not_learnt(tmp_path):
    """improve.train_on: new: the rows of shards the starting expert's record lists are left out of training;
    validation keeps every row; with no record, no start, train_on all, or no new training row: every row."""
    from pydantic import ValidationError

    from memlora.config import ImproveConfig, load_config
    from memlora.student.trainer import rows_to_train

    folder = tmp_path / "traces"
    day1 = [trace_row(i, "c1", LINES[i], "a") for i in range(4)] + [trace_row(4, "v1", LINES[4], "a")]
    day2 = [trace_row(i, "c2", LINES[i], "b") for i in range(5, 8)] + [trace_row(8, "v1", LINES[8], "b")]
    files = [write_parquet(pa.Table.from_pylist(rows, schema=TRACES), folder / name, "traces")
             for name, rows in (("part-day1.parquet", day1), ("part-day2.parquet", day2))]
    splits = {"c1": "train", "c2": "train", "v1": "validation"}
    served = tmp_path / "served"
    served.mkdir()
    (served / "training.json").write_text(json.dumps({"operation": "extraction", "trace_files": ["part-day1.parquet"]}))
    base = load_config(REPO / "configs" / "default.yaml")

    def config(**improve):
        return base.model_copy(update={"improve": ImproveConfig(**improve)})

    train, validation, left_out = rows_to_train(config(warm_start=True, train_on="new"), files, splits, served)
    assert train.column("conversation_id").to_pylist() == ["c2"] * 3 and left_out == 1
    assert validation.num_rows == 2  # both days' validation calls: the early stop compares like with like
    for setting, start in ((config(warm_start=True), served), (config(warm_start=True, train_on="new"), None),
                           (config(warm_start=True, train_on="new"), tmp_path)):  # all rows; no start; no record
        train, validation, left_out = rows_to_train(setting, files, splits, start)
        assert (train.num_rows, validation.num_rows, left_out) == (7, 2, 0)
    # the start had learnt every training call there is: nothing new to train on alone, so every row trains
    (served / "training.json").write_text(json.dumps({"operation": "extraction",
                                                      "trace_files": ["part-day1.parquet", "part-day2.parquet"]}))
    assert rows_to_train(config(warm_start=True, train_on="new"), files, splits, served)[0].num_rows == 7
    with pytest.raises(ValidationError, match="set improve.warm_start: true too"):
        ImproveConfig(train_on="new")


@pytest.mark.timeout(60)
def test_versions_beyond_keep_versions_are_removed_oldest_first_and_numbering_goes_on(tmp_path):
    from memlora.student.versions import prune_versions, snapshot, verified_version, versions

    out = tmp_path / "out"
    folder = out / "adapters" / "extraction"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    made = []
    for night in range(5):  # five promotions, each snapshotting the set it replaced
        (folder / "adapter_model.safetensors").write_bytes(f"weights {night}".encode())
        made.append(snapshot(out, f"night {night}"))
    assert prune_versions(out, 3) == made[:2] and versions(out) == made[2:]
    assert not (out / "versions" / made[0]).exists()
    again = snapshot(out, "after the pruning")
    assert again.startswith("v0006-") and versions(out) == [*made[2:], again]  # never a number used before
    kept = verified_version(out, made[2])["extraction"]  # what is left still rolls back, checked
    assert (kept / "adapter_model.safetensors").read_bytes() == b"weights 2"
    # ordered by number, not by text: v10000 comes after v9999
    for name in ("v9999-20261201T000000", "v10000-20261202T000000"):
        (out / "versions" / name).mkdir()
        (out / "versions" / name / "version.json").write_text("{}")
    assert versions(out)[-2:] == ["v9999-20261201T000000", "v10000-20261202T000000"]
    assert prune_versions(out, 1) == [*made[2:], again, "v9999-20261201T000000"]
