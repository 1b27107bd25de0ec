"""Loaders for the three accepted input forms, each validating as it goes.

Every error names the file, the record (sample / session / turn, or line, or row) and the field, because a
batch job that fails at 3 am must say exactly what to fix.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from memlora.data.io import DataError
from memlora.data.records import SAFE_ID, Conversation, Question, Turn
from memlora.data.schemas import KIND_KEY, SCHEMA_VERSION, VERSION_KEY
from memlora.data.split import SPLITS

log = logging.getLogger("memlora.data")

LOCOMO_TIME = "%I:%M %p on %d %B, %Y"
SESSION_KEY = re.compile(r"^session_(\d+)$")


@dataclass(frozen=True)
class LoadOptions:
    max_turn_chars: int = 8000
    on_long_turn: str = "truncate"  # or "reject"


def load_corpus(path: str | Path, options: LoadOptions = LoadOptions()) -> list[Conversation]:
    """Load a LoCoMo JSON file, a normalized JSONL file, or a folder of normalized Parquet."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        corpus = _load_parquet_folder(path, options)
    elif path.suffix == ".jsonl":
        corpus = _load_jsonl(path, options)
    elif path.suffix == ".parquet":
        raise DataError(f"{path}: give the folder holding conversations.parquet and questions.parquet")
    else:
        corpus = _load_locomo(path, options)
    if not corpus:
        raise DataError(f"{path}: no conversations in it")
    return corpus


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (Windows tools write one) is not part of the data
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from None


def _check_id(where: str, value) -> str:
    if not isinstance(value, str) or not SAFE_ID.match(value):
        raise DataError(
            f"{where}: field 'conversation_id': {value!r} is not a safe id (letters, digits, '.', '_', '-'; "
            "no path separators)"
        )
    return value


def _text_field(where: str, record: dict, name: str, *, allow_empty: bool = False) -> str:
    if name not in record:
        raise DataError(f"{where}: field {name!r}: missing")
    value = record[name]
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise DataError(f"{where}: field {name!r}: expected a string, got {got}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {name!r}: empty")
    return value


def _limit_text(where: str, text: str, options: LoadOptions) -> str:
    if len(text) <= options.max_turn_chars:
        return text
    if options.on_long_turn == "reject":
        raise DataError(f"{where}: field 'text': {len(text)} characters, over the limit of {options.max_turn_chars}")
    log.warning("%s: field 'text' truncated from %d to %d characters", where, len(text), options.max_turn_chars)
    return text[: options.max_turn_chars]


def _parse_time(where: str, field: str, value) -> datetime:
    if isinstance(value, datetime):  # a Parquet timestamp column
        return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo else value
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r}: expected a date string, got {type(value).__name__}")
    for fmt in (LOCOMO_TIME,):
        try:
            return datetime.strptime(value.strip(), fmt)
        except ValueError:
            pass
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise DataError(
            f"{where}: field {field!r}: {value!r} is not a date like '1:56 pm on 8 May, 2023' or ISO 8601"
        ) from None


def _question(where: str, record, index: int) -> Question:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    question = _text_field(where, record, "question")
    answers = {}
    for name in ("answer", "adversarial_answer"):
        value = record.get(name)
        if isinstance(value, bool) or not (value is None or isinstance(value, (str, int, float))):
            raise DataError(f"{where}: field {name!r}: expected a string or number, got {type(value).__name__}")
        answers[name] = None if value is None else str(value)
    if answers["answer"] is None and answers["adversarial_answer"] is None:
        raise DataError(f"{where}: field 'answer': missing (and no 'adversarial_answer' either)")
    category = record.get("category")
    if isinstance(category, bool) or not isinstance(category, int) or not 1 <= category <= 5:
        raise DataError(f"{where}: field 'category': expected an integer 1-5, got {category!r}")
    evidence = record.get("evidence", [])
    if not isinstance(evidence, list) or not all(isinstance(e, str) for e in evidence):
        raise DataError(f"{where}: field 'evidence': expected a list of dia_id strings")
    # Category-5 questions carry the trap under `adversarial_answer`: kept for reference, never the gold.
    return Question(
        question_id=index,
        question=question,
        answer=answers["answer"],
        adversarial_answer=answers["adversarial_answer"],
        category=category,
        evidence=tuple(evidence),
    )


def _load_locomo(path: Path, options: LoadOptions) -> list[Conversation]:
    text = _read_text(path)
    try:
        samples = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(samples, list):
        raise DataError(f"{path}: expected a JSON list of LoCoMo samples, got {type(samples).__name__}")
    corpus: list[Conversation] = []
    seen: set[str] = set()
    for i, sample in enumerate(samples):
        where = f"{path}: sample {i}"
        if not isinstance(sample, dict):
            raise DataError(f"{where}: expected an object, got {type(sample).__name__}")
        cid = _check_id(where, sample.get("sample_id", f"sample-{i}"))
        where = f"{path}: sample {i} ({cid})"
        if cid in seen:
            raise DataError(f"{where}: field 'sample_id': duplicate of an earlier sample")
        seen.add(cid)
        conv = sample.get("conversation")
        if conv is None:
            raise DataError(f"{where}: field 'conversation': missing")
        if not isinstance(conv, dict):
            raise DataError(f"{where}: field 'conversation': expected an object, got {type(conv).__name__}")
        turns = _locomo_turns(where, conv, options)
        qa = sample.get("qa", [])
        if not isinstance(qa, list):
            raise DataError(f"{where}: field 'qa': expected a list, got {type(qa).__name__}")
        questions = [_question(f"{where}, qa {j}", q, j) for j, q in enumerate(qa)]
        corpus.append(Conversation(cid, turns, questions))
    return corpus


def _locomo_turns(where: str, conv: dict, options: LoadOptions) -> list[Turn]:
    sessions = sorted((int(m.group(1)), key) for key in conv if (m := SESSION_KEY.match(key)))
    if not sessions:
        raise DataError(f"{where}: field 'conversation': empty conversation (no session_N keys)")
    turns: list[Turn] = []
    dia_ids: set[str] = set()
    for number, key in sessions:
        swhere = f"{where}, {key}"
        items = conv[key]
        if not isinstance(items, list):
            raise DataError(f"{swhere}: expected a list of turns, got {type(items).__name__}")
        if not items:
            raise DataError(f"{swhere}: session has no turns")
        time_key = f"{key}_date_time"
        if time_key not in conv:
            raise DataError(f"{swhere}: field {time_key!r}: missing")
        time = _parse_time(swhere, time_key, conv[time_key])
        for j, item in enumerate(items):
            twhere = f"{swhere}, turn {j}"
            if not isinstance(item, dict):
                raise DataError(f"{twhere}: expected an object, got {type(item).__name__}")
            dia_id = _text_field(twhere, item, "dia_id")
            twhere = f"{swhere}, turn {j} ({dia_id})"
            if dia_id in dia_ids:
                raise DataError(f"{twhere}: field 'dia_id': duplicate {dia_id!r}")
            dia_ids.add(dia_id)
            caption = item.get("blip_caption")
            turns.append(
                Turn(
                    session=number,
                    turn=j + 1,
                    dia_id=dia_id,
                    speaker=_text_field(twhere, item, "speaker"),
                    text=_limit_text(twhere, _text_field(twhere, item, "text", allow_empty=True), options),
                    time=time,
                    image_caption=caption if isinstance(caption, str) else None,
                )
            )
    return turns


def _load_jsonl(path: Path, options: LoadOptions) -> list[Conversation]:
    """Normalized JSONL: one object per line, `"type": "turn"` or `"type": "question"`, table columns as fields."""
    return _load_records(path, _jsonl_records(path), options)


def _jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON at column {err.colno}: {err.msg}") from None


def _load_records(source: Path, records: Iterable[tuple[str, object]], options: LoadOptions) -> list[Conversation]:
    """The normalized form's records (a JSONL line, a Parquet row), each checked where it stands."""
    by_id: dict[str, Conversation] = {}
    first_seen: dict[str, str] = {}
    dia_ids: set[tuple[str, str]] = set()
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object, got {type(record).__name__}")
        cid = _check_id(where, record.get("conversation_id"))
        conv = by_id.setdefault(cid, Conversation(cid, []))
        first_seen.setdefault(cid, where)
        if record.get("split") in SPLITS:  # a release's own split, kept as it was (ingest draws it again)
            conv.split = record["split"]
        kind = record.get("type")
        if kind == "turn":
            for name in ("session", "turn"):
                value = record.get(name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise DataError(f"{where}: field {name!r}: expected a non-negative integer, got {value!r}")
            dia_id = record.get("dia_id") or f"D{record['session']}:{record['turn']}"
            if (cid, dia_id) in dia_ids:
                raise DataError(f"{where}: field 'dia_id': duplicate {dia_id!r} in {cid}")
            dia_ids.add((cid, dia_id))
            caption = record.get("image_caption")
            conv.turns.append(
                Turn(
                    session=record["session"],
                    turn=record["turn"],
                    dia_id=dia_id,
                    speaker=_text_field(where, record, "speaker"),
                    text=_limit_text(where, _text_field(where, record, "text", allow_empty=True), options),
                    time=_parse_time(where, "time", record.get("time")),
                    image_caption=caption if isinstance(caption, str) else None,
                )
            )
        elif kind == "question":
            conv.questions.append(_question(where, record, len(conv.questions)))
        else:
            raise DataError(f"{where}: field 'type': expected 'turn' or 'question', got {kind!r}")
    for cid, conv in by_id.items():
        if not conv.turns:
            raise DataError(f"{first_seen[cid]}: field 'conversation_id': {cid!r} is an empty conversation "
                            f"(questions but no turns in {source})")
        conv.turns.sort(key=lambda t: (t.session, t.turn))
    return list(by_id.values())


# A Parquet folder may come from `ingest` (a release) or from a team's own writer (pandas, Spark): only these
# columns must be there; `split`, `question_id` and the rest are ours and are worked out again.
PARQUET_COLUMNS = {
    "conversations": ("conversation_id", "session", "turn", "speaker", "text", "time"),
    "questions": ("conversation_id", "question", "category"),
}


def _load_parquet_folder(path: Path, options: LoadOptions) -> list[Conversation]:
    files = {kind: path / f"{kind}.parquet" for kind in PARQUET_COLUMNS}
    for f in files.values():
        if not f.is_file():
            raise DataError(f"{f}: missing (a Parquet input folder holds conversations.parquet and questions.parquet)")
    rows = chain(_parquet_records(files["conversations"], "conversations", "turn"),
                 _parquet_records(files["questions"], "questions", "question"))
    return _load_records(path, rows, options)


def _parquet_records(path: Path, kind: str, record_type: str) -> Iterator[tuple[str, dict]]:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    meta = table.schema.metadata or {}
    version, found_kind = meta.get(VERSION_KEY), meta.get(KIND_KEY, b"").decode()
    if version is not None and version.decode() != SCHEMA_VERSION:
        raise DataError(f"{path}: schema version {version.decode()!r}, expected {SCHEMA_VERSION!r} "
                        "(field memlora.schema_version)")
    if found_kind and found_kind != kind:
        raise DataError(f"{path}: holds {found_kind!r} rows, expected {kind!r}")
    missing = [name for name in PARQUET_COLUMNS[kind] if name not in table.column_names]
    if kind == "questions" and not {"answer", "adversarial_answer"} & set(table.column_names):
        missing.append("answer (or adversarial_answer)")
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    for i, row in enumerate(table.to_pylist()):
        row["type"] = record_type
        if kind == "questions" and row.get("evidence") is None:
            row["evidence"] = []  # a null list is no evidence named
        yield f"{path}: row {i}", row
