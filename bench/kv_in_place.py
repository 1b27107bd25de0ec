"""The KV cache appended in place (`memlora.llm.kv_cache`) against transformers' `DynamicLayer`, which copies the
whole cache every decode step (`torch.cat`): memlora's decoding loop on the same batches of the teacher's own
trace requests (prompt, schema, token budget, n-gram block, top-8 log-probs as traced), same run, the two
alternating per repeat. Checks that both give the same tokens and log-probs, prints the wall-time ratio per
operation and batch size; writes bench/results/kv_in_place.json.

    python bench/kv_in_place.py [--quick] [--out OUT]
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CONFIG, QUICK_TOKENS, bench_parser, fmt, ratio_spread, save, spread, summed_ratio, table, trace_requests  # noqa: E402,I001

import time  # noqa: E402

import torch  # noqa: E402

from memlora.config import OPERATIONS, load_config  # noqa: E402
from memlora.llm import decoding  # noqa: E402
from memlora.llm.hf_backend import TransformersBackend  # noqa: E402


@contextmanager
def stock_cache():
    """Decoding as before: the cache's layers left as transformers makes them."""
    kept = decoding.in_place
    decoding.in_place = lambda cache, **_: cache
    try:
        yield
    finally:
        decoding.in_place = kept


@torch.inference_mode()
def decode(backend: TransformersBackend, batch, ngram: int) -> list[tuple[list[int], list[float]]]:
    enc, cache, cached_len = backend._encode(batch)
    specs = [decoding.RowSpec(r.max_new_tokens, backend.grammars.grammar(r.schema) if r.constrained else None,
                              ngram, backend.logprobs_top_k) for r in batch]
    out = decoding.decode_rows(backend.model, enc["input_ids"], enc["attention_mask"], specs, cache=cache,
                               cached_len=cached_len, stop_ids=backend.stop_ids)
    return [(d.tokens, d.token_logprobs) for d in out]


def timed_pair(backend, batch, ngram: int, repeats: int):
    """Stock and in place alternating, so drift on the machine falls on both."""
    times: dict[str, list[float]] = {"stock": [], "in_place": []}
    outs = {}
    for _ in range(repeats):
        for name in ("stock", "in_place"):
            started = time.perf_counter()
            if name == "stock":
                with stock_cache():
                    outs[name] = decode(backend, batch, ngram)
            else:
                outs[name] = decode(backend, batch, ngram)
            times[name].append(time.perf_counter() - started)
    return times, outs


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    sizes, repeats = ((2,), 1) if args.quick else ((4, 8), args.repeats)  # the bundled traces hold 8 per operation
    config = load_config(CONFIG)
    backend = TransformersBackend.from_config(config.teacher.model_copy(update={"device": "cpu"}))
    requests = trace_requests(args.out, max(sizes), max_tokens=QUICK_TOKENS if args.quick else None)
    rows = []
    for op in OPERATIONS:
        ngram = config.memory.operations[op].no_repeat_ngram or 0
        ops = [r for r in requests if r.operation == op]
        for request in ops[: max(sizes)]:  # warm-up: every grammar compiled, the prefix cache filled
            backend.grammars.grammar(request.schema)
        decode(backend, ops[:1], ngram)
        for size in sizes:
            batch = ops[:size]
            times, outs = timed_pair(backend, batch, ngram, repeats)
            lengths = [len(t) for t, _ in outs["in_place"]]
            rows.append({
                "operation": op, "batch": len(batch), "mean_tokens": round(sum(lengths) / len(lengths), 1),
                "stock_s": round(spread(times["stock"])["median"], 2),
                "in_place_s": round(spread(times["in_place"])["median"], 2),
                "speedup": fmt(ratio_spread(times["stock"], times["in_place"])),
                "same_tokens_and_logprobs": f"{sum(a == b for a, b in zip(outs['stock'], outs['in_place']))}"
                                            f"/{len(batch)}",
                "stock_times": times["stock"], "in_place_times": times["in_place"],
            })
    print(table(rows, ["operation", "batch", "mean_tokens", "stock_s", "in_place_s", "speedup",
                       "same_tokens_and_logprobs"]))
    total = summed_ratio(rows, "stock_times", "in_place_times", repeats)
    print(f"\nevery batch above, stock / in place wall time: {fmt(total)}")
    print("saved", save("kv_in_place", {"rows": rows, "total_speedup": total, "repeats": repeats}))


if __name__ == "__main__":
    main()
