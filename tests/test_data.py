import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memlora.config import DataConfig
from memlora.data.ingest import ingest, load_ingested
from memlora.data.io import DataError, read_parquet, write_parquet
from memlora.data.loaders import LoadOptions, load_corpus
from memlora.data.records import to_tables
from memlora.data.schemas import CONVERSATIONS, VERSION_KEY
from memlora.data.split import assign_split

BAD = Path(__file__).parent / "data" / "bad"
EXPECTED = json.loads((BAD / "expected.json").read_text())


def test_bundled_sample_meets_the_brief(sample_path):
    corpus = load_corpus(sample_path)
    assert len(corpus) >= 4
    assert all(len(c.sessions()) >= 3 for c in corpus)
    questions = [q for c in corpus for q in c.questions]
    assert len(questions) >= 20
    assert {1, 2, 3, 4} <= {q.category for q in questions}


def test_locomo_ingest_takes_all_of_it(locomo_path, tmp_path):
    corpus = ingest(locomo_path, tmp_path, DataConfig())
    assert len(corpus) == 10
    assert sum(len(c.turns) for c in corpus) == 5882
    assert sum(len(c.questions) for c in corpus) == 1986
    questions = pq.read_table(tmp_path / "datasets" / "questions.parquet")
    assert questions.num_rows == 1986
    cat5 = questions.filter(pa.compute.equal(questions["category"], 5))
    assert cat5.num_rows == 446
    assert pq.read_table(tmp_path / "datasets" / "conversations.parquet").num_rows == 5882


def test_round_trip_locomo_parquet_jsonl(sample_path, tmp_path):
    corpus = ingest(sample_path, tmp_path / "a", DataConfig())
    # Parquet folder -> same corpus
    again = load_corpus(tmp_path / "a" / "datasets")
    assert [c.conversation_id for c in again] == [c.conversation_id for c in corpus]
    assert to_tables(again)[0].equals(to_tables(corpus)[0])
    assert to_tables(again)[1].equals(to_tables(corpus)[1])
    # JSONL of the normalized form -> same corpus
    lines = []
    for c in corpus:
        for t in c.turns:
            lines.append({"type": "turn", "conversation_id": c.conversation_id, "session": t.session, "turn": t.turn,
                          "dia_id": t.dia_id, "speaker": t.speaker, "text": t.text, "time": t.time.isoformat(),
                          "image_caption": t.image_caption})
        for q in c.questions:
            lines.append({"type": "question", "conversation_id": c.conversation_id, "question": q.question,
                          "answer": q.answer, "adversarial_answer": q.adversarial_answer, "category": q.category,
                          "evidence": list(q.evidence)})
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    from_jsonl = assign_split(load_corpus(jsonl), 0.25, 0)
    assert to_tables(from_jsonl)[0].equals(to_tables(corpus)[0])
    assert to_tables(from_jsonl)[1].equals(to_tables(corpus)[1])
    # Files carry the schema version and load with `datasets` too
    meta = pq.read_schema(tmp_path / "a" / "datasets" / "conversations.parquet").metadata
    assert meta[VERSION_KEY] == b"1"
    assert len(load_ingested(tmp_path / "a")) == len(corpus)


def test_datasets_library_reads_our_parquet(sample_path, tmp_path):
    import datasets

    ingest(sample_path, tmp_path, DataConfig())
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "datasets" / "questions.parquet"), split="train")
    assert ds.num_rows == sum(len(c.questions) for c in load_corpus(sample_path))


def test_split_is_deterministic_and_by_conversation(sample_path):
    a = assign_split(load_corpus(sample_path), 0.25, 0)
    b = assign_split(list(reversed(load_corpus(sample_path))), 0.25, 0)
    assert {c.conversation_id: c.split for c in a} == {c.conversation_id: c.split for c in b}
    assert sum(c.split == "test" for c in a) == 1
    assert any(c.split == "train" for c in a)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_input_is_rejected_with_a_precise_message(name, tmp_path):
    path = BAD / name
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        ingest(path, out, DataConfig())
    message = str(err.value)
    assert str(path) in message or path.name in message or "c1" in message
    for fragment in EXPECTED[name]:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not out.exists() or not any(out.rglob("*.parquet"))


def test_cli_names_the_problem_and_exits_non_zero(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "memlora.cli", "ingest", "--data", str(BAD / "turn_missing_speaker.json"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "turn_missing_speaker.json" in proc.stderr and "'speaker'" in proc.stderr
    assert not out.exists()


def test_ingest_into_an_out_keeps_its_manifest_true(sample_path, tmp_path, capsys):
    """`memlora ingest` describes the datasets it wrote in OUT's manifest (`memlora verify` used to report them as
    differences after another corpus was ingested into an OUT a run had made), split by the run config's `data`."""
    from memlora.cli import main

    out = tmp_path / "out"
    for data in (sample_path, sample_path.with_name("locomo_sample12.json")):
        assert main(["ingest", "--data", str(data), "--out", str(out)]) == 0
        assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{out}: matches its manifest")
    # split by the embedded default's `data` section, as `memlora traces` and `memlora run` split it (9 / 1 / 2)
    splits = [c.split for c in load_ingested(out)]
    assert (splits.count("train"), splits.count("validation"), splits.count("test")) == (9, 1, 2)


def test_long_turn_truncated_or_rejected(tmp_path):
    sample = json.loads((BAD / "turn_missing_speaker.json").read_text())
    sample[0]["conversation"]["session_1"][0]["speaker"] = "Ann"
    sample[0]["conversation"]["session_1"][0]["text"] = "x" * 10_000_000
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(sample))
    corpus = load_corpus(path, LoadOptions(max_turn_chars=1000, on_long_turn="truncate"))
    assert len(corpus[0].turns[0].text) == 1000
    with pytest.raises(DataError, match=r"turn 0 \(D1:1\): field 'text': 10000000 characters"):
        load_corpus(path, LoadOptions(max_turn_chars=1000, on_long_turn="reject"))


def test_parquet_with_wrong_schema_version_is_refused(sample_path, tmp_path):
    ingest(sample_path, tmp_path, DataConfig())
    conv = tmp_path / "datasets" / "conversations.parquet"
    table = pq.read_table(conv)
    pq.write_table(table.replace_schema_metadata({VERSION_KEY: b"0"}), conv)
    with pytest.raises(DataError, match="schema version '0'"):
        load_corpus(tmp_path / "datasets")
    with pytest.raises(DataError, match="missing column"):
        write_parquet(table.drop_columns(["speaker"]), tmp_path / "x" / "c.parquet", "conversations")
        read_parquet(tmp_path / "x" / "c.parquet", "conversations", CONVERSATIONS)


def test_a_byte_order_mark_and_crlf_lines_are_read_as_utf8(sample_path, tmp_path):
    """What Windows tools write: UTF-8 with a BOM, lines ending in CRLF."""
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + sample_path.read_bytes().replace(b"\n", b"\r\n"))
    assert to_tables(load_corpus(bom))[0].equals(to_tables(load_corpus(sample_path))[0])
    line = {"type": "turn", "conversation_id": "c1", "session": 1, "turn": 1, "speaker": "Ann", "text": "hi",
            "time": "2023-05-08T13:56:00"}
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + (json.dumps(line) + "\r\n").encode())
    assert [t.text for t in load_corpus(jsonl)[0].turns] == ["hi"]


def _team_parquet(folder: Path, conversations: pa.Table, questions: pa.Table) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(conversations, folder / "conversations.parquet")
    pq.write_table(questions, folder / "questions.parquet")
    return folder


def test_a_teams_own_parquet_is_read_row_by_row(sample_path, tmp_path):
    """Parquet written by a team's own tools (pandas, Spark): no memlora metadata, none of our derived columns,
    times as text or with a zone. Each row is checked as a JSONL line is, and named by file and row."""
    corpus = ingest(sample_path, tmp_path / "ours", DataConfig())
    conversations, questions = (pq.read_table(tmp_path / "ours" / "datasets" / f"{kind}.parquet")
                                .replace_schema_metadata(None) for kind in ("conversations", "questions"))
    times = pa.compute.strftime(conversations["time"], format="%Y-%m-%dT%H:%M:%S")
    theirs = conversations.drop_columns(["split", "dia_id", "image_caption"]).set_column(
        conversations.schema.get_field_index("time") - 2, "time", times)
    their_questions = questions.drop_columns(["split", "question_id"])
    again = load_corpus(_team_parquet(tmp_path / "theirs", theirs, their_questions))
    assert [(c.conversation_id, len(c.turns), len(c.questions)) for c in again] == \
        [(c.conversation_id, len(c.turns), len(c.questions)) for c in corpus]
    assert [t.time for t in again[0].turns] == [t.time for t in corpus[0].turns]
    assert again[0].questions == corpus[0].questions

    def refused(folder: str, table: pa.Table, qs: pa.Table = their_questions) -> str:
        with pytest.raises(DataError) as err:
            load_corpus(_team_parquet(tmp_path / folder, table, qs))
        return str(err.value)

    sessions = pa.compute.cast(theirs["session"], pa.string())
    message = refused("str-session", theirs.set_column(theirs.schema.get_field_index("session"), "session", sessions))
    assert message.endswith("str-session/conversations.parquet: row 0: field 'session': "
                            "expected a non-negative integer, got '1'")
    texts = theirs["text"].to_pylist()
    texts[5] = None
    message = refused("null-text", theirs.set_column(theirs.schema.get_field_index("text"), "text", pa.array(texts)))
    assert "null-text/conversations.parquet: row 5: field 'text': expected a string, got null" in message
    ids = their_questions["conversation_id"].to_pylist()
    ids[3] = "nobody"  # was silently dropped: a question lost
    message = refused("ghost", theirs, their_questions.set_column(0, "conversation_id", pa.array(ids)))
    assert "ghost/questions.parquet: row 3: field 'conversation_id': 'nobody' is an empty conversation" in message
    assert "missing column(s) speaker" in refused("no-speaker", theirs.drop_columns(["speaker"]))
    no_answers = their_questions.drop_columns(["answer", "adversarial_answer"])
    assert "missing column(s) answer (or adversarial_answer)" in refused("no-answer", theirs, no_answers)
    with pytest.raises(DataError, match="holds 'questions' rows, expected 'conversations'"):
        load_corpus(_team_parquet(tmp_path / "swapped", pq.read_table(tmp_path / "ours" / "datasets" /
                                                                       "questions.parquet"), their_questions))


def test_written_files_are_readable_by_others_as_the_umask_allows(tmp_path):
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    path = write_parquet(pa.table({"a": [1]}), tmp_path / "t.parquet", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's private 0600


def test_atomic_write_leaves_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    table = pa.table({"a": [1, 2]})
    write_parquet(table, path, "x")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="No space left"):
        write_parquet(pa.table({"a": [3]}), path, "x")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def _named(ids, **data):
    from memlora.config import SplitConfig

    return DataConfig(split=SplitConfig(ids=ids), **data)


def test_split_by_named_conversations(sample_path, tmp_path):
    from memlora.data.ingest import prepare_corpus

    ids = {"train": ["sample-3", "sample-1"], "validation": ["sample-2"], "test": ["sample-4"]}
    corpus = prepare_corpus(sample_path, _named(ids))
    assert {c.conversation_id: c.split for c in corpus} == {
        "sample-1": "train", "sample-2": "validation", "sample-3": "train", "sample-4": "test"}
    # a conversation no split names is left out of the run; the ratios are not used
    corpus = prepare_corpus(sample_path, _named({"train": ["sample-2"], "test": ["sample-4"]}))
    assert [(c.conversation_id, c.split) for c in corpus] == [("sample-2", "train"), ("sample-4", "test")]
    ingest(sample_path, tmp_path, _named({"train": ["sample-2"], "test": ["sample-4"]}))
    assert {c.conversation_id for c in load_ingested(tmp_path)} == {"sample-2", "sample-4"}


def test_a_named_split_that_the_data_does_not_hold_stops_before_anything_is_written(sample_path, tmp_path):
    from memlora.data.ingest import prepare_corpus

    bad = _named({"train": ["sample-1", "conv-99"], "test": ["sample-4"]})
    with pytest.raises(DataError) as err:
        prepare_corpus(sample_path, bad)
    assert str(sample_path) in str(err.value) and "'conv-99'" in str(err.value) and "sample-1" in str(err.value)
    with pytest.raises(DataError):
        ingest(sample_path, tmp_path / "out", bad)
    assert not (tmp_path / "out").exists()


def test_a_conversation_in_two_splits_or_no_train_conversation_is_a_config_error():
    from memlora.config import ConfigError, parse_config
    from tests.conftest import TEACHER_REF

    def load(ids):
        return parse_config({"teacher": {"model": TEACHER_REF}, "data": {"split": {"ids": ids}}}, "c.yaml")

    with pytest.raises(ConfigError) as err:
        load({"train": ["a", "b"], "test": ["b"]})
    assert "data.split" in str(err.value) and "'b' is in both train and test" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load({"validation": ["a"], "test": ["b"]})
    assert "at least one train conversation" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load({"train": ["a"], "testing": ["b"]})
    assert "data.split.ids.testing" in str(err.value)


def test_sessions_per_conversation_keeps_the_questions_those_sessions_answer(sample_path):
    from memlora.data.ingest import prepare_corpus

    whole = {c.conversation_id: c for c in prepare_corpus(sample_path, DataConfig())}
    cut = prepare_corpus(sample_path, DataConfig(sessions_per_conversation=1))
    for conv in cut:
        full = whole[conv.conversation_id]
        first = full.sessions()[0][0]
        assert {t.session for t in conv.turns} == {first} and len(conv.turns) < len(full.turns)
        kept = {t.dia_id for t in conv.turns}
        assert all(q.evidence and set(q.evidence) <= kept for q in conv.questions)
        assert [q for q in full.questions if q.evidence and set(q.evidence) <= kept] == conv.questions


def test_the_locomo_protocol_config_splits_locomo_as_the_paper_does(locomo_path):
    from memlora.config import load_config
    from memlora.data.ingest import prepare_corpus
    from tests.conftest import REPO

    config = load_config(REPO / "configs" / "locomo.yaml")
    assert config.memory == load_config(REPO / "configs" / "default.yaml").memory  # the default's recipe
    corpus = prepare_corpus(locomo_path, config.data)
    by_split = {s: [c.conversation_id for c in corpus if c.split == s] for s in ("train", "validation", "test")}
    # LoCoMo's conversations in file order: 4-10 train, 1 validates, 2-3 test
    order = [c.conversation_id for c in load_corpus(locomo_path)]
    assert by_split == {"train": order[3:], "validation": order[:1], "test": order[1:3]}
    assert all(len(c.sessions()) == 2 for c in corpus)
    assert sum(len(c.turns) for c in corpus if c.split == "train") == 327
    assert sum(len(c.questions) for c in corpus if c.split == "test") == 32
