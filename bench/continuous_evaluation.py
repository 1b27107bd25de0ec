"""The evaluation's systems with their test conversations' calls in merged batches decoded to their end against
one running batch that calls join between decode steps (`evaluation.continuous_batching`), side by side in one
run, alternating. Each system runs as `memlora evaluate` runs it (its own process, the teacher first, the
students replaying that mode's teacher requests) on a scratch copy of OUT's inputs, so OUT's own results stay.
Prints per system the decoding phases' time, load, p50 per call, peak RSS and how many calls came out the same,
and the whole evaluation's ratio; writes bench/results/continuous_evaluation.json.

    python bench/continuous_evaluation.py --out OUT [--repeats N] [--first running] [--systems teacher ...]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CONFIG, bench_parser, percentile, save, spread, table  # noqa: E402

from memlora.config import OPERATIONS, load_config  # noqa: E402
from memlora.evaluation.plan import prepare  # noqa: E402
from memlora.evaluation.process import run_system_process  # noqa: E402
from memlora.evaluation.systems import TEACHER, systems  # noqa: E402
from memlora.layout import ADAPTERS, EVAL, calls_path  # noqa: E402

MODES = ("merged", "running")
PHASES = ("e2e_s", "forced_s", "forced_free_s")


def scratch_out(out: Path, folder: Path) -> Path:
    """OUT's inputs, its evaluation and memory stores left out: a mode's results never mix with OUT's. The
    experts and the manifest they are checked against are copied (a link would lead outside the folder), the
    rest linked."""
    folder.mkdir(parents=True)
    for entry in out.iterdir():
        if entry.name in (ADAPTERS, "manifest.json"):
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, folder / entry.name)
        elif entry.name not in (EVAL, "memory", ".jobs"):
            (folder / entry.name).symlink_to(entry.resolve())
    return folder


def run_mode(config, chosen: list[str], base: str, folder: Path) -> dict:
    """{system: (probe, calls)} of one mode, the teacher first (the students replay its requests)."""
    runs = {}
    for system in chosen:
        probe = run_system_process(config, folder, system, base=base, timeout_s=config.evaluation.timeout_s)
        runs[system] = (probe, pq.read_table(calls_path(folder, system)).to_pylist())
    return runs


def phase_seconds(probe) -> float:
    return sum(probe.timings.get(k, 0) for k in PHASES)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--systems", nargs="*", default=None, help="default: the config's systems")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--first", choices=MODES, default=MODES[0], help="the mode the first repeat runs first")
    args = parser.parse_args()
    if args.out is None:
        parser.error("--out: a finished `memlora run`'s OUT (its datasets, student and experts)")
    out = Path(args.out).resolve()
    config = load_config(args.config)
    chosen = [s for s in systems(config) if args.systems is None or s in args.systems]
    if TEACHER not in chosen:
        chosen.insert(0, TEACHER)
    base = prepare(config, out).base
    configs = {m: config.model_copy(update={"evaluation": config.evaluation.model_copy(
        update={"continuous_batching": m == "running"})}) for m in MODES}
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            order = MODES if args.first == MODES[0] else MODES[::-1]
            for mode in order if repeat % 2 == 0 else order[::-1]:
                folder = scratch_out(out, Path(scratch) / f"{mode}-{repeat}")
                runs[mode].append(run_mode(configs[mode], chosen, base, folder))
                print(f"repeat {repeat + 1}, {mode}: "
                      + ", ".join(f"{s} {phase_seconds(p):.1f} s"
                                  for s, (p, _) in runs[mode][-1].items()), flush=True)
    rows, same = [], {}
    for system in chosen:
        last = {m: runs[m][-1][system][1] for m in MODES}
        pairs = list(zip(last["merged"], last["running"]))
        same[system] = {"calls": len(pairs), "identical": sum(a["raw_output"] == b["raw_output"] for a, b in pairs)}
        for mode in MODES:
            seconds = [phase_seconds(r[system][0]) for r in runs[mode]]
            probe, calls = runs[mode][-1][system]
            rows.append({"system": system, "mode": mode, "phases_s": round(spread(seconds)["median"], 1),
                         "load_s": round(probe.load_s or 0, 1), "peak_rss_e2e_mb": round(probe.peak_rss_e2e_mb or 0),
                         "batching": probe.batching,
                         **{f"{op}_p50_s": round(percentile([c["latency_s"] for c in calls
                                                             if c["operation"] == op and c["phase"] == "e2e"], 50), 3)
                            for op in OPERATIONS}})
    totals = {m: [sum(phase_seconds(p) for p, _ in r.values()) for r in runs[m]]
              for m in MODES}
    ratio = spread([a / b for a, b in zip(totals["merged"], totals["running"])])
    print(table(rows, ["system", "mode", "batching", "phases_s", "load_s", "peak_rss_e2e_mb",
                       *(f"{op}_p50_s" for op in OPERATIONS)]))
    print(f"\ndecoding phases of {len(chosen)} systems, merged / running: {ratio['median']:.2f}x (min "
          f"{ratio['min']:.2f}, max {ratio['max']:.2f}, {args.repeats} repeat(s)); calls identical in order "
          "(last repeat): " + ", ".join(f"{s} {v['identical']}/{v['calls']}" for s, v in same.items())
          + " (a different answer changes the memory the next calls see, and the students replay each mode's own "
          "teacher requests)")
    print("saved", save("continuous_evaluation", {"rows": rows, "merged_over_running_phases": ratio,
                                                  "totals": totals, "identical_calls": same,
                                                  "repeats": args.repeats, "systems": chosen}))


if __name__ == "__main__":
    main()
