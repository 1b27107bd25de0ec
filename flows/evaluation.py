"""`evaluate`: replay the held-out test conversations through the memory system with the teacher, the bare
student and the student with its experts (and, beside a quantized student, the teacher quantized the same way),
each in its own process; score them; write OUT/eval/results.parquet,
report.md and report.png."""

from __future__ import annotations

from prefect import flow

from memlora.bundled import DEFAULT_CONFIG
from memlora.evaluation.captured import is_captured
from memlora.evaluation.plan import report_meta, summary
from memlora.evaluation.results import independent_judge
from memlora.evaluation.systems import JUDGE, systems
from memlora.layout import results_path
from memlora.tasks.common import forward_domain_logs, holding_out, load_config_task, manifest_task
from memlora.tasks.evaluation import artifacts_task, captured_task, prepare_task, report_task, results_task, \
    run_system_task


@flow(name="evaluate")
def evaluate(config_path: str = DEFAULT_CONFIG, out: str = "out") -> dict:
    forward_domain_logs()
    with holding_out(out, "evaluate", create=False):
        cfg = load_config_task(config_path)
        # calls a client's memory system made through `memlora capture`: judged on its test share
        if is_captured(out):
            payload = captured_task(cfg, out)
            manifest_task(out, "evaluation", payload)
            return payload
        plan = prepare_task(cfg, out)
        # One after another: the teacher's calls are the students' inputs, and a system measured alone has its
        # latency and its memory to itself. The judge labels every system's answers last.
        probes = {system: run_system_task(cfg, out, system, plan.base)
                  for system in (*systems(cfg), JUDGE)}
        rows = results_task(cfg, out)
        markdown, png = report_task(rows, report_meta(cfg, plan, probes), out)
        artifacts_task(rows, markdown, png, independent_judge(cfg))
        payload = summary(cfg, plan, probes, rows, [results_path(out), markdown, png], out)
        manifest_task(out, "evaluation", payload)
        return payload
