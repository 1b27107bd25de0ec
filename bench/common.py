"""Shared by the benches: the machine they ran on, repeated timing, and the results file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from memlora.cpu import cpu_model
from memlora.models import go_offline
from memlora.processes import free_port  # noqa: F401  (the benches import it from here)

go_offline()  # every bench imports this module before any model library
RESULTS = Path(os.environ.get("MEMLORA_BENCH_RESULTS", Path(__file__).parent / "results"))


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    info.update(cpu_model())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in columns}
    line = "  ".join(c.ljust(widths[c]) for c in columns)
    return "\n".join([line, "  ".join("-" * widths[c] for c in columns)] +
                     ["  ".join(f"{r.get(c, '')}".ljust(widths[c]) for c in columns) for r in rows])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- inputs shared by the benches --------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TRACES = Path(__file__).parent / "data" / "traces"  # real teacher traces of the embedded default
CONFIG = REPO / "configs" / "default.yaml"


def traces_root(out: str | Path | None) -> Path:
    """OUT (its traces/<op>/ folders) when given, else the bundled sample of the embedded default's traces."""
    return Path(out) if out else SAMPLE_TRACES.parent


def trace_requests(
    out: str | Path | None, per_op: int, constrained: bool = True, max_tokens: int | None = None
) -> list:
    """The teacher's own requests (prompt, schema, token budget) from trace rows, `per_op` per operation;
    `max_tokens` caps the budget (quick runs)."""
    import pyarrow.parquet as pq

    from memlora.config import OPERATIONS, load_config
    from memlora.memory.llm import GenerationRequest

    budgets = load_config(CONFIG).memory.operations
    requests = []
    for op in OPERATIONS:
        rows = pq.read_table(traces_root(out) / "traces" / op).to_pylist()[:per_op]
        budget = min(budgets[op].max_new_tokens, max_tokens or budgets[op].max_new_tokens)
        requests += [GenerationRequest(op, r["messages"], budget,
                                       json.loads(r["output_schema"]) if constrained and r["output_schema"] else None)
                     for r in rows]
    return requests


def bench_student(config, folder: str | Path) -> Path:
    """`folder`'s student base as it is (whatever recipe made it, e.g. a pipeline run's), else the configured
    one built there (on the bundled sample traces when `folder` has none: the layers to drop are chosen on them)."""
    import shutil

    from memlora.layout import student_dir
    from memlora.student.build import build_student

    if (student_dir(folder) / "config.json").is_file():
        return student_dir(folder)
    if not (Path(folder) / "traces").is_dir():
        shutil.copytree(SAMPLE_TRACES, Path(folder) / "traces")
    return build_student(config, folder)


def student_with_experts(out: str | Path | None, scratch: Path, config=None) -> tuple[Path, Path]:
    """(student base, OUT holding experts): OUT's own trained experts when it has them, else a pruned student
    (`config`'s, by default the embedded default's) with fresh experts of the configured shape (their weights
    are random; their cost, which is what the benches measure, is the trained experts')."""
    from memlora.config import OPERATIONS, load_config
    from memlora.llm.hf_backend import load_causal_lm
    from memlora.manifest import update_manifest
    from memlora.student.experts import attach_expert, expert_folders

    config = config or load_config(CONFIG)
    if out and expert_folders(out):
        return bench_student(config, out), Path(out)
    base = bench_student(config, scratch)
    if len(expert_folders(scratch)) < len(OPERATIONS):
        import torch

        for i, op in enumerate(OPERATIONS):
            model, _, _ = load_causal_lm(str(base), dtype="float32", device="cpu")
            expert = attach_expert(model, config.student.expert)
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for name, p in expert.named_parameters():
                    if "delora_B" in name or "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
            expert.save_pretrained(str(scratch / "adapters" / op), safe_serialization=True)
        update_manifest(scratch)
    return base, scratch


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ratio_spread(numerators: list[float], denominators: list[float]) -> dict:
    return spread([a / b for a, b in zip(numerators, denominators)])


def summed_ratio(rows: list[dict], slow: str, fast: str, repeats: int) -> dict:
    """`ratio_spread` of the rows' summed times per repeat (`slow` and `fast`: each row's list of times)."""
    return ratio_spread([sum(r[slow][i] for r in rows) for i in range(repeats)],
                        [sum(r[fast][i] for r in rows) for i in range(repeats)])


def fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f}x ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """Every bench's flags: --quick (tiny sizes, one repeat; CI runs it) and --out (a pipeline run's OUT)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: keeps the bench working")
    parser.add_argument("--out", default=None, help="use this OUT's traces and trained experts")
    return parser


QUICK_TOKENS = 8  # the token budget of a call in --quick runs: enough to exercise every path


def answers_against_gold(calls: list, answers: list[str], out: str | Path, samples: int) -> dict:
    """QA token F1 against the gold answer (LoCoMo categories 1-4) and the share of answers that abstain (1-4,
    and 5 where abstaining is right), of `answers` to held-out generation `calls` and of the teacher's own answers
    to them; the interval resamples conversations. {} where no call's question has a gold answer."""
    from memlora.evaluation import scoring
    from memlora.evaluation.captured import cluster_bootstrap
    from memlora.student.targets import gold_questions, question_of

    gold = gold_questions(out)
    items = [(gold[key], answer, str(call.reference.get("answer", "")), call.conversation_id)
             for call, answer in zip(calls, answers)
             if (key := (call.conversation_id, question_of(call.messages) or "")) in gold]
    answerable = [x for x in items if x[0][1] != 5]
    adversarial = [x for x in items if x[0][1] == 5]
    if not answerable:
        return {}
    golds, clusters = [g for (g, _), *_ in answerable], [x[3] for x in answerable]
    result = {"qa_n": len(answerable), "adversarial_n": len(adversarial)}
    for who, k in (("expert", 1), ("teacher", 2)):
        f1 = scoring.token_f1([x[k] for x in answerable], golds)
        est = cluster_bootstrap(f1, clusters, lambda a: sum(a) / len(a), samples, min_clusters=5)
        result[f"qa_token_f1_{who}"] = [rounded(v) for v in (est.value, est.ci_low, est.ci_high)]
        result[f"abstains_{who}"] = round(sum(scoring.abstains(x[k]) for x in answerable) / len(answerable), 3)
        if adversarial:
            result[f"adversarial_abstains_{who}"] = round(
                sum(scoring.abstains(x[k]) for x in adversarial) / len(adversarial), 3)
    return result


def add_training_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """The flags of a bench that trains experts on a finished run's traces."""
    parser.add_argument("--work", help=f"folder for {what} (default: a temporary one, removed); reused when "
                                       "given, so an interrupted bench resumes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=str(CONFIG))


def finished_run(parser: argparse.ArgumentParser, args, prefix: str):
    """(OUT, its config, the work folder) of such a bench; --out is required."""
    import tempfile

    from memlora.config import load_config

    if not args.out:
        parser.error("--out: a finished `memlora run` OUT is needed (its traces, validation split and evaluation)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix=prefix))
    return Path(args.out).resolve(), load_config(args.config), work


def rounded(value, digits: int = 3):
    """A metric for a results file: None for a missing or NaN value."""
    return None if value is None or value != value else round(value, digits)


def interval_text(triple) -> str:
    """[value, low, high] as "value [low, high]"; "–" where there is none."""
    return "–" if not triple or triple[0] is None else f"{triple[0]} [{triple[1]}, {triple[2]}]"


def triple(row: dict) -> list:
    """A results row's [value, low, high], rounded."""
    return [rounded(row["value"]), rounded(row["ci_low"]), rounded(row["ci_high"])]


def validation_rows(out: str | Path, operation: str, limit: int | None = None) -> list[dict]:
    """The teacher's parsed calls of `operation` on OUT's validation conversations (OUT with its datasets), else,
    where OUT marks none (the bundled sample traces), its first `limit` rows: the calls a setting is chosen on."""
    from memlora.layout import trace_files
    from memlora.student.examples import conversation_splits, load_traces, split_rows

    table = load_traces(trace_files(out, operation))
    splits = conversation_splits(out)
    rows = [r for r in (split_rows(table, splits)[1] if splits else table).to_pylist() if r["parse_ok"]]
    return rows[:limit] if limit else rows


def replay_agreement(operation: str, rows: list[dict], backend, budget: int) -> dict:
    """`backend` answers the teacher's own calls `rows` (their messages and schema); agreement with the teacher's
    answers (the operation's primary metric, 95 % interval), parse rate, time, and the answers' token ids."""
    from memlora.evaluation import agreement
    from memlora.evaluation.replay import parse_output
    from memlora.memory.llm import GenerationRequest

    requests = [GenerationRequest(operation, r["messages"], budget, json.loads(r["output_schema"]))
                for r in rows]
    started = time.perf_counter()
    results = backend.generate(requests)
    wall = time.perf_counter() - started
    system, reference = [], {}
    for i, (row, result) in enumerate(zip(rows, results)):
        parsed = parse_output(operation, row["messages"], result.text)
        system.append({"operation": operation, "ref_index": i, "parse_ok": parsed.ok,
                       "parsed_output": json.dumps(parsed.value) if parsed.ok else None})
        reference[i] = row
    metrics = agreement.score(operation, system, reference, 0.5, samples=1000)
    primary = metrics[agreement.PRIMARY[operation]]
    tokens = sum(r.completion_tokens for r in results)
    return {"agreement": round(primary.value, 3), "ci": [round(primary.ci_low, 3), round(primary.ci_high, 3)],
            "parse_ok": round(sum(s["parse_ok"] for s in system) / max(len(system), 1), 3),
            "latency_per_call_s": round(wall / max(len(rows), 1), 3), "s_per_token": wall / max(tokens, 1),
            "prompt_tokens": round(statistics.mean(r.prompt_tokens for r in results), 1), "n": len(rows),
            "token_ids": [r.token_ids for r in results]}
