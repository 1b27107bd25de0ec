"""Where evaluation keeps its files, and one OS process per system (so memory peaks never mix)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from memlora.data.io import sha256_file, write_json
from memlora.evaluation.systems import SYSTEMS, EvalError, slug
from memlora.processes import stop_group, track, untrack

JUDGE = "judge"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def eval_dir(out: str | Path) -> Path:
    return Path(out) / "eval"


def system_dir(out: str | Path, system: str) -> Path:
    return eval_dir(out) / "systems" / slug(system)


def calls_path(out: str | Path, system: str) -> Path:
    return system_dir(out, system) / "calls.parquet"


def qa_path(out: str | Path, system: str) -> Path:
    return system_dir(out, system) / "qa.parquet"


def probe_path(out: str | Path, system: str) -> Path:
    return system_dir(out, system) / "probe.json"


def judgements_path(out: str | Path) -> Path:
    return system_dir(out, JUDGE) / "judgements.parquet"


def log_path(out: str | Path, system: str) -> Path:
    return eval_dir(out) / "logs" / f"{slug(system)}.log"


def store_path(out: str | Path, system: str) -> Path:
    """Each system's own memory store, next to the teacher's trace-time store."""
    return Path(out) / "memory" / f"eval-{slug(system)}.sqlite"


PROGRESS = re.compile(r"^\[\d\d:\d\d:\d\d\] ")  # run_system.say's lines; the rest is library noise


def wait_following(proc: subprocess.Popen, log: Path, timeout_s: float, on_line: Callable[[str], None]) -> int:
    """Wait for the process, passing each new progress line of its log to `on_line`."""
    deadline = time.monotonic() + timeout_s
    with open(log, "rb") as reader:
        pending = b""
        while True:
            try:
                rc = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                rc = None
            pending += reader.read()
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").rstrip()
                if PROGRESS.match(text):
                    on_line(text)
            if rc is not None:
                return rc
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(proc.args, timeout_s)


def run_system_process(config_path: str | Path, out: str | Path, system: str, *, base: str | Path | None = None,
                       timeout_s: float = 7200, env: dict | None = None,
                       on_line: Callable[[str], None] = lambda line: None) -> dict:
    """Run one system (or the judge) in a fresh Python process; return the probe record it wrote.

    Its output goes to OUT/eval/logs/<system>.log; its progress lines (`[HH:MM:SS] ...`) are passed to
    `on_line` as they come, so a user sees where a minutes-long run is. A failure raises with the log's last
    lines."""
    if system not in SYSTEMS + (JUDGE,):
        raise EvalError(f"unknown system {system!r}")
    key = cache_key(config_path, out, system, base)
    kept = finished_probe(out, system, key)
    if kept is not None:
        return {**kept, "kept": True}
    cmd = [sys.executable, "-m", "memlora.evaluation.run_system", "--system", system,
           "--config", str(config_path), "--out", str(out)]
    if base is not None:
        cmd += ["--base", str(base)]
    log = log_path(out, system)
    log.parent.mkdir(parents=True, exist_ok=True)
    probe_path(out, system).unlink(missing_ok=True)
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    with open(log, "wb") as fh:
        proc = track(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                                      start_new_session=True))
        try:
            rc = wait_following(proc, log, timeout_s, on_line)
        except BaseException:  # timeout or interrupt: leave no orphan model process behind
            stop_group(proc)
            raise
        finally:
            untrack(proc)
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise EvalError(f"evaluation of {system!r} failed (exit code {rc}); see {log}:\n{tail}")
    probe = {**json.loads(probe_path(out, system).read_text()), "cache_key": key}
    write_json(probe, probe_path(out, system))
    return probe


def system_inputs(out: str | Path, system: str, base: str | Path | None) -> list[Path]:
    """The files a system's evaluation depends on besides the config: the data; for the students, the
    teacher's calls they replay and the student base; the experts; for the judge, every system's answers."""
    from memlora.student.experts import ADAPTER_FILES, expert_folders

    out = Path(out)
    files = sorted((out / "datasets").glob("*.parquet"))
    if system in ("student", "student+experts"):
        files.append(calls_path(out, "teacher"))
        if base is not None:
            files += sorted(p for p in Path(base).rglob("*") if p.is_file())
    if system == "student+experts":
        files += [folder / name for folder in expert_folders(out).values() for name in ADAPTER_FILES]
    if system == JUDGE:
        files += [qa_path(out, s) for s in SYSTEMS]
    return files


def cache_key(config_path: str | Path, out: str | Path, system: str, base: str | Path | None) -> str:
    """Same config + same input files = same results: a rerun keeps a system whose inputs did not change."""
    from memlora.config import load_config

    digest = hashlib.sha256(f"{system}:{load_config(config_path).fingerprint()}".encode())
    for f in system_inputs(out, system, base):
        digest.update(f"{f.name}:{sha256_file(f) if f.is_file() else 'missing'}".encode())
    return digest.hexdigest()


def finished_probe(out: str | Path, system: str, key: str) -> dict | None:
    """The probe of a finished run with this cache key whose outputs are all there, else None."""
    path = probe_path(out, system)
    outputs = [judgements_path(out)] if system == JUDGE else [calls_path(out, system), qa_path(out, system)]
    if not (path.is_file() and all(f.is_file() for f in outputs)):
        return None
    probe = json.loads(path.read_text())
    return probe if probe.get("cache_key") == key else None


def prepare(config, out: str | Path) -> dict:
    """Check what evaluation needs before any model process starts; build the student base if it is missing.
    Returns the plan: test conversations, question count, student base folder."""
    from memlora.data.ingest import load_ingested
    from memlora.evaluation.qa import questions_of, test_conversations
    from memlora.student.build import build_student

    datasets = Path(out) / "datasets"
    if not (datasets / "conversations.parquet").is_file():
        raise EvalError(f"{datasets}: no ingested data (run `memlora traces` or `memlora ingest` first)")
    conversations = test_conversations(load_ingested(out), config.evaluation)
    if not conversations:
        raise EvalError(f"{datasets}: no test conversation (is data.split.test_ratio above 0?)")
    if config.student is None:
        raise EvalError("the config has no `student` section: there is no student to evaluate")
    from memlora.student.experts import verified_expert_folders

    if not verified_expert_folders(out):  # before the student base or any model process: fail first
        raise EvalError(f"{Path(out) / 'adapters'}: no trained expert (run `memlora distill` first)")
    base = build_student(config, out)  # the distill stage's folder, made once; reused as it is
    return {
        "conversations": [c.conversation_id for c in conversations],
        "questions": sum(len(questions_of(c, config.evaluation)) for c in conversations),
        "base": str(base),
    }


def summary(config, plan: dict, probes: dict, rows: list[dict], files: list[Path], out: str | Path) -> dict:
    """The manifest's `evaluation` section."""
    from memlora.evaluation.results import headline, independent_judge

    keep = ("pid", "ppid", "model_id", "backend", "device", "dtype", "peak_rss_mb", "ru_maxrss_mb", "cuda_peak_mb",
            "load_s", "wall_s", "calls", "questions", "parameters", "adapter_switches", "timings")
    return {
        "config": config.model_dump(mode="json"),
        "config_fingerprint": config.fingerprint(),
        "conversations": plan["conversations"],
        "questions": plan["questions"],
        "student_base": plan["base"],
        "systems": {s: {k: p.get(k) for k in keep} | {"adapters": p.get("adapters", {})}
                    for s, p in probes.items() if s in SYSTEMS},
        "judge": probes.get(JUDGE, {}),
        "headline": headline(rows, independent_judge(config)),
        "results_rows": len(rows),
        "files": [Path(f).relative_to(out).as_posix() if Path(f).is_relative_to(out) else str(f) for f in files],
    }


def evaluate_all(config_path: str | Path, out: str | Path) -> dict:
    """The whole evaluation without Prefect (the `evaluate` flow runs the same steps as tasks)."""
    from memlora.config import load_config
    from memlora.evaluation.report import write_report
    from memlora.evaluation.results import build_results, results_path, write_results
    from memlora.manifest import update_manifest

    config = load_config(config_path)
    plan = prepare(config, out)
    probes = {}
    for system in SYSTEMS + (JUDGE,):
        probes[system] = run_system_process(config_path, out, system, base=plan["base"],
                                            timeout_s=config.evaluation.timeout_s)
    rows = build_results(out, config)
    write_results(rows, out)
    md, png = write_report(rows, report_meta(config, plan, probes), out)
    payload = summary(config, plan, probes, rows, [results_path(out), md, png], out)
    update_manifest(out, "evaluation", payload)
    return payload


def report_meta(config, plan: dict, probes: dict) -> dict:
    from memlora.evaluation.results import independent_judge

    judge = config.evaluation.judge or config.teacher
    return {"config_name": config.name, "conversations": plan["conversations"], "questions": plan["questions"],
            "judge": judge.model, "independent_judge": independent_judge(config), "probes": probes}
