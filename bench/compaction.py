"""Captured calls, one shard per call, against the same calls merged (`memlora compact`), side by side in one run:
what every stage after capture pays to list an operation's traces, read them (`load_traces`), fingerprint them
(the experts' cache key, `improve`'s new rows) and describe them in the manifest, and the bytes on disk. The
calls are the bundled sample's real teacher extraction calls (with their top-k log-probs), recorded again and
again as `capture` records one. Writes bench/results/compaction.json.

    python bench/compaction.py [--quick] [--calls N] [--repeats R]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SAMPLE_TRACES, bench_parser, save, spread, table, timed  # noqa: E402

from memlora.data.compaction import compact  # noqa: E402
from memlora.layout import trace_files, traces_dir  # noqa: E402
from memlora.manifest import describe_file  # noqa: E402
from memlora.student.examples import load_traces, traces_fingerprint  # noqa: E402
from memlora.teacher.capture import CaptureRecorder  # noqa: E402

OP = "extraction"


def record(out: Path, calls: int) -> None:
    recorder = CaptureRecorder(out)
    sample = load_traces(trace_files(SAMPLE_TRACES.parent, OP)).to_pylist()
    for i in range(calls):
        row = sample[i % len(sample)]
        call = f"{recorder.run_id}-{i:06d}"
        recorder.write({**row, "trace_id": f"user-{i % 50}:{OP}:{call}", "conversation_id": f"user-{i % 50}",
                        "backend": "capture"})


def measure(out: Path, repeats: int) -> dict:
    folder = traces_dir(out, OP)
    stages = {
        "list": lambda: trace_files(out, OP),
        "read": lambda: load_traces(trace_files(out, OP)),
        "fingerprint": lambda: traces_fingerprint(trace_files(out, OP)),
        "manifest": lambda: [describe_file(f, out) for f in trace_files(out, OP)],
    }
    result = {"files": len(trace_files(out, OP)), "bytes": sum(f.stat().st_size for f in folder.glob("*.parquet")),
              "rows": load_traces(trace_files(out, OP)).num_rows}
    for name, fn in stages.items():
        fn()  # once untimed: the files in the page cache for both layouts alike
        result[f"{name}_s"] = spread(timed(fn, repeats)[0])
    return result


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--calls", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    calls = args.calls or (200 if args.quick else 10_000)
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="memlora-bench-") as scratch:
        out = Path(scratch) / "out"
        started = time.perf_counter()
        record(out, calls)
        record_s = time.perf_counter() - started
        shards = measure(out, repeats)
        started = time.perf_counter()
        done = compact(traces_dir(out, OP), OP)
        compact_s = time.perf_counter() - started
        merged = measure(out, repeats)
    assert merged["rows"] == shards["rows"] == calls and done.shards == calls
    rows = [{"stage": stage, "shards_s": f"{shards[f'{stage}_s']['median']:.3f}",
             "merged_s": f"{merged[f'{stage}_s']['median']:.3f}",
             "ratio": f"{shards[f'{stage}_s']['median'] / max(merged[f'{stage}_s']['median'], 1e-9):.1f}x"}
            for stage in ("list", "read", "fingerprint", "manifest")]
    print(table(rows, list(rows[0])))
    print(f"{calls} calls: {shards['files']} files, {shards['bytes'] / 2**20:.1f} MiB as shards -> "
          f"{merged['files']} file(s), {merged['bytes'] / 2**20:.1f} MiB merged "
          f"({shards['bytes'] / merged['bytes']:.1f}x); recording them took {record_s:.1f} s, "
          f"merging {compact_s:.1f} s")
    print("saved", save("compaction", {"calls": calls, "repeats": repeats, "rows": rows, "shards": shards,
                                       "merged": merged, "record_s": record_s, "compact_s": compact_s}))


if __name__ == "__main__":
    main()
