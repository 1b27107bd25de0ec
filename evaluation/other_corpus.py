"""Trained experts evaluated on another corpus's conversations (e.g. real LoCoMo), not on their run's own test
split: the way to check them on conversations nobody tuned anything on.

A new OUT is made from the trained one: its student base and experts (hard links where the file system allows,
else copies; each expert first checked against the trained OUT's manifest) and the other corpus ingested with
every conversation in the test split, cut to its first `sessions` sessions where asked (with only the questions
whose evidence lies in them: the others cannot be answered from what the systems read), with its deferral
thresholds where it has them (`evaluation.served`). The evaluation then runs
on it as on any OUT, so the trained OUT's own evaluation is left as it is; `evaluation.max_conversations` bounds
how many conversations it replays.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from memlora.config import Config
from memlora.data.io import write_json, write_parquet
from memlora.data.loaders import LoadOptions, load_corpus
from memlora.data.records import first_sessions, to_tables
from memlora.evaluation.systems import EvalError
from memlora.layout import ADAPTERS, MANIFEST, conversations_file, deferral_path, questions_file, student_dir
from memlora.student.experts import expert_digests, verified_expert_folders
from memlora.student.records import learnt_by

MARKER = "evaluated_on.json"  # in the new OUT: which trained OUT and which data it was made from


def _link_tree(source: Path, target: Path) -> None:
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)


def prepare_other_corpus(config: Config, data: str | Path, trained: str | Path, out: str | Path,
                         sessions: int | None = None) -> int:
    """Make `out` hold `trained`'s student base and experts and `data`'s conversations, all of them test.
    Returns the number of conversations. An `out` made before from the same `trained` and `data` is reused as
    it is (its evaluation resumes); any other non-empty `out` is refused."""
    trained, out = Path(trained).resolve(), Path(out).resolve()
    if trained == out:
        raise EvalError(f"{out}: --out must be a new folder, not the trained OUT (its own evaluation would be lost)")
    experts = verified_expert_folders(trained)  # before anything is written: an untrusted adapter stops here
    if not experts:
        raise EvalError(f"{trained / ADAPTERS}: no trained expert (run `memlora distill` first)")
    origin = {"trained": str(trained), "data": str(Path(data).resolve()), "sessions": sessions,
              "experts": expert_digests(experts)}
    marker = out / MARKER
    if marker.is_file():
        made = json.loads(marker.read_text())
        made.setdefault("experts", origin["experts"])  # a marker written before the experts were named in it
        if made == origin:
            _copy_thresholds(trained, out)  # calibrated since
            return len(set(_conversation_ids(out)))  # the table has a row per turn
        if {k: v for k, v in made.items() if k != "experts"} == {k: v for k, v in origin.items() if k != "experts"}:
            changed = sorted(op for op in set(made["experts"]) | set(origin["experts"])
                             if made["experts"].get(op) != origin["experts"].get(op))
            raise EvalError(f"{out}: holds the experts {trained} served before ({', '.join(changed)} changed since: "
                            "a promotion, a rollback or a distill); give a new folder to evaluate the current ones")
    if out.exists() and any(out.iterdir()):
        raise EvalError(f"{out}: not empty; give a new folder for the evaluation on {data}")
    corpus = load_corpus(data, LoadOptions(config.data.max_turn_chars, config.data.on_long_turn))
    if sessions:
        corpus = [first_sessions(c, sessions) for c in corpus]
    _refuse_learnt(experts, [c.conversation_id for c in corpus], data, trained)
    for conversation in corpus:
        conversation.split = "test"
    out.mkdir(parents=True, exist_ok=True)
    _link_tree(trained / ADAPTERS, out / ADAPTERS)
    if student_dir(trained).is_dir():
        _link_tree(student_dir(trained), student_dir(out))
    shutil.copy2(trained / MANIFEST, out / MANIFEST)  # lists the experts' checksums, checked again at load
    _copy_thresholds(trained, out)
    conversations, questions = to_tables(corpus)
    write_parquet(conversations, conversations_file(out), "conversations")
    write_parquet(questions, questions_file(out), "questions")
    write_json(origin, marker)  # last: an interrupted preparation is refused next time, not half reused
    return len(corpus)


def _refuse_learnt(experts: dict[str, Path], conversations: list[str], data: str | Path, trained: Path) -> None:
    """Conversations an expert trained or stopped on (by id, from its training.json) are no test of it: refused
    before the new folder is made, not after (the flow's own check would find them in the prepared folder)."""
    if found := learnt_by(experts, conversations):
        operation, _, learnt = found
        raise EvalError(f"{data}: the {operation} expert of {trained} learnt from conversation(s) "
                        f"{', '.join(learnt[:8])}{', ...' if len(learnt) > 8 else ''} of it (by id), which would "
                        "flatter it; give conversations it never saw (its own test conversations: `memlora "
                        f"evaluate --out {trained}`)")


def _copy_thresholds(trained: Path, out: Path) -> None:
    """The trained OUT's deferral thresholds, where it has them: the served systems (`evaluation.served`) run
    under the thresholds calibrated on the trained run's own held-out calls, as they would be served."""
    source, target = deferral_path(trained), deferral_path(out)
    if not source.is_file():
        return
    if target.is_file() and _thresholds(target) == _thresholds(source):
        return  # e.g. rewritten by `memlora calibrate --thresholds-from` with its checks on these conversations
    shutil.copy2(source, target)


def _thresholds(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()).get("operations")
    except (ValueError, AttributeError):
        return None


def _conversation_ids(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(conversations_file(out), columns=["conversation_id"]).column(0).to_pylist()
