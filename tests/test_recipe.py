"""The distillation recipe: minimal student prompts, cleaned targets (deduplicated facts, redundant NONE
dropped, gold answers), validation split, layer choice by angular distance, and early stopping that keeps the
best epoch (real `deepspeed` launcher, tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memlora.config import PruneConfig, TargetsConfig
from memlora.data.records import Conversation
from memlora.data.schemas import TRACES
from memlora.data.split import assign_split
from memlora.memory.prompts import NOT_MENTIONED, STUDENT_SYSTEM, TEMPLATES, student_messages
from memlora.memory.system import render_question
from memlora.student.examples import IGNORE, build_examples, split_rows
from memlora.student.targets import TargetStats, dedupe_facts, filter_update, make_target
from tests.student_fixtures import distill_config, trace_rows


def _row(operation: str, user: str, raw: str, cid: str = "c1") -> dict:
    return {"operation": operation, "conversation_id": cid, "raw_output": raw,
            "messages": TEMPLATES[operation].messages(user)}


@pytest.mark.timeout(30)
def test_student_template_keeps_the_input_and_drops_the_shots(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    user = "Conversation on 8 May 2023:\nAlice: I adopted a cat named Miso."
    row = {**trace_rows(tok, "extraction", n=1, bad=0)[0], "messages": TEMPLATES["extraction"].messages(user)}
    minimal = student_messages("extraction", row["messages"])
    assert minimal == [{"role": "system", "content": STUDENT_SYSTEM["extraction"]}, {"role": "user", "content": user}]
    # A prompt that is not ours (a captured client's) is left as it is.
    foreign = [{"role": "system", "content": "You are a Personal Information Organizer"}, {"role": "user", "content": user}]
    assert student_messages("extraction", foreign) == foreign

    table = pa.Table.from_pylist([row], schema=TRACES)
    full = build_examples(table, tok, 2048, True).examples[0]
    short = build_examples(table, tok, 2048, True, prompt="minimal").examples[0]
    assert short.prompt_len < 0.3 * full.prompt_len  # the shots and instructions are gone
    # Same completion (the teacher's own tokens and log-probs) after either prompt.
    assert short.labels[short.prompt_len:] == full.labels[full.prompt_len:]
    assert all(x == IGNORE for x in short.labels[: short.prompt_len])
    assert short.teacher_ids == full.teacher_ids and short.teacher_ids is not None
    assert user in tok.decode(short.input_ids[: short.prompt_len])


@pytest.mark.timeout(30)
def test_target_cleaning_on_hand_made_rows():
    cfg = TargetsConfig()
    stats = TargetStats()
    kept, exact, near = dedupe_facts(["Felix is jealous of me.", "felix is jealous of me", "Felix bakes bread",
                                      "Felix is jealous of me today", "Felix bakes bread daily"], 0.8)
    # Exact (case, punctuation aside) and near (word Jaccard 5/6 >= 0.8) duplicates go; 3/4 overlap stays.
    assert kept == ["Felix is jealous of me.", "Felix bakes bread", "Felix bakes bread daily"]
    assert (exact, near) == (1, 1)
    facts = ["Nadia likes tea", "Nadia likes tea.", "Nadia likes tea"]
    target = make_target(_row("extraction", "x", json.dumps({"facts": facts})), cfg, {}, 100, stats)
    assert target.changed and json.loads(target.text) == {"facts": ["Nadia likes tea"]}
    assert stats.counts["facts_exact_duplicates_dropped"] == 2

    # Update: NONE entries next to a real decision are dropped; all-NONE keeps the first (most similar) one.
    mixed = [{"id": "0", "text": "a", "event": "NONE"}, {"id": "2", "text": "b", "event": "ADD"},
             {"id": "1", "text": "c", "event": "NONE"}]
    assert filter_update(mixed) == ([mixed[1]], 2)
    assert filter_update([mixed[0], mixed[2]]) == ([mixed[0]], 1)
    untouched = make_target(_row("update", "x", json.dumps({"memory": [mixed[1]]})), cfg, {}, 100, stats)
    assert not untouched.changed
    assert TargetsConfig(drop_redundant_none=False) and not make_target(
        _row("update", "x", json.dumps({"memory": mixed})), TargetsConfig(drop_redundant_none=False), {}, 100,
        stats).changed

    # Generation: the gold answer of the very question, else the teacher's answer.
    from memlora.memory.store import Memory

    memories = [Memory("m0", "Felix has a dog named Juno", "2023-05-08T00:00:00", "2023-05-08T00:00:00")]
    asked = _row("generation", render_question(memories, "What is the name of Felix's dog?"),
                 '{"answer": "Felix\'s Dog"}')
    gold = {("c1", "What is the name of Felix's dog?"): "Juno"}
    assert json.loads(make_target(asked, cfg, gold, 100, stats).text) == {"answer": "Juno"}
    assert not make_target(asked, TargetsConfig(generation="teacher"), gold, 100, stats).changed
    other = _row("generation", render_question(memories, "Where does Felix work?"), '{"answer": "a bakery"}')
    assert make_target(other, cfg, gold, 100, stats).text == '{"answer": "a bakery"}'
    assert stats.counts["generation_gold"] == 1 and stats.counts["generation_teacher"] == 1
    # gold_supported: the gold answer only where the memories shown hold it; an adversarial one always
    only_supported = TargetsConfig(generation="gold_supported")
    assert json.loads(make_target(asked, only_supported, gold, 100, stats).text) == {"answer": "Juno"}
    made_up = {("c1", "What is the name of Felix's dog?"): "a cat called Milo"}
    assert make_target(asked, only_supported, made_up, 100, stats).text == '{"answer": "Felix\'s Dog"}'
    assert stats.counts["generation_gold_unsupported"] == 1
    never = {("c1", "What is the name of Felix's dog?"): NOT_MENTIONED}
    assert json.loads(make_target(asked, only_supported, never, 100, stats).text) == {"answer": NOT_MENTIONED}


@pytest.mark.timeout(30)
def test_split_keeps_test_conversations_and_adds_validation(sample_path):
    from memlora.data.loaders import load_corpus

    ids = [f"c{i}" for i in range(12)]
    before = {c.conversation_id: c.split for c in assign_split([Conversation(i, []) for i in ids], 0.17, 0)}
    after = {c.conversation_id: c.split for c in assign_split([Conversation(i, []) for i in ids], 0.17, 0, 0.1)}
    assert [i for i in ids if before[i] == "test"] == [i for i in ids if after[i] == "test"]
    assert sorted(after.values()) == ["test"] * 3 + ["train"] * 8 + ["validation"]
    # The bundled sample splits as the embedded default documents: 2 train, 1 validation, 1 test.
    corpus = assign_split(load_corpus(sample_path), 0.25, 0, 0.25)
    assert sorted(c.split for c in corpus) == ["test", "train", "train", "validation"]
    rows = pa.Table.from_pylist([{"conversation_id": c.conversation_id} for c in corpus])
    train, val = split_rows(rows, {c.conversation_id: c.split for c in corpus})
    assert val.num_rows == 1 and train.num_rows == 2  # a test conversation's rows never train, even if present


@pytest.mark.timeout(60)
def test_the_bundled_12_conversation_sample_loads_and_splits_as_documented():
    from memlora.config import load_config
    from memlora.data.loaders import load_corpus
    from tests.conftest import REPO

    config = load_config(REPO / "configs" / "default.yaml")
    corpus = load_corpus(REPO / "data" / "samples" / "locomo_sample12.json")
    assert len(corpus) == 12 and sum(len(c.turns) for c in corpus) >= 300
    questions = [q for c in corpus for q in c.questions]
    assert len(questions) >= 100 and {q.category for q in questions} == {1, 2, 3, 4, 5}
    assert all(q.answer for q in questions if q.category != 5)  # gold answers: the generation targets
    split = config.data.split
    assign_split(corpus, split.test_ratio, split.seed, split.validation_ratio)
    counts = {s: sum(c.split == s for c in corpus) for s in ("train", "validation", "test")}
    assert counts == {"train": 9, "validation": 1, "test": 2}


@pytest.mark.timeout(60)
def test_a_layer_made_identity_scores_as_most_redundant(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from memlora.student.build import angular_distances, choose_drop, keep_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    scores = angular_distances(model, [[1, 20, 300, 4000, 5], [7, 8, 9]], n=1)
    assert len(scores) == 2 and scores[1] == pytest.approx(0.0, abs=1e-3) and scores[0] > 0.01
    assert choose_drop(scores, 1) == [1]
    assert keep_layers(3, PruneConfig(drop=1), scores) == [0, 2]
    with pytest.raises(ValueError):
        keep_layers(3, PruneConfig(drop=2), [0.1])


def _contrary_traces(out: Path, tokenizer) -> None:
    """Train rows (conversation c1) teach one answer per prompt; validation rows (c2) ask the same prompts with
    other answers, so the more the expert learns c1, the worse it does on c2."""
    from memlora.data.io import write_parquet

    train = trace_rows(tokenizer, "extraction", n=6, bad=0)
    val = []
    for i, row in enumerate(trace_rows(tokenizer, "extraction", n=6, bad=0, with_logprobs=False)):
        answer = '{"facts": ["zebra quartz vintage %d"]}' % i
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        val.append({**row, "conversation_id": "c2", "trace_id": f"c2:extraction:{i}", "raw_output": answer,
                    "parsed_output": answer, "completion_token_ids": ids, "completion_tokens": len(ids)})
    write_parquet(pa.Table.from_pylist(train, schema=TRACES), out / "traces" / "extraction" / "part-c1.parquet",
                  "traces")
    write_parquet(pa.Table.from_pylist(val, schema=TRACES), out / "traces" / "extraction" / "part-c2.parquet",
                  "traces")
    (out / "datasets").mkdir(parents=True)
    pq.write_table(pa.table({"conversation_id": ["c1", "c2"], "split": ["train", "validation"]}),
                   out / "datasets" / "conversations.parquet")


def _distill_contrary(tiny_model_dir, tmp_path, expert: dict | None = None, **distill):
    """The extraction expert of a 2-layer student distilled on `_contrary_traces`: (config, out, base, record)."""
    from transformers import AutoTokenizer

    from memlora.student.build import build_student
    from memlora.student.distill import distill_operation

    out = tmp_path / "out"
    _contrary_traces(out, AutoTokenizer.from_pretrained(tiny_model_dir))
    _, config = distill_config(tmp_path / "c.yaml", str(tiny_model_dir),
                               student={"prune": {"from": "teacher", "keep_layers": [0, 2]}}, expert=expert,
                               max_steps=None, batch_size=3, num_ranks=1, timeout_s=240, **distill)
    base = build_student(config, out)
    return config, out, base, distill_operation(config, out, "extraction", base, on_line=lambda line: None)


@pytest.mark.timeout(300)
def test_early_stopping_keeps_the_best_epoch(tiny_model_dir, tmp_path):
    from tests.test_distill_launcher import reloaded_validation_loss

    config, out, base, record = _distill_contrary(
        tiny_model_dir, tmp_path, expert={"delora_lambda": 15.0},  # large steps: it overfits train at once
        max_epochs=6, patience=2, learning_rate=0.02)
    losses = [e["validation_loss"] for e in record.epochs]
    assert record.validation_rows == 6 and record.rows_used == 6 and all(v is not None for v in losses)
    best = min(range(len(losses)), key=losses.__getitem__) + 1
    assert record.best_epoch == best
    assert record.validation_loss_best == pytest.approx(losses[best - 1], abs=1e-4)
    # Validation got worse epoch after epoch: it stopped `patience` epochs after the best and put it back.
    assert record.stopped_early and len(losses) == best + 2 and record.best_restored, (losses, record.best_epoch)
    assert reloaded_validation_loss(config, out, base, "extraction") == pytest.approx(losses[best - 1], abs=1e-3)
    adapter_config = json.loads((out / "adapters" / "extraction" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "student/base"  # relative to OUT: OUT can be copied


@pytest.mark.timeout(300)
def test_an_operation_trains_the_epochs_given_for_it(tiny_model_dir, tmp_path):
    config, _, _, record = _distill_contrary(tiny_model_dir, tmp_path, max_epochs=5, epochs={"extraction": 2},
                                             patience=0)
    assert config.distill.max_epochs_for("extraction") == 2 and config.distill.max_epochs_for("update") == 5
    assert [e["epoch"] for e in record.epochs] == [1, 2] and record.steps == 2 * 2  # 6 rows, batches of 3


@pytest.mark.timeout(60)
def test_distill_reads_every_trace_file_before_building_anything(smol_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from memlora.student.distill import check_traces
    from memlora.student.launch import TrainingFailed
    from tests.student_fixtures import write_traces

    out = tmp_path / "out"
    with pytest.raises(TrainingFailed, match="no trace files"):
        check_traces(out)
    write_traces(out, AutoTokenizer.from_pretrained(smol_tokenizer_dir))
    assert check_traces(out) == {"extraction": 5, "update": 5, "generation": 5}
    shard = out / "traces" / "update" / "part-c1.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    with pytest.raises(TrainingFailed, match="update/part-c1.parquet"):
        check_traces(out)
    assert not (out / "student").exists()


@pytest.mark.timeout(30)
def test_rare_update_decisions_are_repeated_so_none_does_not_drown_them():
    from memlora.student.examples import Example, oversample_minority, update_event

    assert update_event('{"memory": [{"id": "0", "text": "x", "event": "DELETE"}]}') == "DELETE"
    assert update_event("not json") is None
    make = lambda label: Example([1, 2], [IGNORE, 2], 1, label=label)  # noqa: E731
    examples = [make("NONE")] * 36 + [make("DELETE")] * 4 + [make("ADD")] * 9
    balanced, factors = oversample_minority(examples)
    assert factors == {"NONE": 1, "DELETE": 3, "ADD": 2}
    assert [e.label for e in balanced].count("DELETE") == 12 and [e.label for e in balanced].count("ADD") == 18
    assert oversample_minority([make("NONE")] * 3) == ([make("NONE")] * 3, {})  # one class: nothing to balance


@pytest.mark.timeout(30)
def test_abstaining_generation_targets_are_capped_to_their_share():
    from memlora.student.examples import ABSTAIN, ANSWER, Example, cap_abstaining, label_of

    assert label_of("generation", '{"answer": "Not mentioned in the conversation"}') == ABSTAIN
    assert label_of("generation", '{"answer": "No information available"}') == ABSTAIN
    assert label_of("generation", '{"answer": "in Porto"}') == ANSWER and label_of("generation", "cut") is None
    assert label_of("extraction", '{"facts": []}') is None
    examples = [Example([i], [IGNORE], 1, label=ABSTAIN if i % 5 == 0 else ANSWER) for i in range(100)]
    capped, dropped = cap_abstaining(examples, 0.05)
    abstaining = [e for e in capped if e.label == ABSTAIN]
    assert len(abstaining) == 4 and dropped == 16 and len(capped) == 84  # 4 / 84 <= 5 %, 5 / 85 would not be
    assert [e.input_ids[0] for e in abstaining] == [0, 25, 50, 75]  # evenly spaced, not the first four
    assert cap_abstaining(examples, 0.0)[1] == 20
    assert cap_abstaining(examples, 0.5) == (examples, 0)  # under the cap: nothing dropped


@pytest.mark.timeout(30)
def test_training_batches_group_similar_lengths_and_reshuffle_every_epoch():
    import random

    from memlora.student.trainer import LengthBucketSampler

    rng = random.Random(0)
    lengths = [rng.randint(40, 240) for _ in range(130)]
    sampler = LengthBucketSampler(lengths, batch_size=4)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(130)) and first != second  # every row, new order

    def padded(order):
        return sum(max(lengths[i] for i in order[b : b + 4]) * len(order[b : b + 4]) for b in range(0, 130, 4))

    shuffled = list(range(130))
    rng.shuffle(shuffled)
    assert padded(first) < 0.9 * padded(shuffled)
    assert padded(first) < 1.1 * sum(lengths)


@pytest.mark.timeout(30)
def test_an_expert_retrains_only_when_its_own_recipe_changes(tmp_path):
    from memlora.config import load_config
    from memlora.evaluation.cache import cache_key as evaluation_key
    from memlora.student.distill import config_fingerprint
    from tests.conftest import REPO

    config = load_config(REPO / "configs" / "default.yaml")

    def changed(**distill):
        other = config.model_copy(update={"distill": config.distill.model_copy(update=distill)})
        return {op: config_fingerprint(other, op) != config_fingerprint(config, op)
                for op in ("extraction", "update", "generation")}

    targets = config.distill.targets
    assert changed(targets=targets.model_copy(update={"generation": "gold_supported"})) == {
        "extraction": False, "update": False, "generation": True}
    assert changed(targets=targets.model_copy(update={"balance_update": not targets.balance_update})) == {
        "extraction": False, "update": True, "generation": False}
    assert changed(epochs={"update": 3}) == {"extraction": False, "update": True, "generation": False}
    assert changed(targets=targets.model_copy(update={"event_weight": 5.0})) == {
        "extraction": False, "update": True, "generation": False}
    everything = {"extraction": True, "update": True, "generation": True}
    assert changed(cpu_precision="auto") == everything and changed(cpu_precision="bfloat16") == everything
    assert changed(learning_rate=1e-3) == {"extraction": True, "update": True, "generation": True}
    # the evaluation of a system reads distillation settings only through the experts' files
    other = config.model_copy(update={"distill": config.distill.model_copy(update={"learning_rate": 1e-3})})
    assert evaluation_key(other, tmp_path, "teacher", None) == evaluation_key(config, tmp_path, "teacher", None)
    memory = config.model_copy(update={"memory": config.memory.model_copy(update={"top_k": 2})})
    assert evaluation_key(memory, tmp_path, "teacher", None) != evaluation_key(config, tmp_path, "teacher", None)
