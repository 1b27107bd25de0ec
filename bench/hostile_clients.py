"""Hostile clients against a real server: `memlora serve-model` on the embedded default's teacher, each attack of
issue 27's table sent beside well-behaved clients. Per attack: what the attacker got, what the well-behaved
clients got, the slowest /health answer while it ran against an idle one (the ratio says whether the attack
stalled the server for everyone), and the server's RSS before and after. All traffic goes to 127.0.0.1, bounded
in count. Writes bench/results/hostile_clients.json.

    python bench/hostile_clients.py [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CONFIG, REPO, bench_parser, free_port, save, table  # noqa: E402

from memlora.processes import stop_group  # noqa: E402
from memlora.serve import wait_healthy  # noqa: E402

VALID = [{"role": "user", "content": "Ann: I moved to Porto last year and I have a cat."}]


def deep_schema(levels: int) -> dict:
    schema: dict = {"type": "string", "maxLength": 3}
    for _ in range(levels - 1):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def main() -> None:
    import httpx

    args = bench_parser(__doc__).parse_args()
    long_tokens = 300 if args.quick else 1500
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    chat_url = f"{url}/v1/chat/completions"
    memlora = str(Path(sys.executable).parent / "memlora")
    log = tempfile.NamedTemporaryFile(prefix="hostile-", suffix=".log", delete=False)
    proc = subprocess.Popen([memlora, "serve-model", "--config", str(CONFIG), "--name", "teacher", "--port",
                             str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)

    def post(timeout: float = 600, **body) -> httpx.Response:
        return httpx.post(chat_url, json={"model": "teacher", "messages": VALID, "temperature": 0, "max_tokens": 16,
                                          **body}, timeout=timeout)

    def timed_post(started: float, text: str) -> tuple[httpx.Response, float]:
        """A well-behaved call, and when it was answered (seconds since the attack began)."""
        response = post(messages=[{"role": "user", "content": text}])
        return response, time.perf_counter() - started

    def raw(content: bytes) -> httpx.Response:
        return httpx.post(chat_url, content=content, timeout=600, headers={"content-type": "application/json"})

    def health() -> dict:
        return httpx.get(f"{url}/health", timeout=600).json()

    def hang_up(_):
        try:
            post(max_tokens=long_tokens, timeout=1.0)
        except httpx.TimeoutException:
            return "hung up"
        return "answered"

    def schema_flood(_):
        codes = []
        for i in range(40):
            name = f"field_{i}"
            codes.append(post(max_tokens=12, response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "object", "properties": {name: {"type": "integer"}},
                                        "required": [name]}}}).status_code)
        return f"{codes.count(200)} of 40 answered"

    attacks = {
        "seed 2**70": lambda _: post(seed=2**70, temperature=1.0),
        f"6 hang-ups in a {long_tokens}-token decode": lambda _: list(ThreadPoolExecutor(6).map(hang_up, range(6))),
        "10 MB body": lambda _: raw(json.dumps({"model": "teacher", "messages": [
            {"role": "user", "content": "x" * 10 * 2**20}]}).encode()),
        "40 different schemas": schema_flood,
        "schema nested 400 deep": lambda _: post(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": deep_schema(400)}}),
        "schema nested 32 deep (the limit)": lambda _: post(max_tokens=200, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": deep_schema(32)}}),
        "body nested 50,000 deep": lambda _: raw(b'{"model": "teacher", "metadata": ' + b"[" * 50_000 +
                                                 b"]" * 50_000 + b"}"),
        "lone surrogate": lambda _: raw(b'{"model": "teacher", "messages": [{"role": "user", '
                                        b'"content": "hi \\ud800"}]}'),
        "not: {} in a schema": lambda _: post(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "not": {}}}}),
        "max_tokens: true": lambda _: post(max_tokens=True),
    }

    def describe(got) -> str:
        if isinstance(got, httpx.Response):
            if got.status_code == 200:
                return "200"
            return f"{got.status_code} {got.json()['error']['message'][:60]}"
        return str(got) if not isinstance(got, list) else f"{got.count('hung up')} hung up"

    rows = []
    try:
        wait_healthy(url, proc, timeout_s=300)
        post()  # warm-up: the model's first call
        idle = []
        for _ in range(10):
            started = time.perf_counter()
            health()
            idle.append(time.perf_counter() - started)
        idle_s = max(idle)
        for name, attack in attacks.items():
            before = health()["rss_mib"]
            delays, stop = [], threading.Event()

            def watch():
                while not stop.is_set():
                    started = time.perf_counter()
                    health()
                    delays.append(time.perf_counter() - started)
                    time.sleep(0.05)

            watcher = threading.Thread(target=watch)
            watcher.start()
            started = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                attacker = pool.submit(attack, None)
                time.sleep(0.2)  # the well-behaved arrive while the attack is under way
                others = [pool.submit(timed_post, started, f"Ann: fact number {i}") for i in range(7)]
                got = attacker.result()
                answered = [f.result()[0] for f in others]
                others_s = max(f.result()[1] for f in others)
            stop.set()
            watcher.join()
            time.sleep(0.5)
            after = health()
            rows.append({
                "attack": name, "attacker got": describe(got),
                "others": f"{sum(r.status_code == 200 for r in answered)} of 7 ok",
                "others answered by (s)": f"{others_s:.1f}",
                "health max (s)": f"{max(delays, default=0):.2f}",
                "vs idle": f"{max(delays, default=0) / idle_s:.1f}x",
                "RSS MiB": f"{before:.0f} -> {after['rss_mib']:.0f}",
                "grammars": after["grammar_cache"]["size"],
            })
            print(rows[-1], flush=True)
    finally:
        stop_group(proc)
    columns = ["attack", "attacker got", "others", "others answered by (s)", "health max (s)", "vs idle", "RSS MiB",
               "grammars"]
    print(table(rows, columns))
    print(f"idle /health: {idle_s * 1000:.1f} ms (max of 10); server log: {log.name}")
    path = save("hostile_clients", {"long_tokens": long_tokens, "idle_health_s": idle_s, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
