"""Serving cost: per-operation latency (p50/p95) and peak memory of the student + experts vs the teacher, the
same requests one call at a time (how the memory system serves a user), each system in its own process so
neither's memory shows in the other's numbers. Four systems: the teacher as the config deploys it (float32) and
int8 (the same scheme as `student.quantize`), the student + experts as evaluation and
serving run them (float32, experts merged) and with `student.quantize: int8` (experts un-merged beside the int8
base). Writes bench/results/serving_cost.json.

    python bench/serving_cost.py [--quick] [--out OUT]   (OUT: use its traces and trained experts)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (QUICK_TOKENS, bench_parser, fmt, percentile, ratio_spread, save,  # noqa: E402
                    student_with_experts, table, trace_requests)

# system -> how it is built: (model, quantize)
SYSTEMS = {"teacher": ("teacher", "none"), "teacher-int8": ("teacher", "int8"),
           "student+experts": ("student", "none"), "student+experts-int8": ("student", "int8")}


def worker(system: str, base: str, experts_out: str, out: str | None, per_op: int, repeats: int,
           max_tokens: int | None) -> dict:
    import torch  # noqa: F401  (imported before the baseline: every system needs the runtime)

    from memlora.config import LLMConfig, load_config
    from memlora.evaluation import probes
    from memlora.llm.hf_backend import TransformersBackend, load_causal_lm
    from memlora.student.experts import ExpertBackend
    from memlora.llm.quantize import quantize_base

    baseline = probes.snapshot("runtime imported")
    requests = trace_requests(out, per_op, max_tokens=max_tokens)
    started = time.perf_counter()
    model, quantize = SYSTEMS[system]
    if model == "teacher":
        teacher = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml").teacher
        if quantize == "none":
            backend = TransformersBackend.from_config(LLMConfig(model=teacher.model, device="cpu", batch_size=1))
        else:  # quantized before the backend sets up its CPU linears, as ExpertBackend does
            weights, tokenizer, model_id = load_causal_lm(teacher.model, device="cpu")
            quantize_base(weights, quantize)
            backend = TransformersBackend(weights, tokenizer, model_id, batch_size=1)
    else:
        backend = ExpertBackend.from_out(base, experts_out, device="cpu", batch_size=1, merge=True,
                                         quantize=quantize)
    load_s = time.perf_counter() - started
    for op in dict.fromkeys(r.operation for r in requests):  # warm-up: grammars compiled, prefixes cached
        backend.generate([next(r for r in requests if r.operation == op)])
    calls: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for request in requests:
            t0 = time.perf_counter()
            result = backend.generate([request])[0]
            calls.setdefault(request.operation, []).append(
                {"s": time.perf_counter() - t0, "tokens": result.completion_tokens})
    return {"system": system, "load_s": load_s, "calls": calls, "baseline_rss_mb": baseline["rss_mb"],
            "peak_rss_mb": probes.peak_rss_mb(), "parameters": probes.parameter_counts(backend.model),
            "cuda_peak_mb": probes.cuda_peaks_mb()}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--experts-out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--per-op", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    per_op = args.per_op or (1 if args.quick else 6)
    max_tokens = QUICK_TOKENS if args.quick else None
    repeats = args.repeats or (1 if args.quick else 3)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args.worker, args.base, args.experts_out, args.out, per_op,
                                                       repeats, max_tokens)))
        return

    with tempfile.TemporaryDirectory(prefix="memlora-bench-") as scratch:
        base, experts_out = student_with_experts(args.out, Path(scratch))
        records = {}
        for system in SYSTEMS:  # one after the other: each has the machine to itself
            result = Path(scratch) / f"{system}.json"
            cmd = [sys.executable, __file__, "--worker", system, "--base", str(base), "--experts-out",
                   str(experts_out), "--result", str(result), "--per-op", str(per_op), "--repeats", str(repeats)]
            cmd += ["--quick"] if args.quick else []
            subprocess.run(cmd + (["--out", args.out] if args.out else []), check=True, timeout=3600)
            records[system] = json.loads(result.read_text())

    teacher = records["teacher"]
    rows, latency_ratios, p50_ratios = [], {}, {}
    for system, record in records.items():
        if system == "teacher":
            continue
        for op, t_calls in teacher["calls"].items():
            s_calls = record["calls"][op]
            t, s = [c["s"] for c in t_calls], [c["s"] for c in s_calls]
            t_tok = [c["s"] / max(c["tokens"], 1) for c in t_calls]
            s_tok = [c["s"] / max(c["tokens"], 1) for c in s_calls]
            latency_ratios.setdefault(system, {})[op] = ratio_spread(s, t)
            p50_ratios.setdefault(system, {})[op] = statistics.median(s) / statistics.median(t)
            rows.append({"system": system, "operation": op, "calls": len(t),
                         "teacher_p50_s": f"{statistics.median(t):.3f}", "p50_s": f"{statistics.median(s):.3f}",
                         "p95_s": f"{percentile(s, 0.95):.3f}", "p50_vs_teacher": f"{p50_ratios[system][op]:.2f}x",
                         "per_call_vs_teacher": fmt(latency_ratios[system][op]),
                         "per_token_vs_teacher": f"{statistics.median(s_tok) / statistics.median(t_tok):.2f}x",
                         "tokens_teacher/system": f"{sum(c['tokens'] for c in t_calls)}/"
                                                  f"{sum(c['tokens'] for c in s_calls)}"})
    memory = {sys_: {"peak_rss_mb": r["peak_rss_mb"], "above_runtime_mb": r["peak_rss_mb"] - r["baseline_rss_mb"],
                     "parameters": r["parameters"], "load_s": r["load_s"]} for sys_, r in records.items()}
    peak_ratio = {s: m["peak_rss_mb"] / memory["teacher"]["peak_rss_mb"] for s, m in memory.items()}
    print(table(rows, list(rows[0])))
    for name, m in memory.items():
        print(f"{name:<21} peak RSS {m['peak_rss_mb']:.0f} MiB ({peak_ratio[name]:.2f}x the teacher's; "
              f"{m['above_runtime_mb']:.0f} above the torch runtime), parameters {m['parameters']}, "
              f"load {m['load_s']:.1f} s")
    for system in ("student+experts", "student+experts-int8"):
        print(f"{system} / teacher: peak RSS {peak_ratio[system]:.2f}x (target <= 0.5x); p50 latency "
              + ", ".join(f"{op} {r:.2f}x" for op, r in p50_ratios[system].items()) + " (target <= 0.5x)")
    print(f"student+experts-int8 / teacher-int8: peak RSS "
          f"{memory['student+experts-int8']['peak_rss_mb'] / memory['teacher-int8']['peak_rss_mb']:.2f}x "
          "(target <= 0.7x)")
    print("saved", save("serving_cost", {"rows": rows, "latency_ratio_per_call": latency_ratios,
                                         "p50_ratio": p50_ratios, "peak_rss_ratio": peak_ratio,
                                         "memory": memory, "per_op": per_op, "repeats": repeats,
                                         "raw": {k: v["calls"] for k, v in records.items()}}))


if __name__ == "__main__":
    main()
