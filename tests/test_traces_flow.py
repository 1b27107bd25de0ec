"""The generate-traces flow on a real Prefect server: the real bundled teacher on one conversation, and
resume after a SIGKILL on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
import yaml

from memlora.config import OPERATIONS
from memlora.processes import stop_group
from tests.conftest import REPO, TEACHER_REF

VOLATILE = {"latency_s", "batch_size"}  # wall time, and how calls happened to share batches


def write_config(path: Path, teacher: str, **data) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    raw["teacher"].update(model=teacher, device="cpu", batch_size=8, logprobs_top_k=4)
    raw["data"].update(data)
    raw["data"]["split"] = {"test_ratio": 0.25, "validation_ratio": 0.0, "seed": 0}  # 3 train, 1 test
    # min_similarity 0: every fact gets an update call (Mem0's way), so one short session still traces all
    # three operations; the embedded default's floor adds its first facts without one.
    raw["memory"].update(window=4, max_facts=2, max_fact_chars=40, answer_max_chars=24, min_similarity=0.0)
    raw["memory"]["operations"] = {"extraction": {"max_new_tokens": 64}, "update": {"max_new_tokens": 64},
                                   "generation": {"max_new_tokens": 16}}
    raw["prefect"] = {"concurrency": 1}
    path.write_text(yaml.safe_dump(raw))
    return path


def rows(out: Path) -> dict[str, list[dict]]:
    result = {}
    for op in OPERATIONS:
        table = pq.read_table(out / "traces" / op)
        result[op] = sorted(
            ({k: v for k, v in r.items() if k not in VOLATILE} for r in table.to_pylist()),
            key=lambda r: r["trace_id"],
        )
    return result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flow_with_real_bundled_teacher(prefect_server, sample_path, tmp_path):
    from memlora.flows.traces import generate_traces

    config = write_config(tmp_path / "c.yaml", TEACHER_REF, max_conversations=1, max_sessions=1, max_questions=2)
    out = tmp_path / "out"
    summary = generate_traces(config_path=str(config), data=str(sample_path), out=str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    traced = manifest["traces"]["conversations"]
    assert len(traced) == 1
    for op in OPERATIONS:
        table = pq.read_table(out / "traces" / op / f"part-{traced[0]}.parquet")
        assert table.schema.metadata[b"memlora.schema_version"] == b"1"
        assert table.num_rows == summary[op]["rows"] > 0
        for row in table.to_pylist():
            assert row["constrained"] and row["model_id"].endswith(".gguf")
            assert row["messages"][-1]["role"] == "user"
            if row["parse_ok"]:  # constrained outputs that finished are valid under their own schema
                jsonschema.validate(json.loads(row["raw_output"]), json.loads(row["output_schema"]))
            else:
                assert row["finish_reason"] == "length" and row["parse_error"]
    files = {f["path"]: f for f in manifest["files"]}
    assert files["datasets/conversations.parquet"]["rows"] > 0
    assert all(len(f["sha256"]) == 64 for f in files.values())

    # The same data again traces nothing; a corrected turn traces its conversation again (it kept training on the
    # old text before shards named what they were traced from).
    written = {p: p.stat().st_mtime_ns for p in (out / "traces").rglob("part-*.parquet")}
    key = pq.read_schema(out / "traces" / "extraction" / f"part-{traced[0]}.parquet").metadata[b"memlora.trace_key"]
    generate_traces(config_path=str(config), data=str(sample_path), out=str(out))
    assert {p: p.stat().st_mtime_ns for p in written} == written
    samples = json.loads(sample_path.read_text())
    turn = next(s for s in samples if s["sample_id"] == traced[0])["conversation"]["session_1"][0]
    turn["text"] = "I moved to Lisbon last week and started a job as a pastry chef."
    (tmp_path / "corrected.json").write_text(json.dumps(samples))
    generate_traces(config_path=str(config), data=str(tmp_path / "corrected.json"), out=str(out))
    shard = out / "traces" / "extraction" / f"part-{traced[0]}.parquet"
    assert pq.read_schema(shard).metadata[b"memlora.trace_key"] != key
    assert "pastry chef" in pq.read_table(shard).to_pylist()[0]["messages"][-1]["content"]


def test_a_shard_is_current_while_what_shaped_its_calls_is_unchanged(sample_path, tmp_path):
    """What moves a conversation's calls (its turns, the teacher, the memory system) makes it stale; how calls
    were batched, where they ran, and the split do not; a shard from before keys existed counts as current."""
    import dataclasses

    from memlora.config import load_config
    from memlora.data.loaders import load_corpus
    from memlora.teacher.traces import is_traced, trace_key, write_shards

    config = load_config(REPO / "configs" / "default.yaml")
    conversation = load_corpus(sample_path)[0]
    out, cid, key = tmp_path / "out", conversation.conversation_id, trace_key(conversation, config)
    assert not is_traced(out, cid, key)
    write_shards(out, cid, {op: [] for op in OPERATIONS}, key)
    assert is_traced(out, cid, key)
    conversation.split = "validation"
    same = [config.model_copy(update={"teacher": config.teacher.model_copy(update={"batch_size": 3,
                                                                                   "device": "cuda"})})]
    assert all(trace_key(conversation, c) == key for c in same)
    conversation.turns[0] = dataclasses.replace(conversation.turns[0], text=conversation.turns[0].text + " (fixed)")
    assert not is_traced(out, cid, trace_key(conversation, config))
    other = config.model_copy(update={"memory": config.memory.model_copy(update={"top_k": 2})})
    assert trace_key(load_corpus(sample_path)[0], other) != key
    write_shards(out, cid, {op: [] for op in OPERATIONS})  # no key: an older version's shard
    assert is_traced(out, cid, trace_key(conversation, other))
    (out / "traces" / "update" / f"part-{cid}.parquet").write_bytes(b"not parquet")  # unreadable: traced again
    assert not is_traced(out, cid, trace_key(conversation, other))


def shards(out: Path) -> int:
    return len(list((out / "traces" / "generation").glob("part-*.parquet")))


def run_until(cmd: list[str], env: dict, out: Path, ready) -> None:
    """Start the traces command and SIGKILL its whole process group as soon as `ready(out)` holds."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ready(out):
            assert proc.poll() is None, "the run finished before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
    finally:
        stop_group(proc)


@pytest.mark.timeout(900)
def test_resume_after_sigkill_at_three_points_gives_the_same_rows(prefect_server, tiny_model_dir, sample_path,
                                                                  tmp_path):
    config = write_config(tmp_path / "c.yaml", str(tiny_model_dir), max_conversations=3, max_sessions=2,
                          max_questions=2)
    cmd = [sys.executable, "-m", "memlora.cli", "traces", "--config", str(config), "--data", str(sample_path)]
    env = dict(os.environ)

    reference = tmp_path / "reference"
    subprocess.run(cmd + ["--out", str(reference)], env=env, check=True, timeout=600, capture_output=True)
    expected = rows(reference)
    assert all(expected[op] for op in ("extraction", "generation")) and shards(reference) == 3

    # One output folder, killed three times, each run resuming the last: right after ingest (no trace yet),
    # with one conversation done and the next in flight, with two done.
    out = tmp_path / "interrupted"
    points = [lambda o: (o / "datasets" / "questions.parquet").is_file(), lambda o: shards(o) >= 1,
              lambda o: shards(o) >= 2]
    for k, ready in enumerate(points):
        run_until(cmd + ["--out", str(out)], env, out, ready)
        assert shards(out) == k  # a shard is only written when its conversation is complete
        for leftover in (out / "traces").rglob("*") if (out / "traces").exists() else []:
            # a killed write leaves only a hidden temp name behind, which no reader lists
            assert leftover.is_dir() or leftover.name.startswith("part-") or leftover.name.startswith(".")

    subprocess.run(cmd + ["--out", str(out)], env=env, check=True, timeout=600, capture_output=True)
    assert rows(out) == expected  # no duplicate, no missing row
