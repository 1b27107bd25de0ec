"""Tasks of distillation: build the student once, then one training task for every operation (one DeepSpeed
launch; no retries: a failed training is a bug or a resource problem, not a blip)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from memlora.config import Config
from memlora.student.build import build_student
from memlora.student.distill import check_traces, distill_operations
from memlora.student.records import DistillResult, NoExpert


@task(name="check-traces", cache_policy=NONE)
def check_traces_task(out: str) -> dict[str, int]:
    usable = check_traces(out)
    get_run_logger().info("usable trace rows per operation: %s", usable)
    return usable


@task(name="build-student", cache_policy=NONE)
def build_student_task(config: Config, out: str) -> Path:
    log = get_run_logger()
    base = build_student(config, out, on_line=log.info)
    log.info("student base: %s", base)
    return base


@task(name="distill-experts", cache_policy=NONE, retries=0)
def distill_experts_task(config: Config, out: str, operations: list[str], base: Path,
                         init: dict[str, Path] | None = None) -> dict[str, DistillResult]:
    log = get_run_logger()
    for op in operations:
        if init and op in init:
            log.info("%s: starting from the served expert %s (improve.warm_start)", op, init[op])
    results = distill_operations(config, out, operations, base, on_line=log.info, init=init)
    for op, record in results.items():
        if isinstance(record, NoExpert):
            log.warning("%s: no expert (%s)", op, record.reason)
        elif not record.skipped:
            log.info("%s: loss %.4f -> %.4f over %d steps, %d rows used (%s skipped), world size %d, ZeRO-%d",
                     op, record.loss_before, record.loss_after, record.steps, record.rows_used,
                     record.rows_skipped or "none", record.world_size, record.deepspeed_stage)
    return results
