"""Finished rows leave the batch: `greedy_decode` (memlora's decoding loop) against `model.generate`, on the
same batches of the teacher's own trace requests (prompt, schema, token budget, n-gram block), same run.
Checks that both give the same tokens, prints the wall-time ratio per operation with min/median/max over
repeats; writes bench/results/decode_eviction.json.

    python bench/decode_eviction.py [--quick] [--out OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CONFIG, QUICK_TOKENS, bench_parser, fmt, ratio_spread, save, spread, summed_ratio, table, timed, trace_requests  # noqa: E402,I001

import torch  # noqa: E402
from xgrammar.contrib.hf import LogitsProcessor  # noqa: E402

from memlora.config import OPERATIONS, load_config  # noqa: E402
from memlora.llm.decoding import block_ngrams, greedy_decode  # noqa: E402
from memlora.llm.hf_backend import TransformersBackend  # noqa: E402


class NgramProcessor:
    """`block_ngrams` as a `generate` logits processor (the completion is what follows the prompt)."""

    def __init__(self, n: int, prompt_len: int):
        self.n, self.prompt_len = n, prompt_len

    def __call__(self, input_ids, scores):
        block_ngrams(scores, input_ids[:, self.prompt_len:].tolist(), self.n)
        return scores


@torch.inference_mode()
def with_generate(backend: TransformersBackend, batch) -> list[list[int]]:
    """What the backend did before: every row stays in the batch until the longest one ends."""
    enc, cache, _ = backend._encode(batch)
    processors = []
    if batch[0].constrained:
        processors.append(LogitsProcessor([backend.grammars.grammar(r.schema) for r in batch]))
    if batch[0].no_repeat_ngram:
        processors.append(NgramProcessor(batch[0].no_repeat_ngram, enc["input_ids"].shape[1]))
    out = backend.model.generate(**enc, past_key_values=cache, max_new_tokens=batch[0].max_new_tokens,
                                 do_sample=False, pad_token_id=backend.tokenizer.pad_token_id,
                                 logits_processor=processors, temperature=None, top_p=None, top_k=None)
    rows = []
    for seq in out[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(seq) if t in backend.stop_ids), len(seq))
        rows.append(seq[:cut])
    return rows


@torch.inference_mode()
def with_eviction(backend: TransformersBackend, batch) -> list[list[int]]:
    enc, cache, cached_len = backend._encode(batch)
    decoded = greedy_decode(
        backend.model, enc["input_ids"], enc["attention_mask"], cache=cache, cached_len=cached_len,
        max_new_tokens=batch[0].max_new_tokens, stop_ids=backend.stop_ids,
        grammars=[backend.grammars.grammar(r.schema) for r in batch] if batch[0].constrained else None,
        no_repeat_ngram=batch[0].no_repeat_ngram or 0,
    )
    return [d.tokens for d in decoded]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    batch_size, repeats = (2, 1) if args.quick else (args.batch, args.repeats)
    config = load_config(CONFIG)
    backend = TransformersBackend.from_config(config.teacher.model_copy(update={"device": "cpu"}))
    requests = trace_requests(args.out, batch_size, max_tokens=QUICK_TOKENS if args.quick else None)
    rows = []
    for op in OPERATIONS:
        ngram = config.memory.operations[op].no_repeat_ngram
        batch = [r.__class__(r.operation, r.messages, r.max_new_tokens, r.schema, ngram)
                 for r in requests if r.operation == op]
        with_eviction(backend, batch[:1])  # warm-up: compile the grammars, fill the prefix cache
        slow_t, slow = timed(lambda: with_generate(backend, batch), repeats)
        fast_t, fast = timed(lambda: with_eviction(backend, batch), repeats)
        lengths = [len(t) for t in fast]
        rows.append({
            "operation": op, "batch": len(batch), "mean_tokens": round(sum(lengths) / len(lengths), 1),
            "max_tokens": max(lengths), "generate_s": round(spread(slow_t)["median"], 2),
            "eviction_s": round(spread(fast_t)["median"], 2), "speedup": fmt(ratio_spread(slow_t, fast_t)),
            "same_tokens": f"{sum(a == b for a, b in zip(slow, fast))}/{len(batch)}",
            "generate_times": slow_t, "eviction_times": fast_t,
        })
    print(table(rows, ["operation", "batch", "mean_tokens", "max_tokens", "generate_s", "eviction_s", "speedup",
                       "same_tokens"]))
    total = summed_ratio(rows, "generate_times", "eviction_times", repeats)
    print(f"\nall three operations, generate / eviction wall time: {fmt(total)}")
    print("saved", save("decode_eviction", {"rows": rows, "total_speedup": total, "repeats": repeats}))


if __name__ == "__main__":
    main()
