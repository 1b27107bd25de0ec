"""The evaluation's plan (what it will run on, checked before any model process starts) and its manifest
section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memlora.data.ingest import load_ingested
from memlora.evaluation.qa import questions_of, test_conversations
from memlora.evaluation.results import headline, independent_judge
from memlora.evaluation.systems import ALL_SYSTEMS, JUDGE, EvalError, served_thresholds
from memlora.layout import ADAPTERS, conversations_file, datasets_dir
from memlora.student.build import build_student
from memlora.student.experts import verified_expert_folders
from memlora.student.records import learnt_by


@dataclass(frozen=True)
class EvalPlan:
    """What an evaluation runs on, fixed before any model process starts."""

    conversations: list[str]  # the test conversations' ids
    questions: int            # gold questions over them
    base: str                 # the student base folder both students load


def prepare(config, out: str | Path) -> EvalPlan:
    """Check what evaluation needs before any model process starts; build the student base if it is missing."""
    conversations = check_evaluable(config, out)
    base = build_student(config, out)  # the distill stage's folder, made once; reused as it is
    return EvalPlan(conversations=[c.conversation_id for c in conversations],
                    questions=sum(len(questions_of(c, config.evaluation)) for c in conversations), base=str(base))


def check_evaluable(config, out: str | Path) -> list:
    """What evaluating OUT's own test conversations needs, checked in a second (the command calls it before
    Prefect starts, for one line instead of a flow's traceback): returns the test conversations."""
    datasets = datasets_dir(out)
    if not conversations_file(out).is_file():
        raise EvalError(f"{datasets}: no ingested data (run `memlora traces` or `memlora ingest` first)")
    conversations = test_conversations(load_ingested(out), config.evaluation)
    if not conversations:
        raise EvalError(f"{datasets}: no test conversation (data.split holds none out: a test_ratio of 0, a named "
                        "split without test ids, or a single conversation, which always trains)")
    if config.student is None:
        raise EvalError("the config has no `student` section: there is no student to evaluate")
    experts = verified_expert_folders(out)
    if not experts:  # before the student base or any model process: fail first
        raise EvalError(f"{Path(out) / ADAPTERS}: no trained expert (run `memlora distill` first)")
    if found := learnt_by(experts, (c.conversation_id for c in conversations)):
        operation, folder, learnt = found  # the split changed after it trained (another corpus ingested into OUT)
        raise EvalError(f"{folder}: the {operation} expert trained on test conversation(s) {', '.join(learnt)}; "
                        "run `memlora distill` (it retrains on the split as it is now), then evaluate")
    if config.evaluation.served:
        served_thresholds(out)  # the served experts' thresholds, before any model process
    return conversations


def summary(config, plan: EvalPlan, probes: dict, rows: list[dict], files: list[Path], out: str | Path) -> dict:
    """The manifest's `evaluation` section."""
    keep = ("pid", "ppid", "model_id", "backend", "device", "dtype", "peak_rss_mb", "peak_rss_e2e_mb", "ru_maxrss_mb",
            "cuda_peak_mb", "load_s", "wall_s", "calls", "questions", "parameters", "adapter_switches",
            "experts_design", "batching", "timings")
    return {
        "config": config.model_dump(mode="json"),
        "config_fingerprint": config.fingerprint(),
        "conversations": plan.conversations,
        "questions": plan.questions,
        "student_base": plan.base,
        "systems": {s: {k: getattr(p, k) for k in keep} | {"adapters": p.adapters}
                    for s, p in probes.items() if s in ALL_SYSTEMS},
        "judge": probes[JUDGE].model_dump(mode="json") if JUDGE in probes else {},
        "headline": headline(rows, independent_judge(config)),
        "results_rows": len(rows),
        "files": [Path(f).relative_to(out).as_posix() if Path(f).is_relative_to(out) else str(f) for f in files],
    }


def report_meta(config, plan: EvalPlan, probes: dict) -> dict:
    judge = config.evaluation.judge or config.teacher
    return {"config_name": config.name, "conversations": plan.conversations, "questions": plan.questions,
            "judge": judge.model, "independent_judge": independent_judge(config), "probes": probes}
