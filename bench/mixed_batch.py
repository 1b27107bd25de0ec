"""Mixed-operation batch: calls for different operations arriving together, served by the student + experts
grouped per expert (one batch per operation, one `set_adapter` each) vs one call at a time. Same outputs,
counted. Writes bench/results/mixed_batch.json.

    python bench/mixed_batch.py [--quick] [--out OUT]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import QUICK_TOKENS, bench_parser, fmt, ratio_spread, save, spread, student_with_experts, table, timed, trace_requests  # noqa: E402


def main() -> None:
    args = bench_parser(__doc__).parse_args()
    per_op, repeats = (2, 1) if args.quick else (6, 3)
    max_tokens = QUICK_TOKENS if args.quick else None

    from memlora.student.experts import ExpertBackend

    requests = trace_requests(args.out, per_op, max_tokens=max_tokens)
    mixed = [requests[i] for k in range(per_op) for i in range(k, len(requests), per_op)]  # ops interleaved
    with tempfile.TemporaryDirectory(prefix="memlora-bench-") as scratch:
        base, experts_out = student_with_experts(args.out, Path(scratch))
        backend = ExpertBackend.from_out(base, experts_out, device="cpu", batch_size=len(mixed))
        backend.generate(mixed)  # warm-up: grammars and prefixes

        switches = backend.switches
        grouped_times, grouped = timed(lambda: backend.generate(mixed), repeats)
        grouped_switches = (backend.switches - switches) / repeats
        switches = backend.switches
        single_times, single = timed(lambda: [backend.generate([r])[0] for r in mixed], repeats)
        single_switches = (backend.switches - switches) / repeats

    same = sum(g.token_ids == s.token_ids for g, s in zip(grouped, single))  # padding may flip a near-tie
    speedup = ratio_spread(single_times, grouped_times)
    tokens = sum(r.completion_tokens for r in grouped)
    rows = [{"serving": "grouped per expert", "calls": len(mixed), "wall_s": f"{spread(grouped_times)['median']:.2f}",
             "tok_per_s": f"{tokens / spread(grouped_times)['median']:.1f}", "set_adapter": grouped_switches},
            {"serving": "one call at a time", "calls": len(mixed), "wall_s": f"{spread(single_times)['median']:.2f}",
             "tok_per_s": f"{tokens / spread(single_times)['median']:.1f}", "set_adapter": single_switches}]
    print(table(rows, list(rows[0])))
    print(f"grouped / one at a time speed-up: {fmt(speedup)}; identical outputs: {same}/{len(mixed)}")
    print("saved", save("mixed_batch", {"rows": rows, "speedup": speedup, "grouped_s": grouped_times,
                                        "single_s": single_times, "calls": len(mixed), "tokens": tokens,
                                        "identical_outputs": same}))


if __name__ == "__main__":
    main()
