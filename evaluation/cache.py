"""Same config + same input files = same results: a rerun keeps a system whose inputs did not change."""

from __future__ import annotations

import hashlib
from pathlib import Path

from memlora.config import Config
from memlora.data.io import sha256_file
from memlora.evaluation.probes import Probe
from memlora.evaluation.systems import DEFERRING, EXPERTS, GUARDED, JUDGE, STUDENT, TEACHER_INT8, systems
from memlora.layout import calls_path, datasets_dir, deferral_path, judgements_path, probe_path, qa_path
from memlora.student.experts import expert_files, expert_folders


def system_inputs(config: Config, out: str | Path, system: str, base: str | Path | None) -> list[Path]:
    """The files a system's evaluation depends on besides the config: the data; for the systems that replay
    the teacher's calls, those calls; for the students, the student base; the experts; for the served experts,
    their thresholds; for the judge, every system's answers."""
    out = Path(out)
    files = sorted(datasets_dir(out).glob("*.parquet"))
    experts = (EXPERTS, GUARDED, DEFERRING)
    if system in (TEACHER_INT8, STUDENT, *experts):
        files.append(calls_path(out, "teacher"))
    if system in (STUDENT, *experts) and base is not None:
        files += sorted(p for p in Path(base).rglob("*") if p.is_file())
    if system in experts:
        files += [path for folder in expert_folders(out).values() for path in expert_files(folder)]
    if system in (GUARDED, DEFERRING):
        files.append(deferral_path(out))
    if system == JUDGE:
        files += [qa_path(out, s) for s in systems(config)]
    return files


# Config sections a system's evaluation does not read. Distillation settings reach an evaluation only through the
# experts' files (hashed below): a new generation target re-evaluates student+experts, not the teacher; and the
# teacher's run reads nothing of the student's (quantizing the student re-evaluates the students only).
NOT_READ = {"teacher": frozenset({"distill", "student"})}


def cache_key(config: Config, out: str | Path, system: str, base: str | Path | None) -> str:
    """The config less what the system does not read, and the system's input files."""
    without = NOT_READ.get(system, frozenset({"distill"}))
    digest = hashlib.sha256(f"{system}:{config.fingerprint(without=without)}".encode())
    if system in (GUARDED, DEFERRING):  # how confidence is read (the fingerprint leaves serving settings out)
        digest.update(config.deferral.model_dump_json().encode())
    for f in system_inputs(config, out, system, base):
        digest.update(f"{f.name}:{sha256_file(f) if f.is_file() else 'missing'}".encode())
    return digest.hexdigest()


def finished_probe(out: str | Path, system: str, key: str) -> Probe | None:
    """The probe of a finished run with this cache key whose outputs are all there, else None."""
    path = probe_path(out, system)
    outputs = [judgements_path(out)] if system == JUDGE else [calls_path(out, system), qa_path(out, system)]
    if not (path.is_file() and all(f.is_file() for f in outputs)):
        return None
    probe = Probe.read(path)
    return probe if probe.cache_key == key else None
