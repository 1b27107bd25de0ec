"""Serving over HTTP: the student + experts (`memlora serve-experts`) vs the teacher (`memlora serve-model`), the
same OpenAI requests (the teacher's own trace requests, json_schema, temperature 0) sent to each server in turn:
per-operation latency p50/p95 with 1 client, requests/s with 1 and 8 concurrent clients (8 clients of mixed
operations is what the per-expert batching serves), and each server process's peak RSS. Each server runs alone
in its own process. A third server, serve-experts with `--fallback` and thresholds that keep every call, measures
what deferral costs when it does not fire (confidence from the chosen tokens' log-probs on every call): its p50
per operation against serve-experts without it. Two more, with `--fallback` to a real `serve-model` teacher, measure
what deferral costs when it always fires, against the teacher alone (1 client): thresholds that keep nothing
(`inf`, what calibration writes where no threshold meets the budget), where the call goes straight to the
teacher, and thresholds no answer reaches, where the expert decodes first and is then overruled. The teacher and
serve-experts, and both deferring servers, also answer each request streamed (`stream: true`): seconds to the first
text against the whole answer (where the teacher answers a deferred call, its own stream is passed on). Writes
bench/results/http_serving.json.

    python bench/http_serving.py [--quick] [--out OUT]   (OUT: use its traces and trained experts)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (CONFIG, QUICK_TOKENS, REPO, bench_parser, free_port, peak_rss_mb, percentile, save,  # noqa: E402
                    student_with_experts, table, trace_requests)

from memlora.serve import wait_healthy  # noqa: E402

SYSTEMS = ("teacher", "student+experts", "student+experts+deferral")
STREAMED = ("teacher", "student+experts")  # also measured streamed: time to the first text against the whole
KEEP_ALL = "student+experts+deferral"  # serve-experts --fallback, every call kept: deferral's cost when idle
# serve-experts --fallback to a running teacher, every call deferred: thresholds of inf (straight to the teacher) or
# above any confidence (the expert decodes, then the teacher answers); threshold per system
ALWAYS_DEFER = {"deferral, keeps nothing": float("inf"), "deferral, never sure": 1.0}


def start_server(system: str, port: int, base: Path, experts_out: Path, scratch: Path, log,
                 teacher_url: str | None = None) -> subprocess.Popen:
    memlora = str(Path(sys.executable).parent / "memlora")
    if system == "teacher":
        cmd = [memlora, "serve-model", "--config", str(CONFIG), "--name", "teacher", "--port", str(port)]
    elif system == KEEP_ALL:
        cmd = [memlora, "serve-experts", "--config", str(CONFIG), "--out", str(thresholds_out(experts_out, scratch)),
               "--base", str(base), "--port", str(port), "--fallback", f"http://127.0.0.1:{free_port()}/v1",
               "--fallback-degraded"]
    elif system in ALWAYS_DEFER:
        out = thresholds_out(experts_out, scratch, ALWAYS_DEFER[system])
        cmd = [memlora, "serve-experts", "--config", str(CONFIG), "--out", str(out), "--base", str(base),
               "--port", str(port), "--fallback", teacher_url, "--fallback-model", "teacher"]
    else:
        cmd = [memlora, "serve-experts", "--config", str(CONFIG), "--out", str(experts_out), "--base", str(base),
               "--port", str(port)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)


def thresholds_out(experts_out: Path, scratch: Path, threshold: float = float("-inf")) -> Path:
    """An OUT under `scratch` (removed with it) with a copy of the experts and their manifest, whose deferral.json
    has `threshold` for every class (-inf: keeps every call), so a user's own OUT and its thresholds are never
    touched (a link would not do: a load checks that each adapter file resolves inside the OUT whose manifest lists
    it)."""
    import json
    import shutil

    from memlora.config import OPERATIONS
    from memlora.layout import deferral_path

    out = Path(tempfile.mkdtemp(prefix="thresholds-", dir=scratch))
    shutil.copytree(Path(experts_out) / "adapters", out / "adapters")
    shutil.copy(Path(experts_out) / "manifest.json", out / "manifest.json")
    always = {"value": threshold}
    deferral_path(out).write_text(json.dumps({"operations": {op: {"keep": always, "destructive": always}
                                                              for op in OPERATIONS}}))
    return out


def body(request, system: str) -> dict:
    payload = {"model": "teacher" if system == "teacher" else f"memlora-{request.operation}",
               "messages": request.messages, "max_tokens": request.max_new_tokens, "temperature": 0}
    if request.schema is not None:
        payload["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": request.operation, "schema": request.schema}}
    return payload


def measure(system: str, url: str, requests: list, repeats: int, clients_tried=(1, 8)) -> dict:
    import httpx

    client = httpx.Client(timeout=600)

    def call(request) -> tuple[str, float, int]:
        started = time.perf_counter()
        response = client.post(f"{url}/v1/chat/completions", json=body(request, system))
        response.raise_for_status()
        if system == KEEP_ALL:  # the thresholds keep every call: the answer must be the expert's own
            assert response.headers["x-memlora-answered-by"] == "expert", response.headers
        if system in ALWAYS_DEFER:  # the teacher's answer; the expert's confidence only where it decoded first
            assert response.headers["x-memlora-answered-by"] == "teacher", response.headers
            decoded = "x-memlora-confidence" in response.headers
            assert decoded == (ALWAYS_DEFER[system] != float("inf")), response.headers
        return request.operation, time.perf_counter() - started, response.json()["usage"]["completion_tokens"]

    for op in dict.fromkeys(r.operation for r in requests):  # warm-up: grammars compiled, prefixes cached
        call(next(r for r in requests if r.operation == op))
    one: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    throughput = {}
    for clients in clients_tried:
        work = requests * repeats
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            done = list(pool.map(call, work))
        throughput[clients] = len(work) / (time.perf_counter() - started)
        if clients == 1:
            for op, seconds, n in done:
                one.setdefault(op, []).append(seconds)
                tokens.setdefault(op, []).append(n)
    return {"latency": one, "tokens": tokens, "requests_per_s": throughput}


def streamed(system: str, url: str, requests: list) -> dict:
    """Each request once more with `stream: true` (1 client): seconds to the first piece of the answer's text and
    to its end, per operation. Without judging or log-probs the text goes out as it is decoded."""
    import json

    import httpx

    first: dict[str, list[float]] = {}
    whole: dict[str, list[float]] = {}
    with httpx.Client(timeout=600) as client:
        for request in requests:
            started, seen = time.perf_counter(), None
            with client.stream("POST", f"{url}/v1/chat/completions", json={**body(request, system), "stream": True}) \
                    as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if seen is None and line.startswith("data: {"):
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        if (choices[0].get("delta") or {}).get("content"):
                            seen = time.perf_counter() - started
            first.setdefault(request.operation, []).append(seen if seen is not None else float("nan"))
            whole.setdefault(request.operation, []).append(time.perf_counter() - started)
    return {"first_text_s": first, "whole_s": whole}


def always_deferred(base: Path, experts_out: Path, scratch: Path, requests: list, repeats: int) -> dict:
    """The ALWAYS_DEFER servers, one after the other, each in front of the same running teacher; 1 client, so the
    expert and the teacher never decode at once."""
    records = {}
    teacher_port = free_port()
    with open(scratch / "fallback-teacher.log", "wb") as teacher_log:
        teacher = start_server("teacher", teacher_port, base, experts_out, scratch, teacher_log)
        try:
            wait_healthy(f"http://127.0.0.1:{teacher_port}", teacher, timeout_s=300)
            for system in ALWAYS_DEFER:
                port = free_port()
                with open(scratch / f"{system}.log", "wb") as log:
                    proc = start_server(system, port, base, experts_out, scratch, log,
                                        teacher_url=f"http://127.0.0.1:{teacher_port}/v1")
                    try:
                        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout_s=300)
                        records[system] = measure(system, f"http://127.0.0.1:{port}", requests, repeats, (1,))
                        records[system]["stream"] = streamed(system, f"http://127.0.0.1:{port}", requests)
                        records[system]["peak_rss_mb"] = peak_rss_mb(proc.pid)
                    finally:
                        proc.terminate()
                        proc.wait(timeout=60)
        finally:
            teacher.terminate()
            teacher.wait(timeout=60)
    return records


def per_token(record: dict, op: str) -> float:
    return statistics.median(s / max(n, 1) for s, n in zip(record["latency"][op], record["tokens"][op]))


def stream_row(system: str, op: str, stream: dict) -> dict:
    first, whole = statistics.median(stream["first_text_s"][op]), statistics.median(stream["whole_s"][op])
    return {"system": system, "operation": op, "calls": len(stream["whole_s"][op]),
            "first_text_p50_s": f"{first:.3f}", "whole_p50_s": f"{whole:.3f}",
            "first_text_over_whole": f"{first / whole:.2f}x"}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--per-op", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    per_op = args.per_op or (1 if args.quick else 6)
    repeats = args.repeats or (1 if args.quick else 2)
    requests = trace_requests(args.out, per_op, max_tokens=QUICK_TOKENS if args.quick else None)
    records = {}
    with tempfile.TemporaryDirectory(prefix="memlora-bench-") as scratch:
        base, experts_out = student_with_experts(args.out, Path(scratch))
        for system in SYSTEMS:  # one server at a time: each has the machine to itself
            port = free_port()
            with open(Path(scratch) / f"{system}.log", "wb") as log:
                proc = start_server(system, port, base, experts_out, Path(scratch), log)
                try:
                    wait_healthy(f"http://127.0.0.1:{port}", proc, timeout_s=300)
                    records[system] = measure(system, f"http://127.0.0.1:{port}", requests, repeats)
                    if system in STREAMED:
                        records[system]["stream"] = streamed(system, f"http://127.0.0.1:{port}", requests)
                    records[system]["peak_rss_mb"] = peak_rss_mb(proc.pid)
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
            if proc.returncode not in (0, -15):
                raise SystemExit(f"{system} server exited with {proc.returncode}: "
                                 f"{(Path(scratch) / f'{system}.log').read_text()[-2000:]}")
        records.update(always_deferred(base, experts_out, Path(scratch), requests, repeats))

    teacher, student, keep_all = records["teacher"], records["student+experts"], records[KEEP_ALL]
    rows = []
    for op, t in teacher["latency"].items():
        s = student["latency"][op]
        rows.append({"operation": op, "calls": len(t),
                     "teacher_p50_s": f"{statistics.median(t):.3f}", "teacher_p95_s": f"{percentile(t, 0.95):.3f}",
                     "student_p50_s": f"{statistics.median(s):.3f}", "student_p95_s": f"{percentile(s, 0.95):.3f}",
                     "p50_ratio": f"{statistics.median(s) / statistics.median(t):.2f}x",
                     # Experts that write more or fewer tokens than the teacher (untrained ones do) cost more or
                     # less per call for that reason alone: seconds per generated token compares the machinery.
                     "tokens_t/s": f"{sum(teacher['tokens'][op])}/{sum(student['tokens'][op])}",
                     "per_token_ratio": f"{per_token(student, op) / per_token(teacher, op):.2f}x",
                     "deferral_kept_p50_s": f"{statistics.median(keep_all['latency'][op]):.3f}",
                     "deferral_overhead": f"{statistics.median(keep_all['latency'][op]) / statistics.median(s):.2f}x",
                     **{f"{name.split(', ')[1].replace(' ', '_')}_vs_teacher":
                        f"{statistics.median(records[name]['latency'][op]) / statistics.median(t):.2f}x"
                        for name in ALWAYS_DEFER}})
    print(table(rows, list(rows[0])))
    stream_rows = [stream_row(name, op, records[name]["stream"]) for name in (*STREAMED, *ALWAYS_DEFER)
                   for op in records[name]["stream"]["whole_s"]]
    print(table(stream_rows, list(stream_rows[0])))
    for name, r in records.items():
        rps = r["requests_per_s"]
        at_8 = f", 8 clients {rps[8]:.2f} (batching gain {rps[8] / rps[1]:.2f}x)" if 8 in rps else ""
        print(f"{name:<24} requests/s: 1 client {rps[1]:.2f}{at_8}; server peak RSS {r['peak_rss_mb']:.0f} MiB")
    print(f"student+experts / teacher: peak RSS {student['peak_rss_mb'] / teacher['peak_rss_mb']:.2f}x; "
          f"requests/s at 8 clients {student['requests_per_s'][8] / teacher['requests_per_s'][8]:.2f}x")
    print("saved", save("http_serving", {"rows": rows, "stream_rows": stream_rows, "records": records,
                                         "per_op": per_op, "repeats": repeats, "pid": os.getpid()}))


if __name__ == "__main__":
    main()
