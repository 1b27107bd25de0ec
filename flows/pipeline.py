"""`memlora-pipeline`: the whole recipe, stage after stage, each stage its own subflow."""

from __future__ import annotations

from prefect import flow, get_run_logger

from memlora.flows.traces import generate_traces


@flow(name="memlora-pipeline")
def pipeline(config: str = "configs/default.yaml", data: str = "data/samples/locomo_sample.json",
             out: str = "out") -> dict:
    log = get_run_logger()
    summary = {"traces": generate_traces(config=config, data=data, out=out)}
    log.info("pipeline finished; artifacts under %s", out)
    return summary
