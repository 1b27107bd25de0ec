"""The systems evaluation compares, each an `LLMBackend` the memory system can run on:

- `teacher`: the configured teacher (`teacher` config section), as the user deploys it;
- `teacher-int8`: only where the student is quantized (`student.quantize`) and the teacher is not: the same
  teacher quantized the same way (smoothing and float32 exceptions included), so that memory and latency are
  compared like for like; it replays the teacher's requests as the students do;
- `student`: the student base alone (no adapter);
- `student+experts`: the same base with every trained expert attached, switched per operation by repointing
  the adapted layers (`memlora.student.experts.ExpertBackend`);
- `experts+guard`, `experts+teacher`: only where `evaluation.served` names them: the same experts as
  `serve-experts --guard` / `--fallback` serve them, under OUT/deferral.json's thresholds
  (`memlora.evaluation.served`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from memlora.config import Config, LLMConfig
from memlora.evaluation.calibration import CalibrationError, DeferralPolicy
from memlora.evaluation.served import served_backend
from memlora.layout import deferral_path, student_dir
from memlora.llm.backends import build_backend
from memlora.memory.llm import LLMBackend

TEACHER, TEACHER_INT8, STUDENT, EXPERTS = "teacher", "teacher-int8", "student", "student+experts"
GUARDED, DEFERRING = "experts+guard", "experts+teacher"
SERVED = {"guard": GUARDED, "teacher": DEFERRING}  # evaluation.served -> the system
SYSTEMS = (TEACHER, STUDENT, EXPERTS)  # what every evaluation compares
ALL_SYSTEMS = (TEACHER, TEACHER_INT8, STUDENT, EXPERTS, GUARDED, DEFERRING)  # in report order
JUDGE = "judge"  # not a system: the model that labels every system's answers, run after them


class EvalError(RuntimeError):
    """Evaluation cannot run as configured; the message says what is missing."""


@dataclass
class LoadedSystem:
    name: str
    backend: LLMBackend
    load_s: float
    info: dict = field(default_factory=dict)


def quantized_teacher(config: Config) -> LLMConfig | None:
    """The teacher quantized as the student is, where that is a different model from the teacher as deployed: a
    local teacher that runs unquantized beside a quantized student. Else None."""
    student, teacher = config.student, config.teacher
    if student is None or student.quantize == "none" or teacher.quantize != "none" or teacher.backend != "transformers":
        return None
    return teacher.model_copy(update={"quantize": student.quantize, "logprobs_top_k": 0})


def systems(config: Config) -> tuple[str, ...]:
    """The systems this config's evaluation runs, in report order."""
    chosen = {*SYSTEMS, *(SERVED[s] for s in config.evaluation.served)}
    if quantized_teacher(config) is not None:
        chosen.add(TEACHER_INT8)
    return tuple(s for s in ALL_SYSTEMS if s in chosen)


def in_rows(rows: list[dict]) -> tuple[str, ...]:
    """The systems a results table holds, in report order."""
    present = {r["system"] for r in rows}
    return tuple(s for s in ALL_SYSTEMS if s in present)


def served_thresholds(out: str | Path) -> tuple[DeferralPolicy, Path]:
    """OUT's deferral thresholds for the served systems (`evaluation.served`), or an error that says how to make
    them."""
    path = deferral_path(out)
    try:
        return DeferralPolicy.read(path), path
    except CalibrationError as err:
        raise EvalError(f"{err}; `evaluation.served` evaluates the experts under the thresholds of `memlora "
                        f"calibrate --config C --out {out}`") from None


def student_base(config: Config, out: str | Path) -> Path:
    """Where the student base is: the pruned teacher the distill stage saved, or the configured model."""
    if config.student is None:
        raise EvalError("the config has no `student` section: there is no student to evaluate")
    if config.student.prune is None:
        return Path(config.student.model)
    base = student_dir(out)
    if not (base / "config.json").is_file():
        raise EvalError(f"{base}: no student base (run `memlora distill` first)")
    return base


def build_system(name: str, config: Config, out: str | Path, base: str | Path | None = None) -> LoadedSystem:
    if name not in systems(config):
        raise EvalError(f"unknown system {name!r} (one of {', '.join(systems(config))})")
    started = time.perf_counter()
    if name == TEACHER:
        # No log-probs: evaluation does not use them, and computing them would slow the teacher's timed calls.
        backend = build_backend(config.teacher.model_copy(update={"logprobs_top_k": 0}))
        return LoadedSystem(name, backend, time.perf_counter() - started,
                            {"model": config.teacher.model, "experts": {}})
    if name == TEACHER_INT8:
        # Imported here: a local model only, and the process of an HTTP teacher never needs torch.
        from memlora.llm.hf_backend import TransformersBackend

        backend = TransformersBackend.from_config(quantized_teacher(config),
                                                  smoothing_alpha=config.student.int8_smoothing,
                                                  keep_float32=tuple(config.student.int8_keep_float32))
        return LoadedSystem(name, backend, time.perf_counter() - started,
                            {"model": config.teacher.model, "experts": {}})
    # Imported here, not at the top: the teacher's evaluation process measures its own peak memory, and peft (which
    # the experts import) is no part of what the teacher needs.
    from memlora.student.experts import ExpertBackend, verified_expert_folders

    base = Path(base) if base is not None else student_base(config, out)
    adapters = None
    if name != STUDENT:
        adapters = verified_expert_folders(out)
        if not adapters:
            raise EvalError(f"{Path(out) / 'adapters'}: no trained expert (run `memlora distill` first)")
    backend = ExpertBackend.from_config(
        config, base, adapters, prompt="teacher" if name == STUDENT else config.student.prompt)
    info = {"model": str(base), "experts": {op: str(p) for op, p in (adapters or {}).items()}}
    if name in (GUARDED, DEFERRING):
        policy, path = served_thresholds(out)
        policy = policy.for_experts(backend.digests)  # as a server applies them: none for a replaced expert
        backend = served_backend(config, backend, policy, with_teacher=name == DEFERRING)
        info.update(deferral=str(path), stale_thresholds=policy.stale)
    return LoadedSystem(name, backend, time.perf_counter() - started, info)
