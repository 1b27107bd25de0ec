"""Tracing's teacher calls: merged batches decoded to their end against a running batch that calls join between
decode steps (`memlora.llm.continuous`), side by side in one run, alternating. The traffic is the trace stage's
own: the embedded default's train and validation conversations through the memory system, all at once (each
conversation one call after another), sharing one teacher. Prints the wall time ratio with min/median/max over
repeats, the calls, and how many answers came out the same; writes bench/results/continuous_batching.json.

    python bench/continuous_batching.py [--quick] [--repeats N] [--sessions N]
"""

from __future__ import annotations

import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CONFIG, REPO, bench_parser, save, spread, table  # noqa: E402

from memlora.config import load_config  # noqa: E402
from memlora.data.ingest import prepare_corpus  # noqa: E402
from memlora.llm.batcher import MicroBatcher  # noqa: E402
from memlora.llm.continuous import continuous_decoder  # noqa: E402
from memlora.llm.hf_backend import TransformersBackend  # noqa: E402
from memlora.memory.embedder import Embedder  # noqa: E402
from memlora.memory.store import MemoryStore  # noqa: E402
from memlora.teacher.traces import trace_conversation  # noqa: E402

MODES = ("merged batches", "running batch")


def trace_all(mode: str, teacher, conversations, embedder, config, scratch: Path) -> tuple[float, list[str], int]:
    """(wall seconds, every call's raw output in conversation and call order, completion tokens)."""
    import time

    size = config.teacher.batch_size
    decoder = continuous_decoder(teacher, size) if mode == "running batch" else None
    batcher = MicroBatcher(teacher, size, decoder=decoder)
    store = MemoryStore(scratch / f"{mode.replace(' ', '-')}.sqlite")
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=len(conversations)) as pool:
            rows = list(pool.map(lambda c: trace_conversation(c, batcher, embedder, store, config), conversations))
        wall = time.perf_counter() - started
    finally:
        batcher.close()
        store.close()
    calls = [r for per_op in rows for op in ("extraction", "update", "generation") for r in per_op[op]]
    return wall, [r["raw_output"] for r in calls], sum(r["completion_tokens"] for r in calls)


def main() -> None:
    parser = bench_parser(__doc__)  # --out is not used: the traffic is the bundled sample's conversations
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=None, help="sessions per conversation (default: all)")
    args = parser.parse_args()
    config = load_config(CONFIG)
    corpus = prepare_corpus(REPO / "data" / "samples" / "locomo_sample12.json", config.data)
    conversations = [c for c in corpus if c.split in ("train", "validation")]
    repeats, sessions = (1, 1) if args.quick else (args.repeats, args.sessions)
    if args.quick:
        conversations = conversations[:2]
    data = config.data.model_copy(update={"max_sessions": sessions, **({"max_questions": 1} if args.quick else {})})
    config = config.model_copy(update={"data": data})
    teacher = TransformersBackend.from_config(config.teacher.model_copy(update={"device": "cpu"}))
    embedder = Embedder(config.memory.embedder)
    times = {m: [] for m in MODES}
    outputs, tokens = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        if not args.quick:  # warm-up: grammars, prefixes (a smoke run times nothing worth keeping)
            trace_all(MODES[0], teacher, conversations[:1], embedder, config, Path(scratch))
        for repeat in range(repeats):
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                wall, outputs[mode], tokens[mode] = trace_all(mode, teacher, conversations, embedder, config,
                                                              Path(scratch))
                times[mode].append(wall)
    base, cont = outputs[MODES[0]], outputs[MODES[1]]
    same = sum(a == b for a, b in zip(base, cont))
    rows = [{"mode": m, "calls": len(outputs[m]), "tokens": tokens[m], "wall_s": round(spread(times[m])["median"], 1),
             "tok_per_s": round(tokens[m] / spread(times[m])["median"], 1)} for m in MODES]
    ratio = spread([a / b for a, b in zip(times[MODES[0]], times[MODES[1]])])
    print(table(rows, ["mode", "calls", "tokens", "wall_s", "tok_per_s"]))
    print(f"\n{len(conversations)} conversations at once; merged / running wall time: {ratio['median']:.2f}x "
          f"(min {ratio['min']:.2f}, max {ratio['max']:.2f}, {repeats} repeat(s)); identical answers: {same} of "
          f"{min(len(base), len(cont))} calls in order (a call decoded beside other rows may differ in a last float "
          f"bit, and a different answer changes the memory the next calls see)")
    print("saved", save("continuous_batching", {"rows": rows, "merged_over_running_wall": ratio, "times": times,
                                                "conversations": len(conversations), "sessions": sessions,
                                                "identical_calls": same, "repeats": repeats}))


if __name__ == "__main__":
    main()
