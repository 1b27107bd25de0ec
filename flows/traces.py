"""`generate-traces`: ingest the data, then replay every train and validation conversation through the memory system
with the teacher, recording each call. Conversations fan out over the configured task runner; on the thread
runner their calls share model batches."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.utilities.annotations import unmapped

from memlora.bundled import DEFAULT_CONFIG
from memlora.tasks.common import (
    build_task_runner, forward_domain_logs, holding_out, ingest_task, load_config_task, manifest_task,
)
from memlora.tasks.traces import raise_for_failures, trace_conversation_task
from memlora.teacher.traces import select_conversations, shared_resources, trace_summary, traced_before


@flow(name="generate-traces", log_prints=True)
def generate_traces(config_path: str = DEFAULT_CONFIG, data: str = "", out: str = "out") -> dict:
    forward_domain_logs()
    with holding_out(out, "generate-traces"):
        cfg = load_config_task(config_path)
        corpus = ingest_task(data, out, cfg)
        selected, todo = select_conversations(corpus, cfg, out)
        changed = [c.conversation_id for c in todo if traced_before(out, c.conversation_id)]
        get_run_logger().info("%d train/validation conversations selected, %d already traced, %d to trace%s",
                              len(selected), len(selected) - len(todo), len(todo),
                              f" ({len(changed)} traced again: their turns, the teacher or the memory system "
                              f"changed since: {', '.join(changed)})" if changed else "")
        if todo:
            with build_task_runner(cfg.prefect) as runner, \
                    shared_resources(cfg, out, shared=cfg.prefect.task_runner == "thread") as shared:
                futures = runner.map(trace_conversation_task, parameters=dict(
                    conversation=todo, config=unmapped(cfg), out=unmapped(out), llm=unmapped(shared.llm),
                    embedder=unmapped(shared.embedder), store=unmapped(shared.store)))
                raise_for_failures(todo, futures)
        summary = trace_summary(out)
        manifest_task(out, "traces", {
            "config": cfg.model_dump(mode="json"),
            "data": str(data),
            "teacher": cfg.teacher.model,
            "conversations": [c.conversation_id for c in selected],
            "operations": summary,
        })
        for op, s in summary.items():
            get_run_logger().info("%s: %d rows, %d parse_ok, %d constrained", op, s["rows"], s["parse_ok"],
                                  s["constrained"])
        return summary
