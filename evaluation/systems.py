"""The three systems evaluation compares, each an `LLMBackend` the memory system can run on:

- `teacher`: the configured teacher (`teacher` config section);
- `student`: the student base alone (no adapter);
- `student+experts`: the same base with every trained expert attached, switched per operation by repointing
  the adapted layers (`memlora.student.experts.ExpertBackend`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from memlora.config import Config
from memlora.layout import student_dir
from memlora.llm.backends import build_backend
from memlora.memory.llm import LLMBackend

SYSTEMS = ("teacher", "student", "student+experts")
JUDGE = "judge"  # not a system: the model that labels every system's answers, run after them


class EvalError(RuntimeError):
    """Evaluation cannot run as configured; the message says what is missing."""


@dataclass
class LoadedSystem:
    name: str
    backend: LLMBackend
    load_s: float
    info: dict = field(default_factory=dict)


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
    if name not in SYSTEMS:
        raise EvalError(f"unknown system {name!r} (one of {', '.join(SYSTEMS)})")
    started = time.perf_counter()
    if name == "teacher":
        # No log-probs: evaluation does not use them, and computing them would slow the teacher's timed calls.
        backend = build_backend(config.teacher.model_copy(update={"logprobs_top_k": 0}))
        return LoadedSystem(name, backend, time.perf_counter() - started,
                            {"model": config.teacher.model, "experts": {}})
    # Imported here, not at the top: the teacher's evaluation process measures its own peak memory, and peft (which
    # the experts import) is no part of what the teacher needs.
    from memlora.student.experts import ExpertBackend, verified_expert_folders

    base = Path(base) if base is not None else student_base(config, out)
    adapters = None
    if name == "student+experts":
        adapters = verified_expert_folders(out)
        if not adapters:
            raise EvalError(f"{Path(out) / 'adapters'}: no trained expert (run `memlora distill` first)")
    backend = ExpertBackend.from_config(
        config, base, adapters, prompt=config.student.prompt if name == "student+experts" else "teacher")
    return LoadedSystem(name, backend, time.perf_counter() - started,
                        {"model": str(base), "experts": {op: str(p) for op, p in (adapters or {}).items()}})
