"""Every path under OUT, by name: the README's artifact table in code, and the only place that spells it.

Stages, the manifest and the release take their paths from here, so moving a file is a change to one line.
Evaluation systems have folders named by `system_folder` (`student+experts` -> `student-experts`).
"""

from __future__ import annotations

from pathlib import Path

from memlora.data.compaction import live

MANIFEST = "manifest.json"
DATASETS, TRACES, ADAPTERS, EVAL = "datasets", "traces", "adapters", "eval"
TEMPLATES, EXPORT = "templates", "export"
TRACKED = (DATASETS, TRACES, TEMPLATES, ADAPTERS, EXPORT, EVAL)  # what OUT/manifest.json lists with sha256s
RELEASED = (DATASETS, TRACES, EVAL)           # what a dataset release copies


# --- datasets, traces, memory stores -------------------------------------------------------------------------

def datasets_dir(out: str | Path) -> Path:
    return Path(out) / DATASETS


def conversations_file(out: str | Path) -> Path:
    return datasets_dir(out) / "conversations.parquet"


def questions_file(out: str | Path) -> Path:
    return datasets_dir(out) / "questions.parquet"


def traces_root(out: str | Path) -> Path:
    return Path(out) / TRACES


def traces_dir(out: str | Path, operation: str) -> Path:
    return traces_root(out) / operation


def shard_path(out: str | Path, operation: str, conversation_id: str) -> Path:
    return traces_dir(out, operation) / f"part-{conversation_id}.parquet"


def capture_shard_path(out: str | Path, operation: str, call_id: str) -> Path:
    """One captured call (`memlora capture`): a shard of its own, read with the traced ones."""
    return traces_dir(out, operation) / f"part-capture-{call_id}.parquet"


def trace_files(out: str | Path, operation: str) -> list[Path]:
    """An operation's trace files; a captured shard that a merged file also holds (a compaction cut short) is
    left out (`data.compaction`)."""
    return live(sorted(traces_dir(out, operation).glob("part-*.parquet")))


def memory_store(out: str | Path, name: str) -> Path:
    """A SQLite memory store: `teacher` (traces), `teacher-<conversation>` (a task with its own store), or
    `eval-<system folder>` (each evaluated system's own)."""
    return Path(out) / "memory" / f"{name}.sqlite"


# --- student, experts, exports ---------------------------------------------------------------------------------

def student_dir(out: str | Path) -> Path:
    return Path(out) / "student" / "base"


def adapter_dir(out: str | Path, operation: str) -> Path:
    return Path(out) / ADAPTERS / operation


def adapter_work_dir(out: str | Path, operation: str) -> Path:
    """The trainer's scratch folder (never published)."""
    return Path(out) / ADAPTERS / f".work-{operation}"


def export_dir(out: str | Path, fmt: str, operation: str) -> Path:
    return Path(out) / EXPORT / fmt / operation


# --- evaluation --------------------------------------------------------------------------------------------------

def system_folder(system: str) -> str:
    """A file-name-safe form of a system name (`student+experts` -> `student-experts`)."""
    return system.replace("+", "-")


def eval_dir(out: str | Path) -> Path:
    return Path(out) / EVAL


def results_path(out: str | Path) -> Path:
    return eval_dir(out) / "results.parquet"


def report_path(out: str | Path, suffix: str = ".md") -> Path:
    return (eval_dir(out) / "report").with_suffix(suffix)


def system_dir(out: str | Path, system: str) -> Path:
    return eval_dir(out) / "systems" / system_folder(system)


def calls_path(out: str | Path, system: str) -> Path:
    return system_dir(out, system) / "calls.parquet"


def qa_path(out: str | Path, system: str) -> Path:
    return system_dir(out, system) / "qa.parquet"


def probe_path(out: str | Path, system: str) -> Path:
    return system_dir(out, system) / "probe.json"


def judgements_path(out: str | Path) -> Path:
    return system_dir(out, "judge") / "judgements.parquet"


def log_path(out: str | Path, system: str) -> Path:
    return eval_dir(out) / "logs" / f"{system_folder(system)}.log"


def store_path(out: str | Path, system: str) -> Path:
    """Each evaluated system's own memory store, next to the teacher's trace-time store."""
    return memory_store(out, f"eval-{system_folder(system)}")


def versions_root(out: str | Path) -> Path:
    """Every set of experts OUT has served, one folder each (`improve` snapshots; `rollback` reinstalls one)."""
    return Path(out) / "versions"


def version_dir(out: str | Path, version: str) -> Path:
    return versions_root(out) / version


def candidates_root(out: str | Path) -> Path:
    return Path(out) / "candidates"


def candidate_dir(out: str | Path, stamp: str) -> Path:
    """`improve`'s candidates: an OUT of their own beside OUT's traces, datasets and student (linked)."""
    return candidates_root(out) / stamp


def decisions_path(out: str | Path) -> Path:
    """`improve`'s promotion decisions, one row per operation and run."""
    return Path(out) / "improve" / "decisions.parquet"


def deferral_path(out: str | Path) -> Path:
    """`memlora calibrate`'s thresholds, which `serve-experts --fallback` reads."""
    return Path(out) / "deferral.json"


def templates_path(out: str | Path, operation: str) -> Path:
    """The fixed part of a captured client's prompt for `operation`, every mined version (`memlora templates`)."""
    return Path(out) / TEMPLATES / f"{operation}.json"


# --- releases and the manifest ------------------------------------------------------------------------------------

def releases_root(out: str | Path) -> Path:
    return Path(out) / "releases"


def releases_dir(out: str | Path, name: str) -> Path:
    return releases_root(out) / name


def manifest_path(root: str | Path) -> Path:
    return Path(root) / MANIFEST


def job_path(out: str | Path, name: str) -> Path:
    """A job handed to another process (memlora.jobs): hidden, never in the manifest or a release."""
    return Path(out) / ".jobs" / f"{name}.json"


def lock_path(out: str | Path) -> Path:
    """OUT's writer lock (memlora.outlock): hidden, never in the manifest or a release, never removed."""
    return Path(out) / ".memlora.lock"
