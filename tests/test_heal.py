"""Healing a pruned student: the healing text (train conversations and the teacher's calls, test ones never),
and a real heal through the `deepspeed` launcher that brings the cut student closer to its teacher."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memlora.config import HealConfig
from memlora.data.io import write_parquet
from memlora.data.schemas import TRACES
from tests.student_fixtures import distill_config, trace_rows


def _out_with_text(out, tokenizer):
    """Traces of a train conversation (c1) and a validation one (c2), and all three conversations' turns; c3 is
    a test conversation whose words must never reach healing."""
    for op in ("extraction", "update", "generation"):
        rows = trace_rows(tokenizer, op, n=6, bad=0)
        val = [{**r, "conversation_id": "c2", "trace_id": r["trace_id"].replace("c1", "c2")} for r in rows[:2]]
        write_parquet(pa.Table.from_pylist(rows + val, schema=TRACES), out / "traces" / op / "part-0.parquet",
                      "traces")
    turns = []
    for cid, split in (("c1", "train"), ("c2", "validation"), ("c3", "test")):
        for session in (1, 2):
            for turn in range(8):
                text = f"{cid} words number {turn} of session {session} about gardens and trains"
                if split == "test":
                    text = f"zyzzyva secret test sentence {turn}"
                turns.append({"conversation_id": cid, "split": split, "session": session, "speaker": "Ann",
                              "text": text})
    (out / "datasets").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(turns), out / "datasets" / "conversations.parquet")


@pytest.mark.timeout(60)
def test_healing_text_holds_out_validation_and_never_reads_test(smol_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from memlora.student.heal import healing_chunks, pack, round_robin

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    _out_with_text(tmp_path, tok)
    train, held, source = healing_chunks(tmp_path, tok, HealConfig(max_tokens=100_000, chunk_tokens=32,
                                                                   held_out_tokens=10_000))
    train_text, held_text = tok.decode(sum(train, [])), tok.decode(sum(held, []))
    assert source == "validation conversations"
    assert "zyzzyva" not in train_text + held_text
    assert "c1 words" in train_text and "c2 words" not in train_text
    assert "c2 words" in held_text and "c1 words" not in held_text
    assert all(len(c) == 32 for c in train + held)
    # The teacher's calls are there, each system prompt once per operation, not once per call.
    assert "Alice moved to Paris" in train_text
    assert train_text.count("Extract the salient facts") == 1
    assert round_robin([["a1", "a2", "a3"], ["b1"], []]) == ["a1", "b1", "a2", "a3"]
    assert pack(["one two three"] * 50, tok, 8, 40) and sum(map(len, pack(["one two three"] * 50, tok, 8, 40))) == 40


@pytest.mark.timeout(300)
def test_a_healed_base_is_closer_to_its_teacher(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memlora.student.build import MARKER, build_student

    out = tmp_path / "out"
    _out_with_text(out, AutoTokenizer.from_pretrained(tiny_model_dir))
    heal = {"max_tokens": 4096, "chunk_tokens": 64, "epochs": 3, "learning_rate": 0.01, "r": 8, "batch_size": 4,
            "held_out_tokens": 512}
    _, config = distill_config(tmp_path / "c.yaml", str(tiny_model_dir),
                               student={"prune": {"from": "teacher", "keep_layers": [0, 2]}, "heal": heal},
                               num_ranks=1, timeout_s=240)
    lines: list[str] = []
    base = build_student(config, out, on_line=lines.append)
    marker = json.loads((base / MARKER).read_text())
    healing = marker["healing"]
    assert healing["kl_after"] < 0.8 * healing["kl_before"], healing
    assert healing["held_out_source"] == "validation conversations" and healing["train_tokens"] > 1000
    assert marker["recipe"]["heal"]["r"] == 8 and marker["kept_layers"] == [0, 2]
    assert any("healed student base" in line for line in lines)
    assert not (out / "student" / ".pruned").exists() and not (out / "student" / ".heal-config.yaml").exists()
    # The healed base is a plain 2-layer model in safetensors, and the next build keeps it as it is.
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    assert model.config.num_hidden_layers == 2 and not any("lora" in n for n, _ in model.named_parameters())
    mtime = (base / "model.safetensors").stat().st_mtime
    assert build_student(config, out, on_line=lines.append) == base
    assert (base / "model.safetensors").stat().st_mtime == mtime
