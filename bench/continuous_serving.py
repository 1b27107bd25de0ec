"""`memlora serve-model` (the teacher) with continuous batching (`serving.continuous_batching`, the default: calls
join one running batch between decode steps and are answered the step they end) against merged batches decoded
to their longest row's end: the same OpenAI requests (the teacher's own trace requests, json_schema,
temperature 0) from 8 concurrent clients, each client sending its next call when its answer is back, as a memory
system does. The two servers run one after the other, each alone in its own process, twice, alternating. Prints
wall time, requests/s, per-operation p50 and whether the answers are identical; writes
bench/results/continuous_serving.json. `--experts`: `memlora serve-experts` instead (OUT's experts, folded beside
the student base: one running batch holds every expert's rows, against one merged batch per expert), written to
bench/results/continuous_serving_experts.json.

    python bench/continuous_serving.py [--quick] [--out OUT] [--experts]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (CONFIG, QUICK_TOKENS, REPO, bench_parser, fmt, free_port, peak_rss_mb, ratio_spread, save,  # noqa: E402,I001
                    student_with_experts, table, trace_requests)
from http_serving import body  # noqa: E402

import yaml  # noqa: E402

from memlora.serve import wait_healthy  # noqa: E402

MODES = {"merged": False, "running": True}


def config_with(continuous: bool, folder: Path) -> Path:
    data = yaml.safe_load(CONFIG.read_text())
    data["serving"] = {**(data.get("serving") or {}), "continuous_batching": continuous}
    path = folder / f"continuous-{continuous}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def serve_and_send(config: Path, requests: list, clients: int, log, experts: tuple[Path, Path] | None = None) -> dict:
    """`experts`: (student base, OUT with experts) served by serve-experts, else the teacher by serve-model."""
    import httpx

    port = free_port()
    memlora = str(Path(sys.executable).parent / "memlora")
    cmd = ([memlora, "serve-experts", "--config", str(config), "--out", str(experts[1]), "--base", str(experts[0])]
           if experts else [memlora, "serve-model", "--config", str(config), "--name", "teacher"])
    cmd += ["--port", str(port)]
    system = "student+experts" if experts else "teacher"
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=300)
        client = httpx.Client(timeout=600)

        def call(request) -> tuple[str, float, str]:
            started = time.perf_counter()
            response = client.post(f"{url}/v1/chat/completions", json=body(request, system))
            response.raise_for_status()
            return request.operation, time.perf_counter() - started, response.json()["choices"][0]["message"]["content"]

        for op in dict.fromkeys(r.operation for r in requests):  # warm-up: grammars compiled, prefixes cached
            call(next(r for r in requests if r.operation == op))
        # each client sends its share (every `clients`-th request) one call after another
        done: list = [None] * len(requests)

        def client_share(first: int) -> None:
            for i in range(first, len(requests), clients):
                done[i] = call(requests[i])

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client_share, range(clients)))
        wall = time.perf_counter() - started
        latency = {op: [s for o, s, _ in done if o == op] for op in dict.fromkeys(r.operation for r in requests)}
        return {"wall_s": wall, "latency": latency, "answers": [text for _, _, text in done],
                "peak_rss_mb": peak_rss_mb(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--per-op", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--experts", action="store_true", help="serve-experts (OUT's experts) instead of the teacher")
    args = parser.parse_args()
    name = "continuous_serving_experts" if args.experts else "continuous_serving"
    per_op = args.per_op or (1 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 2)
    requests = trace_requests(args.out, per_op, max_tokens=QUICK_TOKENS if args.quick else None)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="memlora-continuous-serving-") as tmp:
        scratch = Path(tmp)
        configs = {mode: config_with(on, scratch) for mode, on in MODES.items()}
        try:
            experts = student_with_experts(args.out, scratch) if args.experts else None
            for _ in range(repeats):
                for mode in MODES:
                    with open(scratch / f"{mode}.log", "ab") as log:
                        runs[mode].append(serve_and_send(configs[mode], requests, args.clients, log, experts))
        except BaseException:  # the servers' logs go with the scratch folder: their tails first
            for path in sorted(scratch.glob("*.log")):
                print(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}", file=sys.stderr)
            raise
    rows = []
    for mode, records in runs.items():
        walls = [r["wall_s"] for r in records]
        row = {"batching": mode, "calls": len(requests), "clients": args.clients,
               "wall_s": round(statistics.median(walls), 2),
               "requests_per_s": round(len(requests) / statistics.median(walls), 3),
               "peak_rss_mb": round(max(r["peak_rss_mb"] for r in records))}
        for op in records[0]["latency"]:
            row[f"{op}_p50_s"] = round(statistics.median(s for r in records for s in r["latency"][op]), 2)
        rows.append(row)
    print(table(rows, list(rows[0])))
    speedup = ratio_spread([r["wall_s"] for r in runs["merged"]], [r["wall_s"] for r in runs["running"]])
    same = sum(a == b for a, b in zip(runs["merged"][0]["answers"], runs["running"][0]["answers"]))
    print(f"\nwall time, merged / running: {fmt(speedup)}; answers identical: {same}/{len(requests)}")
    print("saved", save(name, {"rows": rows, "merged_over_running_wall": speedup,
                               "identical_answers": f"{same}/{len(requests)}", "repeats": repeats,
                               "walls": {m: [r["wall_s"] for r in recs] for m, recs in runs.items()}}))


if __name__ == "__main__":
    main()
