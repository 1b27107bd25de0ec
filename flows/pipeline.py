"""`memlora-pipeline`: traces -> distill -> evaluate, each stage its own subflow, then a dataset release."""

from __future__ import annotations

from prefect import flow, get_run_logger

from memlora.bundled import DEFAULT_CONFIG, DEFAULT_DATA
from memlora.data.ingest import prepare_corpus
from memlora.data.split import require_test_conversation
from memlora.flows.distill import distill
from memlora.flows.evaluation import evaluate
from memlora.flows.traces import generate_traces
from memlora.jobs import write_resolved_config
from memlora.tasks.common import holding_out, load_config_task
from memlora.tasks.release import publish_release_task


@flow(name="memlora-pipeline")
def pipeline(config_path: str = DEFAULT_CONFIG, data: str = DEFAULT_DATA,
             out: str = "out") -> dict:
    log = get_run_logger()
    cfg = load_config_task(config_path)
    require_test_conversation(prepare_corpus(data, cfg.data), data)  # before OUT and hours of traces, training
    with holding_out(out, "memlora-pipeline"):
        # Parsed once: every stage reads this resolved copy, so an edit to the YAML mid-run changes nothing here.
        resolved = str(write_resolved_config(cfg, out))
        summary = {"traces": generate_traces(config_path=resolved, data=data, out=out)}
        summary["distill"] = distill(config_path=resolved, out=out)
        summary["evaluate"] = evaluate(config_path=resolved, out=out)
        summary["release"] = publish_release_task(out, cfg, data)
        log.info("pipeline finished; artifacts under %s, release %s", out, summary["release"])
        return summary
