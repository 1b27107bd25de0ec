"""`distill`: one DeLoRA expert per memory operation on the student, trained on the teacher's traces."""

from __future__ import annotations

from prefect import flow

from memlora.bundled import DEFAULT_CONFIG
from memlora.config import OPERATIONS
from memlora.tasks.common import forward_domain_logs, holding_out, load_config_task, manifest_task
from memlora.tasks.distill import build_student_task, check_traces_task, distill_experts_task
from memlora.tasks.improve import recalibrate_stale_task


@flow(name="distill")
def distill(config_path: str = DEFAULT_CONFIG, out: str = "out") -> dict:
    forward_domain_logs()
    with holding_out(out, "distill", create=False):
        cfg = load_config_task(config_path)
        check_traces_task(out)  # every input read before the first expensive step
        base = build_student_task(cfg, out)
        results = distill_experts_task(cfg, out, list(OPERATIONS), base)  # one launch, one expert after another
        recalibrate_stale_task(cfg, out)  # where OUT served calibrated experts, the new ones get thresholds too
        manifest_task(out, "distill", {
            "student_base": str(base),
            "experts": {op: r.summary() for op, r in results.items()},
        })
        return {op: r.to_dict() for op, r in results.items()}
