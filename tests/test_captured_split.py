"""Capture's test share: whole conversations, or whole blocks of consecutive calls, never call by call; its rows
neither train nor stop training early, and `memlora calibrate` checks its thresholds on them."""

from __future__ import annotations

import pyarrow as pa
import pytest

from memlora.config import CaptureConfig, CaptureRule
from memlora.data.schemas import TRACES
from memlora.data.split import captured_split
from memlora.student.examples import split_rows
from memlora.teacher.capture import CaptureRecorder

RULE = CaptureRule(operation="extraction", model="teacher")
ANSWER = {"choices": [{"message": {"content": '{"facts": []}'}, "finish_reason": "stop"}], "usage": {}}


def rows(recorder: CaptureRecorder, conversations: list[str | None]) -> list[dict]:
    return [recorder.row(RULE, [{"role": "user", "content": f"call {i}"}], None, ANSWER, 0.1, conv, 0)
            for i, conv in enumerate(conversations)]


@pytest.mark.timeout(30)
def test_blocks_of_consecutive_calls_go_to_test_together(tmp_path):
    recorder = CaptureRecorder.from_config(tmp_path, CaptureConfig(test_ratio=0.5, test_block=5,
                                                                   validation_ratio=0.25))
    made = rows(recorder, [None] * 60)
    splits = [captured_split(r["conversation_id"]) for r in made]
    blocks = [splits[i:i + 5] for i in range(0, 60, 5)]
    assert all(("test" in b) == all(s == "test" for s in b) for b in blocks)  # a block is test whole or not at all
    assert 2 <= sum(b[0] == "test" for b in blocks) <= 10 and "validation" in splits and "train" in splits
    table = pa.Table.from_pylist(made, schema=TRACES)
    train, validation = split_rows(table, {})
    assert train.num_rows + validation.num_rows == splits.count("train") + splits.count("validation")
    assert not {captured_split(c) for c in train.column("conversation_id").to_pylist()} & {"test", "validation"}
    assert {captured_split(c) for c in validation.column("conversation_id").to_pylist()} == {"validation"}


@pytest.mark.timeout(30)
def test_a_named_conversation_goes_to_one_side_whole(tmp_path):
    recorder = CaptureRecorder.from_config(tmp_path, CaptureConfig(test_ratio=0.3, validation_ratio=0.0))
    names = [f"user-{i % 20}" for i in range(200)]
    made = rows(recorder, names)
    side = {}
    for name, row in zip(names, made):
        side.setdefault(name, set()).add(captured_split(row["conversation_id"]))
    assert all(len(s) == 1 for s in side.values())
    assert 2 <= sum(s == {"test"} for s in side.values()) <= 12
    # without a test share nothing changes: the conversation's own name, no block suffix
    plain = CaptureRecorder.from_config(tmp_path, CaptureConfig(validation_ratio=0.0))
    assert rows(plain, [None])[0]["conversation_id"] == f"capture-{plain.run_id}"
