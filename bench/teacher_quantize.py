"""Can the teacher record its traces in int8 (`teacher.quantize`)? Its own recorded calls (prompt, schema, token
budget) replayed by the teacher in float32, int8 and weight-only int8, side by side in one process, each compared
with the answer the trace holds: the share of answers identical to it, the share that agree with it as
calibration judges agreement (`deferral.agrees`: the same update events, fact F1 or answer token F1 at least the
configured threshold), the operation's agreement metric with a 95 % interval, and generated tokens per second.
The float32 replay is the yardstick: it shows how much a replay differs from the recording by batching alone.
Writes bench/results/teacher_quantize.json.

    python bench/teacher_quantize.py [--out OUT] [--limit 48]
    python bench/teacher_quantize.py --quick --out OUT      # CI: 2 calls per operation, 8 tokens; says nothing

Without --out the bundled sample of the embedded default's traces is replayed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CONFIG, QUICK_TOKENS, bench_parser, interval_text, save, table, traces_root, triple,
)

from memlora.config import OPERATIONS, load_config  # noqa: E402
from memlora.evaluation import deferral  # noqa: E402
from memlora.evaluation.agreement import PRIMARY  # noqa: E402
from memlora.evaluation.captured import agreement_rows  # noqa: E402
from memlora.evaluation.stats import wilson  # noqa: E402
from memlora.llm.quantize import SCHEMES  # noqa: E402  float32, dynamic int8, weight-only int8
from memlora.memory.llm import GenerationRequest  # noqa: E402
from memlora.student.examples import load_traces  # noqa: E402



def recorded_calls(root: Path, config, limit: int, quick: bool) -> tuple[list, list[str]]:
    """Up to `limit` calls per operation whose recorded answer parsed, spread evenly over the traces, and their
    recorded texts."""
    calls, texts = [], []
    for op in OPERATIONS:
        rows = [r for r in load_traces(sorted((root / "traces" / op).glob("*.parquet"))).to_pylist()
                if r["parse_ok"] and r["parsed_output"]]
        step = max(1, len(rows) // limit)
        for row in rows[::step][:limit]:
            call = deferral.held_out_call(row, config)
            calls.append(replace(call, max_new_tokens=QUICK_TOKENS) if quick else call)
            texts.append(row["raw_output"])
    return calls, texts


def replay(config, scheme: str, calls: list) -> tuple[list, float]:
    """Each operation's calls as one list (the backend batches them as the memory system would); wall seconds."""
    from memlora.llm.hf_backend import TransformersBackend

    backend = TransformersBackend.from_config(config.teacher.model_copy(update={"quantize": scheme}))
    results, wall = [None] * len(calls), 0.0
    for op in OPERATIONS:
        pick = [i for i, c in enumerate(calls) if c.operation == op]
        requests = [GenerationRequest(op, calls[i].messages, calls[i].max_new_tokens, calls[i].schema,
                                      no_repeat_ngram=config.memory.operations[op].no_repeat_ngram) for i in pick]
        backend.generate(requests[:1])  # warm-up: the grammar and the shared prefix
        start = time.perf_counter()
        for i, result in zip(pick, backend.generate(requests)):
            results[i] = result
        wall += time.perf_counter() - start
    del backend
    return results, wall


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--limit", type=int, default=None, help="calls per operation (default 48; quick 2)")
    args = parser.parse_args()
    config = load_config(CONFIG)
    limit = args.limit or (2 if args.quick else 48)
    calls, recorded = recorded_calls(traces_root(args.out), config, limit, args.quick)
    rows, speed = [], {}
    for scheme in SCHEMES:
        results, wall = replay(config, scheme, calls)
        speed[scheme] = sum(r.completion_tokens for r in results) / wall
        for op in OPERATIONS:
            pick = [i for i, c in enumerate(calls) if c.operation == op]
            same = sum(results[i].text.strip() == recorded[i].strip() for i in pick)
            agree = sum(deferral.agrees(op, results[i].text, calls[i].reference, config) for i in pick)
            metric = next((r for r in agreement_rows(scheme, op, [deferral.parsed_value(results[i].text) for i in pick],
                                                     [calls[i] for i in pick], config)
                           if r["metric"] == PRIMARY[op]), None)
            rows.append({"teacher": "float32" if scheme == "none" else scheme, "operation": op, "n": len(pick),
                         "identical": [round(same / len(pick), 3), *(round(x, 3) for x in wilson(same, len(pick)))],
                         "agrees": [round(agree / len(pick), 3), *(round(x, 3) for x in wilson(agree, len(pick)))],
                         PRIMARY[op]: triple(metric) if metric else None,
                         "tokens": sum(results[i].completion_tokens for i in pick)})
    shown = [{**r, "identical": interval_text(r["identical"]), "agrees": interval_text(r["agrees"]),
              "metric": f"{PRIMARY[r['operation']]} {interval_text(r[PRIMARY[r['operation']]])}"} for r in rows]
    print(table(shown, ["teacher", "operation", "n", "identical", "agrees", "metric", "tokens"]))
    ratios = {scheme: round(speed[scheme] / speed["none"], 3) for scheme in SCHEMES[1:]}
    print("generated tokens per second: float32 " + f"{speed['none']:.1f}, " + ", ".join(
        f"{scheme} {speed[scheme]:.1f} ({ratios[scheme]:.2f}x)" for scheme in SCHEMES[1:]))
    path = save("teacher_quantize", {"traces": str(traces_root(args.out)), "quick": args.quick, "limit": limit,
                                     "rows": rows, "tokens_per_s": speed, "int8_over_float32_speed": ratios["int8"],
                                     "over_float32_speed": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
