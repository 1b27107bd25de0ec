"""Distil one expert per operation: decide what is already done, and launch the rest (one launch)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from memlora.config import OPERATIONS, Config
from memlora.data.io import DataError, sha256_file
from memlora.data.compaction import rows_not_from, sources
from memlora.evaluation.calibration import SERVED_BACKENDS
from memlora.layout import adapter_dir, decisions_path, deferral_path, trace_files
from memlora.manifest import update_manifest
from memlora.student.examples import conversation_splits, load_traces, side_of, split_conversations, \
    traces_fingerprint
from memlora.student.experts import expert_folders, is_complete_adapter
from memlora.student.launch import ExpertJob, TrainingFailed, run_trainings
from memlora.student.records import TRAINING_FILE, DistillResult, NoExpert, TrainingRecord
from memlora.student.templates import ensure_templates, template_for
from memlora.student.versions import snapshot

# The target settings each operation's expert depends on: changing how generation targets are made retrains the
# generation expert only.
TARGET_SETTINGS = {"extraction": ("dedupe_facts", "near_duplicate"),
                   "update": ("drop_redundant_none", "balance_update", "event_weight"),
                   "generation": ("generation", "max_abstain_share")}


def config_fingerprint(config: Config, operation: str | None = None) -> str:
    """sha256 of what decides an expert besides its traces: teacher, student and distillation settings (not
    the timeout, which only decides when to give up); for one `operation`, only its epochs and target settings."""
    distill = config.distill.model_dump(mode="json", exclude={"timeout_s"})
    if distill["cpu_precision"] == "float32":
        del distill["cpu_precision"]  # the default: experts trained before the setting existed stay current
    if distill["targets"]["event_weight"] == 1.0:
        del distill["targets"]["event_weight"]  # likewise
    if operation is not None:
        distill.pop("epochs")
        distill["max_epochs"] = config.distill.max_epochs_for(operation)
        distill["targets"] = {k: v for k, v in distill["targets"].items()
                              if k in TARGET_SETTINGS.get(operation, tuple(distill["targets"]))}
    recipe = {
        "teacher": [config.teacher.model, config.teacher.tokenizer],
        "student": config.student.model_dump(mode="json", by_alias=True) if config.student else None,
        "distill": distill,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def cache_key(config: Config, out: str | Path, operation: str, init: Path | None = None) -> dict:
    """Same traces + same recipe (+ the same starting adapter, when warm-started) = same expert: a finished one is
    not trained again."""
    traces = traces_fingerprint(trace_files(out, operation))
    fingerprint = config_fingerprint(config, operation)
    start = sha256_file(Path(init) / "adapter_model.safetensors") if init is not None else ""
    template = template_for(config, out, operation)
    key = hashlib.sha256((f"{operation}:{traces}:{fingerprint}{':' + start if start else ''}"
                          f"{':template=' + template.fingerprint if template else ''}").encode()).hexdigest()
    return {"key": key, "traces_sha256": traces, "config_fingerprint": fingerprint, "init_sha256": start}


def finished_record(config: Config, out: str | Path, operation: str,
                    init: Path | None = None) -> TrainingRecord | None:
    folder = adapter_dir(out, operation)
    record_file = folder / TRAINING_FILE
    if not (is_complete_adapter(folder) and record_file.is_file()):
        return None
    record = TrainingRecord.read(record_file)
    if record.cache_key != cache_key(config, out, operation, init)["key"]:
        return None
    return record if same_split(record, out, operation) else None


def same_split(record: TrainingRecord, out: str | Path, operation: str, exact: bool = True) -> bool:
    """Whether the traces' conversations fall on the same side now as when `record`'s expert trained: the cache key
    covers traces and recipe, not OUT's split, which another corpus ingested into OUT changes (a conversation the
    expert trained on may now be a test one). `exact` False: only that each conversation it learnt from is still on
    its side (calls captured since are improve's to learn). Records from before the split was kept cannot tell."""
    if not (record.train_conversations or record.validation_conversations):
        return True
    splits = conversation_splits(out)
    if exact:
        return split_conversations(load_traces(trace_files(out, operation)), splits) == (
            record.train_conversations, record.validation_conversations)
    return all(side_of(c, splits) == "train" for c in record.train_conversations) and all(
        side_of(c, splits) == "validation" for c in record.validation_conversations)


def served_record(config: Config, out: str | Path, operation: str,
                  init: Path | None = None) -> tuple[TrainingRecord | None, int]:
    """The served expert's record, and the calls it has not seen, where OUT serves through the loop (calibrated
    thresholds, or `improve` has decided before) and all that changed since it was trained, with the same recipe,
    is calls served (captured, deferred, audited): those go through `improve`'s gate, never straight into the
    served expert (the nightly pipeline on the same OUT would otherwise retrain it on them). Else (None, 0)."""
    folder, loop = adapter_dir(out, operation), deferral_path(out).is_file() or decisions_path(out).is_file()
    if init is not None or not loop or not (is_complete_adapter(folder) and (folder / TRAINING_FILE).is_file()):
        return None, 0
    record = TrainingRecord.read(folder / TRAINING_FILE)
    if not record.trace_files or record.config_fingerprint != config_fingerprint(config, operation) or not \
            same_split(record, out, operation, exact=False):
        return None, 0
    files = trace_files(out, operation)
    held = {f.name for f in files} | {s.name for f in files for s in (sources(f) or ())}
    if not set(record.trace_files) <= held:  # a trace file it was trained on is gone: not only additions
        return None, 0
    new = rows_not_from(files, set(record.trace_files))
    if not new.num_rows or not set(new.column("backend").to_pylist()) <= SERVED_BACKENDS:
        return None, 0
    return record, new.num_rows


def check_traces(out: str | Path) -> dict[str, int]:
    """Read every trace file distillation will need before anything expensive starts (the student base takes
    a minute to build; a truncated update shard used to surface only after the extraction expert had trained).
    Returns parse_ok rows per operation; raises TrainingFailed naming the file or folder."""
    if not any(trace_files(out, op) for op in OPERATIONS):
        raise TrainingFailed(f"{Path(out) / 'traces'}: no trace files (run `memlora traces` first)")
    usable = {}
    for op in OPERATIONS:
        try:
            usable[op] = sum(load_traces(trace_files(out, op)).column("parse_ok").to_pylist())
        except DataError as err:
            raise TrainingFailed(str(err)) from None
    return usable


def distill_operations(config: Config, out: str | Path, operations: list[str], base: Path,
                       on_line: Callable[[str], None] = print,
                       init: dict[str, Path] | None = None) -> dict[str, DistillResult]:
    """Train the experts of `operations` on OUT's traces: those not already done, in one DeepSpeed launch, one after
    another (each uses every core or GPU it is given); `init`: per operation, an adapter folder to start from
    instead of a fresh expert (improve's warm start)."""
    init = init or {}
    results = {op: plan_operation(config, out, op, init.get(op), on_line) for op in operations}
    jobs = [job for job in results.values() if isinstance(job, ExpertJob)]
    served = expert_folders(out)
    replaced = sorted(job.operation for job in jobs if job.operation in served)
    if replaced:  # the experts OUT serves now stay as a version (`memlora rollback`), their thresholds with them
        version = snapshot(out, f"before distill retrained {', '.join(replaced)}")
        on_line(f"{', '.join(replaced)}: retraining on changed traces, recipe or split; the experts served until now "
                f"are kept as version {version} (`memlora rollback --to {version}`)")
    if jobs:
        # each new expert's sha256 goes into the manifest as it is saved, checked before anything loads it
        records = run_trainings(config, str(out), str(base), jobs, on_line, on_record=lambda _: update_manifest(out))
        results.update({op: TrainingRecord.from_dict(record) for op, record in records.items()})
    return results


def distill_operation(config: Config, out: str | Path, operation: str, base: Path,
                      on_line: Callable[[str], None] = print, init: Path | None = None) -> DistillResult:
    """`operation`'s expert alone (`distill_operations`)."""
    return distill_operations(config, out, [operation], base, on_line, {operation: init} if init else None)[operation]


def plan_operation(config: Config, out: str | Path, operation: str, init: Path | None,
                   on_line: Callable[[str], None]) -> DistillResult | ExpertJob:
    """What `operation` needs: no expert (said why, loudly), the finished expert kept, or a training job."""
    if not trace_files(out, operation):
        if not any(trace_files(out, op) for op in OPERATIONS):
            raise TrainingFailed(f"{Path(out) / 'traces'}: no trace files (run `memlora traces` first)")
        # Other operations have traces: a captured memory system need not make every kind of call (Mem0's add()
        # extracts and updates; it never asks a question). No expert, said loudly.
        on_line(f"WARNING {operation}: no trace files under {Path(out) / 'traces' / operation}; no expert")
        return NoExpert(operation, "no trace files for this operation")
    usable = sum(load_traces(trace_files(out, operation)).column("parse_ok").to_pylist())
    if usable == 0:
        # Nothing to learn from (e.g. the teacher extracted no facts, so no update calls): no expert, and the
        # memory system runs this operation on the bare student. Said loudly, recorded in the manifest.
        on_line(f"WARNING {operation}: no parse_ok trace rows; no expert trained for it")
        return NoExpert(operation, "no parse_ok trace rows")
    if config.student is not None and config.student.prompt == "minimal":
        ensure_templates(config, out, [operation], on_line=on_line)  # a captured client's fixed prompt, mined once
    done = finished_record(config, out, operation, init)
    if done is not None:
        on_line(f"{operation}: expert already trained on these traces with this recipe; kept")
        done.skipped = True
        return done
    served, calls = served_record(config, out, operation, init)
    if served is not None:
        on_line(f"{operation}: the {calls} calls served since this expert was trained are `memlora improve`'s to "
                "learn from (candidates promoted through its gate); the served expert is kept")
        served.skipped = True
        return served
    return ExpertJob(operation, cache_key(config, out, operation, init), str(init) if init is not None else None)
