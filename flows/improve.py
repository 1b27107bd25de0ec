"""`improve`: the nightly closed loop. Candidates trained on the calls that arrived since the served experts were
trained (captured and deferred ones), gated against the served experts on held-out calls, promoted per operation;
a running serve-experts takes the promoted version by itself."""

from __future__ import annotations

from prefect import flow, get_run_logger

from memlora.bundled import DEFAULT_CONFIG
from memlora.tasks.common import forward_domain_logs, holding_out, load_config_task
from memlora.tasks.distill import build_student_task, distill_experts_task
from memlora.tasks.improve import compact_traces_task, gate_task, new_rows_task, prepare_candidate_task, \
    promote_task, recalibrate_stale_task


@flow(name="improve")
def improve(config_path: str = DEFAULT_CONFIG, out: str = "out") -> dict:
    forward_domain_logs()
    with holding_out(out, "improve", create=False):
        cfg = load_config_task(config_path)
        compact_traces_task(cfg, out)
        counts = new_rows_task(cfg, out)
        if not any(counts.values()):
            get_run_logger().info("no new trace rows since the served experts were trained: nothing to train")
            # experts replaced outside the loop (a distill, a rollback) get thresholds of their own
            return {"new_rows": counts, "promoted": [], "recalibrated": recalibrate_stale_task(cfg, out)}
        base = build_student_task(cfg, out)
        candidate = prepare_candidate_task(cfg, out, counts)
        distill_experts_task(cfg, str(candidate.out), list(candidate.new_rows), base, init=candidate.init)
        decisions = gate_task(cfg, out, base, candidate)
        return {"new_rows": counts, **promote_task(cfg, out, base, candidate, decisions)}
