"""One system's evaluation run, in its own process:

    python -m memlora.evaluation.run_system --job OUT/.jobs/eval-student-experts.json

`teacher` runs end to end first (its calls are the reference requests), then replays its own requests without
their schema (free decoding). Each other system (the students; `teacher-int8` beside a quantized student)
replays the teacher's requests as they were and without schema, then runs end to end with its own memory.
`judge` labels every system's QA answers. Each writes its rows under OUT/eval/systems/<system>/ and a probe
record (pid, parameters, adapter bytes, peak memory, timings).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from memlora.data.ingest import load_ingested
from memlora.data.io import write_json, write_parquet
from memlora.evaluation import probes
from memlora.evaluation.judge import JUDGEMENTS, judge_answers
from memlora.evaluation.qa import QA, run_end_to_end, test_conversations
from memlora.evaluation.replay import CALLS, E2E, FORCED, FORCED_FREE, as_forced, replay
from memlora.evaluation.systems import ALL_SYSTEMS, JUDGE, TEACHER, EvalError, build_system, systems
from memlora.jobs import read_job
from memlora.layout import calls_path, judgements_path, probe_path, qa_path, store_path
from memlora.llm.backends import build_backend
from memlora.llm.continuous import decodes_continuously
from memlora.llm.file_pages import trim_heap
from memlora.memory.embedder import Embedder
from memlora.memory.store import MemoryStore


def adapter_files(folders: dict[str, str]) -> dict[str, dict]:
    from safetensors import safe_open

    info = {}
    for op, folder in folders.items():
        weights = Path(folder) / "adapter_model.safetensors"
        with safe_open(str(weights), framework="pt") as fh:
            params = 0
            for key in fh.keys():
                n = 1
                for dim in fh.get_slice(key).get_shape():
                    n *= dim
                params += n
        info[op] = {"path": folder, "bytes": probes.folder_bytes(folder), "params": params}
    return info


def expert_design(backend) -> str | None:
    """How a system's experts sit on its base (None: no experts): what its memory and speed depend on."""
    if not getattr(backend, "operations", None):
        return None
    return "merged" if backend.merge else "beside, folded" if backend.folded else "beside"


def say(message: str) -> None:
    """Progress, to the system's log (OUT/eval/logs/<system>.log)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _phase(system: str, name: str, rows: list[dict], seconds: float) -> None:
    """A phase's end, with the process's memory then and its peak so far: where the peak came from."""
    ok = sum(r["parse_ok"] for r in rows)
    say(f"{system}: {name}: {len(rows)} calls, {ok} parsed, {seconds:.1f} s; RSS {probes.current_rss_mb():.0f} MiB, "
        f"peak {probes.peak_rss_mb():.0f} MiB")


def _write_rows(rows: list[dict], schema: pa.Schema, path: Path, kind: str) -> None:
    write_parquet(pa.Table.from_pylist(rows, schema=schema), path, kind)


def run_judge(config, out: Path) -> dict:
    qa_rows = []
    for system in systems(config):
        path = qa_path(out, system)
        if not path.is_file():
            raise EvalError(f"{path}: missing (the {system} run did not finish)")
        qa_rows += pq.read_table(path).to_pylist()
    judge_cfg = (config.evaluation.judge or config.teacher).model_copy(update={"logprobs_top_k": 0})
    started = time.perf_counter()
    backend = build_backend(judge_cfg)
    load_s = time.perf_counter() - started
    judged = judge_answers(backend, qa_rows, config.evaluation.judge_max_new_tokens)
    _write_rows(judged, JUDGEMENTS, judgements_path(out), "eval-judgements")
    return {"model": judge_cfg.model, "model_id": backend.model_id, "backend": backend.backend_name,
            "load_s": load_s, "asked": sum(j["judged"] for j in judged), "rows": len(judged)}


def run_model_system(system: str, config, out: Path, base: str | None) -> dict:
    memory_cfg = config.memory
    running = config.evaluation.continuous_batching
    conversations = test_conversations(load_ingested(out), config.evaluation)
    if not conversations:
        raise EvalError(f"{out / 'datasets'}: no test conversation (is data.split.test_ratio above 0?)")
    reference = None
    if system != TEACHER:
        teacher_calls = calls_path(out, "teacher")
        if not teacher_calls.is_file():
            raise EvalError(f"{teacher_calls}: missing; the teacher runs first")
        reference = [r for r in pq.read_table(teacher_calls).to_pylist() if r["phase"] == E2E]

    loaded = build_system(system, config, out, base)
    after_load = probes.snapshot("model loaded")
    say(f"{system}: {loaded.backend.model_id} loaded in {loaded.load_s:.1f} s, RSS {after_load['rss_mb']:.0f} MiB")
    backend = loaded.backend
    embedder = Embedder(memory_cfg.embedder)
    store = MemoryStore(store_path(out, system))
    timings = {}

    def end_to_end(label: str):
        """The memory system's own work, its peak read from the same state for every system (_restart_peak)."""
        before = _restart_peak()
        started = time.perf_counter()
        e2e, qa_rows = run_end_to_end(system, backend, embedder, store, config, conversations, progress=say)
        timings["e2e_s"] = time.perf_counter() - started
        peak = probes.peak_rss_mb()
        _phase(system, label, e2e, timings["e2e_s"])
        return e2e, qa_rows, before, peak

    try:
        if system == TEACHER:
            e2e, qa_rows, before_e2e, e2e_peak = end_to_end("end to end (the reference requests)")
            forced = as_forced(e2e)
            reference = e2e
        else:
            started = time.perf_counter()
            forced = replay(backend, reference, system, FORCED, memory_cfg, running=running, progress=say)
            timings["forced_s"] = time.perf_counter() - started
            _phase(system, "teacher's requests", forced, timings["forced_s"])
        started = time.perf_counter()
        free = []
        if config.evaluation.free_decoding:
            free = replay(backend, [r for r in reference if r["output_schema"] is not None], system, FORCED_FREE,
                          memory_cfg, free=True, running=running, progress=say)
        timings["forced_free_s"] = time.perf_counter() - started
        _phase(system, "teacher's requests without schema", free, timings["forced_free_s"])
        if system != TEACHER:
            e2e, qa_rows, before_e2e, e2e_peak = end_to_end("end to end")
    finally:
        store.close()

    _write_rows(e2e + forced + free, CALLS, calls_path(out, system), "eval-calls")
    _write_rows(qa_rows, QA, qa_path(out, system), "eval-qa")
    model = getattr(backend, "model", None)
    adapters = loaded.info.get("experts", {})
    return {
        **loaded.info,
        "model_id": backend.model_id,
        "backend": backend.backend_name,
        "device": str(getattr(model, "device", "remote")),
        "dtype": str(getattr(model, "dtype", "")).replace("torch.", "")
        + (f", {backend.quantized} weights" if getattr(backend, "quantized", None) else "")
        + (f" (smoothed, alpha {backend.smoothing_alpha:g})" if getattr(backend, "smoothing_alpha", 0) else "")
        + (f" ({', '.join(backend.keep_float32)} float32)" if getattr(backend, "keep_float32", ()) else ""),
        "parameters": probes.parameter_counts(model) if model is not None else None,
        "adapters": adapter_files(adapters) if adapters else {},
        "adapter_switches": getattr(backend, "switches", None),
        "experts_design": expert_design(backend),
        # one conversation sends its groups straight to the model: nothing joins a running batch
        "batching": "running" if running and len(conversations) > 1 and decodes_continuously(backend) else "merged",
        "load_s": loaded.load_s,
        "after_load": after_load,
        "timings": timings,
        "peak_rss_before_e2e_mb": before_e2e,
        "peak_rss_e2e_mb": e2e_peak if before_e2e is not None else None,
        "calls": {E2E: len(e2e), FORCED: len(forced), FORCED_FREE: len(free)},
        "questions": len(qa_rows),
        "conversations": [c.conversation_id for c in conversations],
        "embedder": memory_cfg.embedder,
    }


def _restart_peak() -> float | None:
    """Before the end-to-end phase (the memory system's own work, which every system does): the process's peak
    so far, then the heap trimmed and VmHWM restarted, so that phase's peak is read from the same state for every
    system. The students replay the teacher's requests in batches of 16 first, and glibc kept most of what that
    phase freed: measured over the whole process, the bare student's peak (2,055 MiB) stood above the teacher's
    (1,941), whose process does the end-to-end phase alone. None where VmHWM cannot be restarted."""
    before = probes.peak_rss_mb()
    trim_heap()
    return before if probes.restart_peak() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memlora.evaluation.run_system", description=__doc__)
    parser.add_argument("--job", required=True, help="the job file the evaluation flow wrote (memlora.jobs): the "
                        "config, OUT, the system (teacher, student, student+experts or judge) and the student base")
    args = parser.parse_args(argv)

    import torch  # noqa: F401  (the baseline below includes the runtime every system needs)
    import transformers  # noqa: F401

    started = time.perf_counter()
    baseline = probes.snapshot("runtime imported")
    config, job = read_job(args.job)
    system, out = job["system"], Path(job["out"])
    if system not in (*ALL_SYSTEMS, JUDGE):
        raise EvalError(f"{args.job}: unknown system {system!r}")
    if system == JUDGE:
        record = run_judge(config, out)
    else:
        record = run_model_system(system, config, out, job.get("base"))
    record.update(
        system=system,
        **probes.process_info(),
        baseline=baseline,
        # A restarted VmHWM holds only what came after the restart: the process's peak is the larger of the two.
        peak_rss_mb=max(probes.peak_rss_mb(), record.pop("peak_rss_before_e2e_mb", None) or 0.0),
        ru_maxrss_mb=probes.ru_maxrss_mb(),
        cuda_peak_mb=probes.cuda_peaks_mb(),
        wall_s=time.perf_counter() - started,
    )
    write_json(record, probe_path(out, system))
    say(f"{system}: peak RSS {record['peak_rss_mb']:.0f} MiB, {record['wall_s']:.1f} s (pid {record['pid']})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
