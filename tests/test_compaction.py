"""Captured single-call shards merged (`memlora compact`, and `improve` first): nothing downstream can tell, a
compaction cut short counts nothing twice, and a bad merged file is named."""

from __future__ import annotations

import json
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memlora.config import CaptureRule, load_config
from memlora.data.compaction import COMPACTED_PREFIX, compact, rows_not_from, shard_names
from memlora.data.io import DataError, write_parquet
from memlora.data.schemas import TRACES
from memlora.layout import trace_files, traces_dir
from memlora.student.distill import cache_key
from memlora.student.examples import load_traces, traces_fingerprint
from memlora.student.improve import new_rows
from memlora.teacher.capture import CaptureRecorder
from tests.conftest import BIN, REPO

RULE = CaptureRule(operation="extraction", model="client")


def record_calls(out, first: int, n: int) -> None:
    """n calls as `capture` records them (one shard each), from three users, a quarter held out for validation."""
    recorder = CaptureRecorder(out, validation_ratio=0.25)
    for i in range(first, first + n):
        answer = json.dumps({"facts": [f"Ann has {i} cats"]})
        response = {"model": "teacher", "choices": [{"message": {"content": answer}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 6}}
        recorder.write(recorder.row(RULE, [{"role": "user", "content": f"Ann: I have {i} cats."}], None, response,
                                    0.1, f"user-{i % 3}", 0))


def traced_shard(out) -> None:
    """One of our own traced conversations beside them: never merged."""
    rows = [{"trace_id": f"sample-1:extraction:{i}", "operation": "extraction", "conversation_id": "sample-1",
             "session": 1, "step": i, "messages": [{"role": "user", "content": f"turn {i}"}], "output_schema": None,
             "raw_output": "{}", "parsed_output": "{}", "parse_ok": True, "constrained": False,
             "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 1, "latency_s": 0.1,
             "batch_size": 1, "model_id": "teacher", "backend": "transformers", "template_hash": "x"}
            for i in range(2)]
    write_parquet(pa.Table.from_pylist(rows, schema=TRACES), traces_dir(out, "extraction") / "part-sample-1.parquet",
                  "traces")


def rows(out) -> list[dict]:
    return sorted(load_traces(trace_files(out, "extraction")).to_pylist(), key=lambda r: r["trace_id"])


@pytest.mark.timeout(120)
def test_merged_shards_change_no_fingerprint_row_shard_name_or_new_row_count(tmp_path):
    out = tmp_path / "out"
    record_calls(out, 0, 10)
    traced_shard(out)
    config = load_config(REPO / "configs" / "default.yaml")
    files = trace_files(out, "extraction")
    before = {"fingerprint": traces_fingerprint(files), "names": shard_names(files), "rows": rows(out),
              "key": cache_key(config, out, "extraction")["key"]}
    trained = set(before["names"][:6])  # what an expert trained on the first calls would list
    fresh = sorted(r["trace_id"] for r in rows_not_from(files, trained).to_pylist())
    # an expert trained on these traces: improve sees nothing new
    (out / "adapters" / "extraction").mkdir(parents=True)
    (out / "adapters" / "extraction" / "training.json").write_text(json.dumps({
        "operation": "extraction", "traces_sha256": cache_key(config, out, "extraction")["traces_sha256"],
        "rows_total": 12, "trace_files": before["names"]}))
    assert new_rows(config, out)["extraction"] == 0

    done = compact(traces_dir(out, "extraction"), "extraction", max_rows=4)
    assert (done.shards, done.rows, len(done.files), done.finished) == (10, 10, 3, 0)
    files = trace_files(out, "extraction")
    assert sorted(f.name for f in files) == sorted(done.files + ["part-sample-1.parquet"])
    assert traces_fingerprint(files) == before["fingerprint"] and shard_names(files) == before["names"]
    assert rows(out) == before["rows"]  # every column of every row, the teacher's own shard untouched
    assert cache_key(config, out, "extraction")["key"] == before["key"]  # the expert is not trained again
    assert new_rows(config, out)["extraction"] == 0
    assert sorted(r["trace_id"] for r in rows_not_from(files, trained).to_pylist()) == fresh

    # a call recorded afterwards is new (one shard: left as it is until there are enough)
    record_calls(out, 10, 1)
    assert traces_fingerprint(trace_files(out, "extraction")) != before["fingerprint"]
    assert new_rows(config, out)["extraction"] == 1
    assert compact(traces_dir(out, "extraction"), "extraction").shards == 0
    assert len(rows(out)) == 13


@pytest.mark.timeout(120)
def test_a_compaction_cut_short_counts_nothing_twice_and_the_next_finishes_it(tmp_path):
    out = tmp_path / "out"
    record_calls(out, 0, 5)
    folder = traces_dir(out, "extraction")
    kept = {f.name: f.read_bytes() for f in folder.glob("part-capture-*.parquet")}
    before = rows(out), traces_fingerprint(trace_files(out, "extraction"))
    result = subprocess.run([str(BIN / "memlora"), "compact", "--out", str(out)], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "extraction  5 captured shards (5 rows) -> part-capture-compact-" in result.stdout
    for args, says in ((["--out", str(tmp_path / "nothing")], "nothing: no such folder"),
                       (["--out", str(out), "--max-rows", "0"], "--max-rows: 0: must be 1 or more")):
        bad = subprocess.run([str(BIN / "memlora"), "compact", *args], capture_output=True, text=True, timeout=120,
                             cwd=REPO)
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr
    # killed after the merged file was in place, before its shards were removed: two of them are still there
    for name in sorted(kept)[:2]:
        (folder / name).write_bytes(kept[name])
    assert (rows(out), traces_fingerprint(trace_files(out, "extraction"))) == before
    done = compact(folder, "extraction", min_shards=1000)
    assert (done.finished, done.shards) == (2, 0) and len(list(folder.glob("*.parquet"))) == 1
    # improve's way: the merged shards stay, unread, for the next compaction (a reader may have listed them)
    record_calls(out, 5, 3)
    before = rows(out), traces_fingerprint(trace_files(out, "extraction"))
    left = compact(folder, "extraction", remove=False)
    assert left.shards == 3 and len(list(folder.glob("part-capture-*.parquet"))) == 2 + 3
    assert (rows(out), traces_fingerprint(trace_files(out, "extraction"))) == before
    assert compact(folder, "extraction").finished == 3 and len(list(folder.glob("*.parquet"))) == 2
    # another call's shard under a merged one's name is not taken for a leftover: a clear error, nothing removed
    first, second = sorted(kept)[:2]
    (folder / first).write_bytes(kept[second])
    with pytest.raises(DataError, match=f"{first}: not the shard part-capture-compact-.* holds under this name"):
        compact(folder, "extraction")
    assert (folder / first).is_file()
    (folder / first).unlink()

    pq.write_table(pa.table({"x": [1]}), folder / f"{COMPACTED_PREFIX}broken.parquet")
    with pytest.raises(DataError, match=f"{COMPACTED_PREFIX}broken.parquet: a compacted trace file without"):
        trace_files(out, "extraction")
