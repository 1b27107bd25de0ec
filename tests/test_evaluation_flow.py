"""The evaluate stage on tiny models: replay faithfulness in-process, then the whole `evaluate` flow on the
shared Prefect server (three systems, each in its own process, plus the judge) and everything it writes."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from memlora.config import OPERATIONS, ExpertConfig, parse_config
from memlora.data.records import Conversation, Question, Turn
from memlora.evaluation.qa import run_end_to_end
from memlora.evaluation.replay import FORCED, replay
from memlora.evaluation.systems import SYSTEMS
from memlora.memory.store import MemoryStore
from tests.conftest import REPO
from tests.student_fixtures import perturb

T0 = datetime(2023, 5, 8, 13, 56)
EXPERT = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
MEMORY = {"window": 4, "max_facts": 2, "min_similarity": 0.0, "max_fact_chars": 16, "answer_max_chars": 16,
          "operations": {"extraction": {"max_new_tokens": 32}, "update": {"max_new_tokens": 40},
                         "generation": {"max_new_tokens": 16}}}


def small_config(teacher: str, student: str, **evaluation) -> dict:
    raw = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    raw["teacher"].update(model=teacher, device="cpu", batch_size=8, logprobs_top_k=0)
    raw["student"] = {"model": student, "expert": EXPERT}
    raw["memory"].update(MEMORY)
    raw["evaluation"] = {"max_conversations": 1, "max_sessions": 1, "max_questions": 3, "bootstrap_samples": 100,
                         **evaluation}
    return raw


def conversation(cid: str = "c1") -> Conversation:
    lines = ["I adopted a cat named Tom.", "Nice! I started baking bread.", "I moved to Oslo in May.",
             "My sister lives in Lyon."]
    if cid != "c1":
        lines = lines[2:] + lines[:2]
    turns = [Turn(1, i + 1, f"D1:{i + 1}", "Ann" if i % 2 == 0 else "Ben", text, T0) for i, text in enumerate(lines)]
    return Conversation(cid, turns, [Question(0, "What is Ann's cat called?", "Tom", None, 4),
                                     Question(1, "Where does Ben's aunt live?", None, "Lyon", 5)], split="test")


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models run fastest on one thread, and far faster than on two when other work shares the cores
    (OpenMP threads spin waiting for each other); system processes inherit OMP_NUM_THREADS."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)


@pytest.mark.timeout(180)
def test_replay_sends_the_same_requests_in_the_same_batches_and_reproduces_the_outputs(tiny_backend, embedder,
                                                                                       one_thread):
    config = parse_config(small_config("unused", "unused"))
    calls, qa = run_end_to_end("teacher", tiny_backend, embedder, MemoryStore(), config, [conversation()])
    assert [q["question_id"] for q in qa] == [0, 1] and qa[1]["gold"] == "Not mentioned in the conversation"
    assert [c["question_id"] for c in calls if c["operation"] == "generation"] == [0, 1]
    again = replay(tiny_backend, calls, "teacher", FORCED, config.memory)
    key = lambda r: (r["group"], r["operation"], r["messages"], r["output_schema"], r["batch_size"])  # noqa: E731
    assert [key(r) for r in again] == [key(r) for r in calls]
    assert [r["raw_output"] for r in again] == [r["raw_output"] for r in calls]  # greedy: same model, same output
    free = replay(tiny_backend, calls, "teacher", "forced_free", config.memory, free=True)
    assert not any(r["constrained"] for r in free) and all(r["ref_index"] == c["index"] for r, c in zip(free, calls))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("running", [False, True], ids=["merged", "running"])
def test_conversations_run_at_once_and_replay_the_same_way(tiny_backend, embedder, one_thread, monkeypatch, running):
    """Two test conversations run in threads, their calls merged into batches or joining one running batch
    (`evaluation.continuous_batching`): calls are numbered across both (index, ref_index, group unique and in
    conversation order), each conversation's rows are those it makes alone, and a replay sends every group again
    and gets the same greedy outputs."""
    config = parse_config(small_config("unused", "unused", continuous_batching=running))
    joined = []
    join = tiny_backend.join
    monkeypatch.setattr(tiny_backend, "join", lambda batch, requests: joined.append(len(requests))
                        or join(batch, requests))
    alone = {cid: run_end_to_end("teacher", tiny_backend, embedder, MemoryStore(), config, [conversation(cid)])
             for cid in ("c1", "c2")}
    calls, qa = run_end_to_end("teacher", tiny_backend, embedder, MemoryStore(), config,
                               [conversation("c1"), conversation("c2")])
    assert [c["index"] for c in calls] == list(range(len(calls))) == [c["ref_index"] for c in calls]
    assert [c["conversation_id"] for c in calls] == sorted(c["conversation_id"] for c in calls)
    assert [q["conversation_id"] for q in qa] == ["c1", "c1", "c2", "c2"]
    groups = {cid: {c["group"] for c in calls if c["conversation_id"] == cid} for cid in ("c1", "c2")}
    assert groups["c1"] and groups["c2"] and not groups["c1"] & groups["c2"]
    key = lambda r: (r["operation"], r["messages"], r["raw_output"], r["question_id"])  # noqa: E731
    for cid, (own, _) in alone.items():
        assert [key(c) for c in calls if c["conversation_id"] == cid] == [key(c) for c in own]
    again = replay(tiny_backend, calls, "student", FORCED, config.memory, running=running)
    assert [(r["ref_index"], r["group"], r["raw_output"]) for r in again] == \
        [(c["index"], c["group"], c["raw_output"]) for c in calls]
    assert [r["index"] for r in again] == list(range(len(calls)))
    # the two conversations' calls went through the running batch (alone, a conversation runs merged)
    assert (sum(joined) == 2 * len(calls)) if running else not joined


def writes_facts(model_dir: Path) -> bool:
    from memlora.llm.hf_backend import TransformersBackend, load_causal_lm
    from memlora.memory.llm import GenerationRequest
    from memlora.memory.prompts import TEMPLATES, extraction_schema

    model, tok, model_id = load_causal_lm(str(model_dir), device="cpu")
    request = GenerationRequest("extraction", TEMPLATES["extraction"].messages(
        "Conversation on 8 May 2023:\nAnn: I adopted a cat named Tom."), 32, extraction_schema(2, 16))
    text = TransformersBackend(model, tok, model_id).generate([request])[0].text
    return bool(json.loads(text)["facts"]) if text.endswith("}") else False


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny random teacher that writes facts under the schema, so update calls happen (the conftest model,
    seed 0, always answers {"facts": []}); same architecture and tokenizer as the student base."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaForCausalLM.config_class.from_pretrained(tiny_model_dir)
    for seed in (3, 7, 1, 11, 12, 13):
        torch.manual_seed(seed)
        folder = tmp_path_factory.mktemp(f"tiny-teacher-{seed}")
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        if writes_facts(folder):
            return folder
    pytest.fail("no seed gave a tiny teacher that writes facts")


def write_experts(out: Path, base: Path) -> None:
    """OUT/adapters/<op>/: DeLoRA experts with non-zero B (a fresh one would leave outputs unchanged)."""
    from memlora.llm.hf_backend import load_causal_lm
    from memlora.manifest import update_manifest
    from memlora.student.experts import attach_expert

    for i, op in enumerate(OPERATIONS):
        model, _, _ = load_causal_lm(str(base), dtype="float32", device="cpu")
        expert = attach_expert(model, ExpertConfig(**EXPERT))
        perturb(expert, seed=10 + i)
        expert.save_pretrained(str(out / "adapters" / op), safe_serialization=True)
    update_manifest(out)  # as the distill stage does: the evaluation checks adapters against it


AGREEMENT = {"extraction": ["fact_precision", "fact_recall", "fact_f1"],
             "update": ["event_accuracy", "event_macro_f1"],
             "generation": ["answer_token_f1", "answer_rouge_l"]}
LATENCY = ["latency_p50", "latency_p95", "prompt_tokens", "completion_tokens", "tokens_per_s", "batch_size"]
QA_METRICS = ["token_f1", "bleu1", "judge_accuracy", "answered"]
MEMORY_METRICS = ["params_base", "params_adapters", "adapter_bytes", "peak_rss_mb", "peak_rss_e2e_mb", "ru_maxrss_mb",
                  "rss_after_load_mb", "rss_baseline_mb", "load_s"]


@pytest.mark.prefect
@pytest.mark.timeout(600)
def test_evaluate_flow_on_tiny_models(prefect_server, tiny_teacher, tiny_model_dir, sample_path, tmp_path,
                                      one_thread):
    import matplotlib.image

    from memlora.cli import main
    from memlora.data.ingest import ingest
    from memlora.flows.evaluation import evaluate

    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(small_config(str(tiny_teacher), str(tiny_model_dir))))
    cfg = parse_config(yaml.safe_load(config.read_text()))

    # Nothing ingested yet: a clear error, exit code 2, before any model loads.
    assert main(["evaluate", "--config", str(config), "--out", str(out)]) == 2

    corpus = ingest(sample_path, out, cfg.data)
    test = [c for c in corpus if c.split == "test"][0]
    questions = test.questions[:3]
    write_experts(out, tiny_model_dir)
    result = evaluate(config_path=str(config), out=str(out))

    # results.parquet: every (system, operation, metric) row, once
    table = pq.read_table(out / "eval" / "results.parquet")
    assert table.schema.metadata[b"memlora.schema_version"] == b"1"
    rows = table.to_pylist()
    keys = [(r["system"], r["operation"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))
    by_key = {k: r for k, r in zip(keys, rows)}
    expected = set()
    for s in SYSTEMS:
        for op in OPERATIONS:
            for suffix in ("", "_free"):
                expected |= {(s, op, m + suffix) for m in ["parse_ok", "schema_valid", *AGREEMENT[op]]}
            expected |= {(s, op, m) for m in LATENCY}
        for operation in ["qa"] + [f"qa/cat-{c}" for c in {q.category for q in questions}]:
            expected |= {(s, operation, m) for m in QA_METRICS}
        expected |= {(s, "model", m) for m in MEMORY_METRICS}
    assert expected <= set(keys), sorted(expected - set(keys))
    assert {r["ci_method"] for r in rows} >= {"wilson-95", "bootstrap-95", "none"}
    for op in OPERATIONS:  # every operation was exercised: the teacher's calls parsed and have references
        assert by_key[("student", op, AGREEMENT[op][0])]["n"] > 0, op
        assert by_key[("teacher", op, AGREEMENT[op][-1])]["value"] == 1.0  # itself, by construction
        assert by_key[("teacher", op, "parse_ok_free")]["decoding"] == "free"
    assert by_key[("teacher", "qa", "token_f1")]["n"] == len(questions)
    assert by_key[("student+experts", "model", "params_adapters")]["value"] > 0
    assert by_key[("student+experts", "model", "adapter_bytes")]["value"] > 0
    assert by_key[("student", "model", "params_adapters")]["value"] == 0
    assert by_key[("student", "model", "params_base")]["value"] == \
        by_key[("student+experts", "model", "params_base")]["value"]

    # the students answered exactly the teacher's requests, in the teacher's batches
    def requests(system, phase):
        t = pq.read_table(out / "eval" / "systems" / system / "calls.parquet").to_pylist()
        return [(r["ref_index"], r["group"], r["messages"], r["output_schema"]) for r in t if r["phase"] == phase]
    assert requests("student-experts", "forced") == requests("teacher", "e2e") == requests("student", "forced")

    # each system measured in its own process
    probes = {s: json.loads((out / "eval" / "systems" / s.replace("+", "-") / "probe.json").read_text())
              for s in [*SYSTEMS, "judge"]}
    pids = {p["pid"] for p in probes.values()}
    assert len(pids) == 4 and os.getpid() not in pids
    assert all(p["peak_rss_mb"] > p["baseline"]["rss_mb"] > 0 for p in probes.values())
    assert probes["student+experts"]["adapter_switches"] > 0
    assert probes["student+experts"]["experts_design"] == "beside, folded"
    assert probes["student"]["experts_design"] is None
    # one test conversation: its groups go straight to the model, and the report says how latency was taken
    assert {probes[s]["batching"] for s in SYSTEMS} == {"merged"}
    assert set(probes["student+experts"]["adapters"]) == set(OPERATIONS)
    for s in SYSTEMS:
        assert by_key[(s, "model", "peak_rss_mb")]["value"] == pytest.approx(probes[s]["peak_rss_mb"])
        # the end-to-end phase's own peak: from the loaded model, within the process's
        assert probes[s]["after_load"]["rss_mb"] * 0.5 < probes[s]["peak_rss_e2e_mb"] <= probes[s]["peak_rss_mb"]

    # report
    md = (out / "eval" / "report.md").read_text()
    assert "## Agreement with the teacher" in md and "## End-to-end QA" in md and "student+experts" in md
    assert md.splitlines()[2].startswith("These numbers say how closely a small student agrees")
    assert "teacher, student, student+experts: calls were merged into batches decoded to their end" in md
    log = (out / "eval" / "logs" / "student-experts.log").read_text()
    assert "student+experts: end to end, conversation 1/1" in log and "calls," in log  # progress, per session
    for label in ("generation empty (constrained)", "extraction cut_at_limit (constrained)",
                  "generation s per generated token", "generation generated tokens per call"):
        assert f"| {label} |" in md, label
    for s in SYSTEMS:  # the degenerate counts are the rows' own
        calls = [r for r in pq.read_table(out / "eval" / "systems" / s.replace("+", "-") / "calls.parquet").to_pylist()
                 if r["phase"] == "forced" and r["constrained"] and r["operation"] == "extraction"]
        cut = by_key[(s, "extraction", "cut_at_limit")]
        assert cut["value"] == pytest.approx(sum(r["finish_reason"] == "length" for r in calls) / len(calls))
    png = out / "eval" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, _ = matplotlib.image.imread(str(png)).shape
    assert h > 500 and w > 800

    # manifest and flow result
    manifest = json.loads((out / "manifest.json").read_text())
    section = manifest["evaluation"]
    assert section["conversations"] == [test.conversation_id] and section["questions"] == len(questions)
    assert {s: v["pid"] for s, v in section["systems"].items()} == {s: probes[s]["pid"] for s in SYSTEMS}
    files = {f["path"] for f in manifest["files"]}
    assert {"eval/results.parquet", "eval/report.md", "eval/report.png"} <= files
    assert [h["system"] for h in result["headline"]] == list(SYSTEMS)

    # Prefect artifacts
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["evaluation-headline", "evaluation-report"])))

    artifacts = {a.key: a for a in asyncio.run(read())}
    assert set(artifacts) == {"evaluation-headline", "evaluation-report"}
    assert "student+experts" in str(artifacts["evaluation-headline"].data)
    assert "Agreement with the teacher" in artifacts["evaluation-report"].data

    # A rerun keeps every system whose config and inputs are unchanged (no model process starts) ...
    from memlora.evaluation.cache import cache_key
    from memlora.evaluation.process import run_system_process

    from memlora.config import load_config

    base, cfg = result["student_base"], load_config(config)
    for system in [*SYSTEMS, "judge"]:
        again = run_system_process(cfg, out, system, base=base)
        assert again.kept is True and again.pid == probes[system]["pid"]

    # A quantized student brings the teacher quantized the same way into the comparison (like for like: the same
    # smoothing and float32 exceptions); it replays the teacher's requests as the students do. The teacher as
    # deployed is kept from the run above.
    raw = small_config(str(tiny_teacher), str(tiny_model_dir))
    raw["student"].update(quantize="int8", int8_smoothing=0.5, int8_keep_float32=["lm_head"])
    quantized_config = tmp_path / "int8.yaml"
    quantized_config.write_text(yaml.safe_dump(raw))
    quantized = evaluate(config_path=str(quantized_config), out=str(out))
    four = ["teacher", "teacher-int8", "student", "student+experts"]
    assert [h["system"] for h in quantized["headline"]] == four
    assert quantized["systems"]["teacher"]["pid"] == probes["teacher"]["pid"]
    int8_probe = json.loads((out / "eval" / "systems" / "teacher-int8" / "probe.json").read_text())
    assert int8_probe["dtype"] == "float32, int8 weights (smoothed, alpha 0.5) (lm_head float32)"
    assert quantized["systems"]["student+experts"]["dtype"].startswith("float32, int8 weights (smoothed")
    assert quantized["systems"]["student+experts"]["experts_design"] == "merged"  # int8's own choice
    assert requests("teacher-int8", "forced") == requests("teacher", "e2e")
    rows = {(r["system"], r["operation"], r["metric"]): r
            for r in pq.read_table(out / "eval" / "results.parquet").to_pylist()}
    for op in OPERATIONS:
        assert rows[("teacher-int8", op, AGREEMENT[op][0])]["n"] > 0, op
    assert rows[("teacher-int8", "model", "peak_rss_mb")]["value"] == pytest.approx(int8_probe["peak_rss_mb"])
    md = (out / "eval" / "report.md").read_text()
    assert "| | teacher | teacher-int8 | student | student+experts |" in md
    assert "| teacher-int8 | " in md  # the systems table names its model and weights
    # ... and its key follows what the system reads: a changed expert changes only student+experts' key.
    keys = {s: cache_key(cfg, out, s, base) for s in SYSTEMS}
    weights = out / "adapters" / "update" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    changed = {s: cache_key(cfg, out, s, base) != keys[s] for s in SYSTEMS}
    assert changed == {"teacher": False, "student": False, "student+experts": True}
    # a student setting (its quantization) re-evaluates the students, not the teacher
    quantized = cfg.model_copy(update={"student": cfg.student.model_copy(update={"quantize": "int8"})})
    changed = {s: cache_key(quantized, out, s, base) != cache_key(cfg, out, s, base) for s in SYSTEMS}
    assert changed == {"teacher": False, "student": True, "student+experts": True}


def other_corpus(path: Path) -> Path:
    """Two conversations of two sessions each, written for this test, as JSONL; per conversation one question
    about session 1, one about session 2, one without evidence."""
    lines = []
    for c, cid in enumerate(("x1", "x2")):
        for session in (1, 2):
            for turn, text in enumerate((f"I adopted a cat named Tom{c}.", "I moved to Oslo in May."), start=1):
                lines.append({"type": "turn", "conversation_id": cid, "session": session, "turn": turn,
                              "speaker": "Ann" if turn == 1 else "Ben", "text": text,
                              "time": f"2023-05-0{session}T10:00:00"})
        lines += [{"type": "question", "conversation_id": cid, "question": "What is Ann's cat called?",
                   "answer": f"Tom{c}", "category": 4, "evidence": ["D1:1"]},
                  {"type": "question", "conversation_id": cid, "question": "Where did Ben move?", "answer": "Oslo",
                   "category": 4, "evidence": ["D2:2"]},
                  {"type": "question", "conversation_id": cid, "question": "Who adopted a cat?", "answer": "Ann",
                   "category": 1}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.prefect
@pytest.mark.timeout(600)
def test_trained_experts_evaluated_on_another_corpus(prefect_server, tiny_teacher, tiny_model_dir, tmp_path,
                                                     one_thread):
    """`memlora evaluate --data --experts-from`, with the experts also evaluated as served (`evaluation.served`)
    under the trained run's thresholds."""
    from memlora.cli import main
    from memlora.data.io import write_json
    from memlora.evaluation.plan import prepare
    from memlora.evaluation.systems import EvalError
    from memlora.llm.confidence import is_destructive

    trained, out = tmp_path / "trained", tmp_path / "other"
    config = tmp_path / "c.yaml"
    # 1 conversation; the experts also as served, without a teacher and with one
    config.write_text(yaml.safe_dump(small_config(str(tiny_teacher), str(tiny_model_dir),
                                                  served=["guard", "teacher"])))
    write_experts(trained, tiny_model_dir)
    data = other_corpus(tmp_path / "other.jsonl")
    args = ["evaluate", "--config", str(config), "--out", str(out), "--data", str(data), "--sessions", "1"]

    assert main(args) == 2 and not out.exists()  # --data without --experts-from: refused before anything is made
    assert main([*args, "--experts-from", str(trained)]) == 2  # served, but never calibrated: before any model
    assert not (out / "eval" / "systems").exists()
    with pytest.raises(EvalError, match=r"deferral.json: no deferral thresholds \(run `memlora calibrate` first\)"):
        prepare(parse_config(yaml.safe_load(config.read_text())), out)
    # Thresholds as `memlora calibrate` writes them: every extraction kept, an update kept unless it deletes or
    # rewrites a memory (no threshold for those), no generation answer kept
    write_json({"operations": {"extraction": {"keep": {"value": -1e9}}, "update": {"keep": {"value": -1e9}}}},
               trained / "deferral.json")
    assert main([*args, "--experts-from", str(trained)]) == 0
    assert (out / "deferral.json").read_bytes() == (trained / "deferral.json").read_bytes()
    results = pq.read_table(out / "eval" / "results.parquet").to_pylist()

    def value(system, operation, metric):
        return next(r["value"] for r in results if (r["system"], r["operation"], r["metric"]) ==
                    (system, operation, metric))

    for system in ("experts+guard", "experts+teacher"):
        assert value(system, "extraction", "kept_by_expert") == value(system, "extraction", "kept_by_expert_e2e") == 1
        calls = pq.read_table(out / "eval" / "systems" / system.replace("+", "-") / "calls.parquet").to_pylist()
        updates = [r for r in calls if r["operation"] == "update"]
        assert all(r["answered_by"] == ("expert" if not is_destructive("update", r["raw_output"]) else
                                        "teacher") for r in updates if system == "experts+teacher")
    assert value("experts+guard", "generation", "unsure") == 1 and value("experts+guard", "update", "deletes_e2e") == 0
    assert value("experts+teacher", "generation", "deferred_to_teacher") == 1
    teacher_calls = pq.read_table(out / "eval" / "systems" / "teacher" / "calls.parquet").to_pylist()
    teacher_answers = {r["index"]: r["raw_output"] for r in teacher_calls if r["phase"] == "e2e"}
    served_calls = pq.read_table(out / "eval" / "systems" / "experts-teacher" / "calls.parquet").to_pylist()
    assert all(r["raw_output"] == teacher_answers[r["ref_index"]] for r in served_calls
               if r["phase"] == "forced" and r["operation"] == "generation")  # the teacher's own answers
    report = (out / "eval" / "report.md").read_text()
    assert "## Served, and memories deleted" in report and "generation answered by the teacher" in report

    # The trained run is untouched; the new OUT holds its verified experts and the other corpus, all test.
    assert not (trained / "eval").exists()
    assert (out / "adapters" / "update" / "adapter_model.safetensors").read_bytes() == \
        (trained / "adapters" / "update" / "adapter_model.safetensors").read_bytes()
    splits = pq.read_table(out / "datasets" / "conversations.parquet").to_pylist()
    assert {(r["conversation_id"], r["split"]) for r in splits} == {("x1", "test"), ("x2", "test")}
    asked = pq.read_table(out / "datasets" / "questions.parquet").to_pylist()
    assert sorted(r["question"] for r in asked if r["conversation_id"] == "x1") == ["What is Ann's cat called?"]
    # --sessions 1: the corpus is cut to its first session; the question about session 2 is left out (its answer
    # is not in what the systems read), and so is the one without evidence (no way to tell)
    turns = pq.read_table(out / "datasets" / "conversations.parquet").to_pylist()
    assert {r["session"] for r in turns} == {1}
    qa = pq.read_table(out / "eval" / "systems" / "teacher" / "qa.parquet").to_pylist()
    assert [r["question"] for r in qa] == ["What is Ann's cat called?"]
    assert {r["conversation_id"] for r in qa} == {"x1"}

    # Made from the same run and data: reused as it is (two conversations, however many turns they have).
    from memlora.evaluation.other_corpus import prepare_other_corpus

    assert prepare_other_corpus(parse_config(yaml.safe_load(config.read_text())), data, trained, out, 1) == 2

    # A folder that is not empty and was not made from the same run and data is refused.
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["evaluate", "--config", str(config), "--out", str(other), "--data", str(data), "--sessions", "1",
                 "--experts-from", str(trained)]) == 2
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1

    # The trained run's update expert replaced since (a promotion, a rollback, a distill): the folder made before
    # holds the old one (hard links), and says so instead of resuming an evaluation of experts no longer served.
    from memlora.manifest import update_manifest

    weights = trained / "adapters" / "update" / "adapter_model.safetensors"
    replacement = weights.with_name("new.safetensors")
    replacement.write_bytes(weights.read_bytes() + b" ")
    replacement.replace(weights)
    update_manifest(trained)
    with pytest.raises(EvalError, match=r"holds the experts .* served before \(update changed since"):
        prepare_other_corpus(parse_config(yaml.safe_load(config.read_text())), data, trained, out, 1)


@pytest.mark.timeout(120)
def test_another_corpus_holding_a_conversation_an_expert_learnt_from_is_refused_first(tiny_model_dir, tmp_path):
    """`--data` with the trained run's own conversations (a team's re-export of them, say) would score the experts
    on what they trained on: refused by id before the new folder is made (it used to be made, then refused)."""
    from memlora.evaluation.other_corpus import prepare_other_corpus
    from memlora.evaluation.systems import EvalError

    trained, out = tmp_path / "trained", tmp_path / "other"
    write_experts(trained, tiny_model_dir)
    (trained / "adapters" / "update" / "training.json").write_text(json.dumps(
        {"operation": "update", "train_conversations": ["x0", "x2"], "validation_conversations": ["x9"]}))
    config = parse_config(small_config(str(tiny_model_dir), str(tiny_model_dir)))
    with pytest.raises(EvalError, match=r"other.jsonl: the update expert of .*trained learnt from conversation\(s\) "
                                        r"x2 of it \(by id\)"):
        prepare_other_corpus(config, other_corpus(tmp_path / "other.jsonl"), trained, out, 1)
    assert not out.exists()


def test_the_quantized_teacher_column_appears_only_beside_a_quantized_student(tiny_model_dir):
    """teacher-int8 is the teacher quantized as the student is: evaluated where the student is quantized and the
    teacher, local, is not; never for an HTTP teacher (its server quantizes) or a teacher already int8."""
    from memlora.evaluation.systems import ALL_SYSTEMS, SYSTEMS, quantized_teacher, systems

    raw = small_config(str(tiny_model_dir), str(tiny_model_dir))
    assert systems(parse_config(raw)) == SYSTEMS
    raw["student"].update(quantize="int8", int8_smoothing=0.85, int8_keep_float32=["down_proj"])
    config = parse_config(raw)
    assert systems(config) == ALL_SYSTEMS[:4] and ALL_SYSTEMS[1] == "teacher-int8"
    teacher = quantized_teacher(config)
    assert teacher.quantize == "int8" and teacher.model == config.teacher.model and teacher.logprobs_top_k == 0
    raw["teacher"]["quantize"] = "int8"  # the teacher as deployed is already int8: its own column says it
    assert systems(parse_config(raw)) == SYSTEMS
    raw["teacher"]["quantize"], raw["student"]["quantize"] = "none", "int8_weight"  # the same scheme as the student
    assert quantized_teacher(parse_config(raw)).quantize == "int8_weight"
    from memlora.llm.hf_backend import TransformersBackend

    backend = TransformersBackend.from_config(quantized_teacher(parse_config(raw)), smoothing_alpha=0.85)
    assert backend.quantized == "int8_weight" and backend.smoothing_alpha == 0.0  # weight-only is never smoothed
    from memlora.llm.quantize import Int8WeightLinear

    assert any(isinstance(m, Int8WeightLinear) for m in backend.model.modules())
    import torch

    from memlora.llm.kv_cache import kv_dtype

    assert kv_dtype(backend.model) == torch.bfloat16  # its KV cache held as the student's is
