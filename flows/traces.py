"""`generate-traces`: ingest the data, then replay every train and validation conversation through the memory system with
the teacher, recording each call. Conversations fan out over a thread pool whose calls share model batches."""

from __future__ import annotations

from prefect import flow, get_run_logger
from tqdm.auto import tqdm

from memlora.layout import memory_store
from memlora.llm.backends import build_backend
from memlora.llm.batcher import MicroBatcher
from memlora.memory.embedder import Embedder
from memlora.memory.store import MemoryStore
from memlora.teacher.traces import is_traced, trace_summary
from memlora.tasks.common import (
    build_task_runner, forward_domain_logs, ingest_task, load_config_task, manifest_task,
)
from memlora.tasks.traces import trace_conversation_task


class TracesIncomplete(RuntimeError):
    pass


@flow(name="generate-traces", log_prints=True)
def generate_traces(config: str = "configs/default.yaml", data: str = "", out: str = "out") -> dict:
    forward_domain_logs()
    log = get_run_logger()
    cfg = load_config_task(config)
    corpus = ingest_task(data, out, cfg)
    # Validation conversations are traced too: their teacher calls are what early stopping is measured on.
    train = [c for c in corpus if c.split == "train"][: cfg.data.max_conversations]
    train += [c for c in corpus if c.split == "validation"]
    todo = [c for c in train if not is_traced(out, c.conversation_id)]
    log.info("%d train/validation conversations selected, %d already traced, %d to trace",
             len(train), len(train) - len(todo), len(todo))
    if todo:
        shared = cfg.prefect.task_runner == "thread"
        llm = embedder = store = None
        if shared:
            teacher = build_backend(cfg.teacher)
            llm = MicroBatcher(teacher, cfg.teacher.batch_size) if cfg.prefect.concurrency > 1 else teacher
            embedder = Embedder(cfg.memory.embedder)
            store = MemoryStore(memory_store(out, "teacher"))
        runner = build_task_runner(cfg.prefect)
        try:
            with runner:
                futures = [
                    runner.submit(trace_conversation_task, parameters=dict(
                        conversation=c, config=cfg, out=out, llm=llm, embedder=embedder, store=store))
                    for c in todo
                ]
                failed = {}
                for conv, future in tqdm(list(zip(todo, futures)), desc="conversations traced", unit="conv"):
                    try:
                        future.result()
                    except Exception as err:  # keep the others: their shards are written and kept
                        failed[conv.conversation_id] = f"{type(err).__name__}: {err}"
                if failed:
                    raise TracesIncomplete(
                        f"no traces for {len(failed)} conversation(s): {', '.join(sorted(failed))} "
                        f"(first error: {next(iter(failed.values()))}); rerun the same command to fill them in"
                    )
        finally:
            if store is not None:
                store.close()
            if isinstance(llm, MicroBatcher):
                llm.close()
    summary = trace_summary(out)
    manifest_task(out, "traces", {
        "config": cfg.model_dump(mode="json"),
        "data": str(data),
        "teacher": cfg.teacher.model,
        "conversations": [c.conversation_id for c in train],
        "operations": summary,
    })
    for op, s in summary.items():
        log.info("%s: %d rows, %d parse_ok, %d constrained", op, s["rows"], s["parse_ok"], s["constrained"])
    return summary
