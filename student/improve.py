"""`improve`: learn from the calls that arrived since the served experts were trained (captured and deferred ones),
and promote what is better, per operation, through the gate (`evaluation.gate`).

Candidates train in an OUT of their own (OUT/candidates/<stamp>/, with OUT's traces, datasets and student linked
in), so the served experts are never touched by a training that fails or is worse. Promotion snapshots the served
set as a version first (`student.versions`), installs the promoted experts, and recalibrates deferral; a running
serve-experts picks the new version up by itself (`llm.reload`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from memlora.config import OPERATIONS, Config
from memlora.data.compaction import rows_not_from
from memlora.data.io import write_parquet
from memlora.evaluation import deferral
from memlora.evaluation.gate import Decision, decide
from memlora.layout import (
    ADAPTERS, DATASETS, TEMPLATES, TRACES, adapter_dir, candidate_dir, candidates_root, decisions_path, trace_files,
)
from memlora.llm.grammar import GrammarCache
from memlora.student.distill import cache_key
from memlora.student.examples import load_traces
from memlora.student.experts import ExpertBackend, adapter_config, verified_expert_folders
from memlora.student.records import TRAINING_FILE, TrainingRecord
from memlora.student.templates import ensure_templates
from memlora.student.versions import install, prune_versions, snapshot, verified_version

log = logging.getLogger(__name__)

DECISIONS = pa.schema([
    pa.field("run", pa.string(), nullable=False),
    pa.field("operation", pa.string(), nullable=False),
    pa.field("new_rows", pa.int64(), nullable=False),
    pa.field("promote", pa.bool_(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("n", pa.int64(), nullable=False),
    pa.field("current", pa.float64()),
    pa.field("candidate", pa.float64()),
    pa.field("difference", pa.float64()),
    pa.field("ci_low", pa.float64()),
    pa.field("ci_high", pa.float64()),
    pa.field("current_keep", pa.float64()),
    pa.field("candidate_keep", pa.float64()),
    pa.field("version", pa.string()),  # the version snapshotted before the promotion (what rollback restores)
])


@dataclass(frozen=True)
class Candidate:
    run: str
    out: Path
    new_rows: dict[str, int]
    init: dict[str, Path] = field(default_factory=dict)  # warm start: the served expert each operation starts from


def new_rows(config: Config, out: str | Path) -> dict[str, int]:
    """Per operation with traces, the parse_ok rows the served expert has not been trained on (its training
    record's traces differ from OUT's now); 0 where nothing changed."""
    counts = {}
    for op in OPERATIONS:
        files = trace_files(out, op)
        if not files:
            continue
        record_file = adapter_dir(out, op) / TRAINING_FILE
        record = TrainingRecord.read(record_file) if record_file.is_file() else None
        if record is not None and record.traces_sha256 == cache_key(config, out, op)["traces_sha256"]:
            counts[op] = 0
            continue
        if record is not None and record.trace_files:  # by shard: the rows of calls it was not trained on
            counts[op] = max(1, sum(rows_not_from(files, set(record.trace_files)).column("parse_ok").to_pylist()))
            continue
        usable = sum(load_traces(files).column("parse_ok").to_pylist())
        counts[op] = max(1, usable - (record.rows_total if record is not None else 0))
    return counts


def prepare_candidate(config: Config, out: str | Path, counts: dict[str, int]) -> Candidate:
    """A new OUT for the candidates, reading OUT's traces, datasets and student through links."""
    run = time.strftime("%Y%m%dT%H%M%S")
    prune_candidates(out, config.improve.keep_candidates - 1)
    folder = candidate_dir(out, run)
    (folder / ADAPTERS).mkdir(parents=True)
    if config.student is not None and config.student.prompt == "minimal":
        ensure_templates(config, out)  # mined in OUT, so that candidate and served experts read calls alike
    for name in (TRACES, DATASETS, "student", TEMPLATES):
        if (Path(out) / name).exists():
            os.symlink(Path(out).resolve() / name, folder / name)
    ops = [op for op, n in counts.items() if n]
    return Candidate(run, folder, {op: counts[op] for op in ops}, warm_starts(config, out, ops))


def prune_candidates(out: str | Path, keep: int) -> list[str]:
    """Remove all but the newest `keep` candidate folders (by run stamp); returns the runs removed. Their links to
    OUT's traces, datasets and student are removed as links: what they point at stays."""
    root = candidates_root(out)
    runs = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()) if root.is_dir() else []
    gone = runs[: max(len(runs) - keep, 0)]
    for folder in gone:
        shutil.rmtree(folder)
    if gone:
        log.info("removed %d earlier candidate folder(s) under %s (improve.keep_candidates): %s", len(gone), root,
                 ", ".join(p.name for p in gone))
    return [p.name for p in gone]


def warm_starts(config: Config, out: str | Path, operations: list[str]) -> dict[str, Path]:
    """The served experts candidates start from (`improve.warm_start`), by operation; an operation left out
    starts fresh: warm start off, no served expert, or one whose adapter shape (method, rank, target modules) the
    config no longer asks for."""
    if not config.improve.warm_start or config.student is None:
        return {}
    served = verified_expert_folders(out)  # every adapter checked against the manifest once
    wanted = _shape(adapter_config(config.student.expert).to_dict())
    return {op: served[op] for op in operations if op in served
            and _shape(json.loads((served[op] / "adapter_config.json").read_text())) == wanted}


def _shape(adapter: dict) -> tuple:
    kind = adapter.get("peft_type")
    return getattr(kind, "value", kind), adapter.get("r"), sorted(adapter.get("target_modules") or [])


def backend_for(config: Config, base: str | Path, adapters: dict[str, Path],
                grammars: GrammarCache | None = None) -> ExpertBackend:
    """`grammars`: an earlier backend's of this run (the current and candidate experts read the same schemas)."""
    return ExpertBackend.from_config(config, base, adapters, prompt=config.student.prompt if config.student
                                     else "teacher", grammars=grammars)


def gate(config: Config, out: str | Path, base: str | Path, candidate: Candidate) -> list[Decision]:
    """Current and candidate experts on the same held-out calls (test share and test conversations), and their
    calls kept at the budget on the validation calls."""
    current_adapters = verified_expert_folders(out)
    candidate_adapters = verified_expert_folders(candidate.out)
    ops = [op for op in candidate.new_rows if op in candidate_adapters]
    tests = deferral.test_calls(out, config, ops)
    held = deferral.validation_calls(out, config, ops)
    scored, grammars = {}, None
    for name, adapters in (("current", current_adapters), ("candidate", candidate_adapters)):
        backend = backend_for(config, base, adapters, grammars)
        grammars = backend.grammars
        scored[name] = (deferral.score(backend, backend.tokenizer, tests, config),
                        deferral.score(backend, backend.tokenizer, held, config))
        del backend
    decisions = []
    for op in ops:
        pick = [i for i, c in enumerate(tests) if c.operation == op]
        if op not in current_adapters:  # nothing serves this operation yet: the first expert goes in
            decisions.append(Decision(op, True, "no current expert for this operation", len(pick), *[float("nan")] * 5,
                                      0.0, 0.0))
            continue
        decisions.append(decide(
            op, [scored["current"][0][i] for i in pick], [scored["candidate"][0][i] for i in pick],
            [tests[i].conversation_id for i in pick],
            [s for s in scored["current"][1] if s.operation == op],
            [s for s in scored["candidate"][1] if s.operation == op],
            margin=config.improve.margin, budget=config.deferral.budget, samples=config.improve.samples,
            min_clusters=config.improve.min_clusters))
    return decisions


def promote(config: Config, out: str | Path, base: str | Path, candidate: Candidate,
            decisions: list[Decision]) -> str | None:
    """Snapshot the served set, install the promoted experts, recalibrate deferral (with nothing promoted, still
    where the served experts have answered new calls). Returns the snapshot's version (None when nothing was
    promoted)."""
    promoted = {d.operation: adapter_dir(candidate.out, d.operation) for d in decisions if d.promote}
    if not promoted:  # where the served experts answered calls since (or were replaced), their thresholds follow
        recalibrate(config, out, base, only_with_new_calls=not deferral.stale_thresholds(out))
        return None
    version = snapshot(out, f"before improve {candidate.run}") if verified_expert_folders(out) else None
    install(out, promoted)
    try:
        recalibrate(config, out, base)
    except BaseException:  # new experts must not serve under the old experts' thresholds: the old set comes back
        if version is not None:
            install(out, verified_version(out, version))
        raise
    if config.improve.keep_versions is not None:
        gone = prune_versions(out, config.improve.keep_versions)
        if gone:
            log.info("removed %d earlier version(s) (improve.keep_versions %d): %s", len(gone),
                     config.improve.keep_versions, ", ".join(gone))
    return version


def recalibrate(config: Config, out: str | Path, base: str | Path, *,
                only_with_new_calls: bool = False) -> dict | None:
    """New thresholds for the served experts (as `memlora calibrate`): on the validation calls, and on the calls
    each expert has not been trained on since it was; none where there are no such calls (with
    `only_with_new_calls`: none where none of the latter arrived)."""
    adapters = verified_expert_folders(out)
    fresh = deferral.fresh_calls(out, config, list(adapters))
    if only_with_new_calls and not fresh:
        return None
    held = deferral.validation_calls(out, config, list(adapters)) + fresh
    if not held:
        return None
    backend = backend_for(config, base, adapters)
    return deferral.calibrate_out(config, out, backend, sorted({c.operation for c in held}), held)


def record_decisions(out: str | Path, candidate: Candidate, decisions: list[Decision], version: str | None) -> Path:
    """Append this run's decisions to OUT/improve/decisions.parquet (rewritten atomically)."""
    import pyarrow.parquet as pq

    path = decisions_path(out)
    rows = pq.read_table(path).to_pylist() if path.is_file() else []
    rows += [{**d.to_row(), "run": candidate.run, "new_rows": candidate.new_rows.get(d.operation, 0),
              "version": version} for d in decisions]
    nan_free = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]
    return write_parquet(pa.Table.from_pylist(nan_free, schema=DECISIONS), path, "decisions")
