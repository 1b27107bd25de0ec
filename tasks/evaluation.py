"""Tasks of evaluation: thin wrappers over `memlora.evaluation` (no retries: a failed system run is a bug or a
resource problem, and rerunning a model for minutes would hide it)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from memlora.config import Config
from memlora.evaluation.captured import captured_headline, evaluate_captured, write_captured_report
from memlora.evaluation.plan import EvalPlan, prepare
from memlora.evaluation.process import run_system_process
from memlora.evaluation.report import write_report
from memlora.evaluation.results import build_results, headline, write_results
from memlora.evaluation.systems import student_base
from memlora.student.experts import ExpertBackend, verified_expert_folders


@task(name="evaluation-plan", cache_policy=NONE)
def prepare_task(config: Config, out: str) -> EvalPlan:
    plan = prepare(config, out)
    get_run_logger().info("evaluating on %d test conversation(s) (%s), %d questions; student base %s",
                          len(plan.conversations), ", ".join(plan.conversations), plan.questions, plan.base)
    return plan


@task(name="evaluate-system", cache_policy=NONE, retries=0, task_run_name="evaluate-{system}")
def run_system_task(config: Config, out: str, system: str, base: str) -> dict:
    probe = run_system_process(config, out, system, base=base, timeout_s=config.evaluation.timeout_s,
                               on_line=get_run_logger().info)
    if probe.kept:
        get_run_logger().info("%s: evaluated before with the same config and inputs; kept", system)
    get_run_logger().info("%s: pid %s, peak RSS %.0f MiB, %.1f s", system, probe.pid, probe.peak_rss_mb,
                          probe.wall_s)
    return probe


@task(name="evaluation-results", cache_policy=NONE)
def results_task(config: Config, out: str) -> list[dict]:
    rows = build_results(out, config)
    path = write_results(rows, out)
    get_run_logger().info("%d result rows -> %s", len(rows), path)
    return rows


@task(name="evaluation-report", cache_policy=NONE)
def report_task(rows: list[dict], meta: dict, out: str) -> tuple[Path, Path]:
    return write_report(rows, meta, out)


@task(name="evaluation-artifacts", cache_policy=NONE)
def artifacts_task(rows: list[dict], markdown: Path, png: Path, with_judge: bool = False) -> None:
    """What shows in the Prefect UI: the headline numbers as a table, the whole report as Markdown."""
    create_table_artifact(key="evaluation-headline", table=headline(rows, with_judge),
                          description="Teacher vs student vs student+experts: headline numbers")
    create_markdown_artifact(key="evaluation-report",
                             markdown=Path(markdown).read_text(encoding="utf-8") + f"\n\nFigure: `{png}`\n",
                             description="Evaluation report")


@task(name="evaluate-captured", cache_policy=NONE)
def captured_task(config: Config, out: str) -> dict:
    """An OUT of captured calls: the bare student and the student + experts on capture's test share."""
    log = get_run_logger()
    backend = ExpertBackend.from_config(config, student_base(config, out), verified_expert_folders(out) or None,
                                        prompt=config.student.prompt if config.student else "teacher")
    rows = evaluate_captured(config, out, backend, on_line=log.info)
    markdown, png = write_captured_report(rows, out, "Calls capture held out for testing (capture.test_ratio): "
                                                     "whole conversations or blocks of calls; n per row.")
    heads = captured_headline(rows)
    create_table_artifact(key="evaluation-headline", table=heads,
                          description="Captured traffic: bare student vs student + experts")
    log.info("captured evaluation written to %s (%d result rows)", markdown, len(rows))
    return {"captured": True, "headline": heads, "results": str(markdown.with_name("results.parquet")),
            "report": str(markdown), "figure": str(png)}
