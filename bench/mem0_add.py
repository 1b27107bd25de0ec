"""Mem0's own `add()` through our servers, side by side in one run: the teacher (`memlora serve-model`) vs the
student + experts distilled from Mem0's captured calls (`memlora serve-experts`, model `memlora`: the expert of
each call is picked by the config's capture rules, since Mem0 sends every call under one model name), twice:
experts that read Mem0's whole prompt (`student.prompt: teacher`) and experts that read only what changes in it
(`student.prompt: minimal`, the client template mined from the captured calls), trained on the same calls.

Each held-out conversation is added a few turns per `add()`, as an application would, and the two systems'
`add()` calls alternate (each system has its own Mem0, vector store and history), so both see the same machine.
Reports wall time per `add()` and per conversation, the LLM calls and input tokens per call behind them (the
servers' usage: what each model read), what Mem0 did with the answers (ADD/UPDATE/DELETE events: memories
created), and each server's peak RSS. Where capture held a test share out (`capture.test_ratio`, set here unless
--quick), both kinds of experts are evaluated on those held-out calls (`memlora evaluate` on captured traffic):
agreement with the teacher's answers with 95 % intervals.

Without `--out`, the recipe runs first, as the README's "Distil your Mem0" does: serve-model behind capture, Mem0
`add()`s the training conversations, `memlora distill` (one epoch here, to keep the bench short).

    python bench/mem0_add.py [--quick] [--out OUT] [--config configs/mem0.yaml]
        (OUT: the output of `memlora capture` + `memlora distill`; any other OUT is ignored)
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from common import REPO, bench_parser, free_port, peak_rss_mb, save, table  # noqa: E402

from memlora.data.loaders import LoadOptions, load_corpus  # noqa: E402
from memlora.mem0_client import mem0_memory, mem0_messages  # noqa: E402
from memlora.processes import stop_group  # noqa: E402
from memlora.serve import wait_healthy  # noqa: E402

SAMPLE = REPO / "data" / "samples" / "locomo_sample12.json"
SYSTEMS = ("teacher", "experts-whole", "experts-reduced")  # the experts read Mem0's whole prompt / what changes
MEMLORA = str(Path(sys.executable).parent / "memlora")
MAX_TOKENS = 300  # per LLM call, as in the README's Mem0 config


def bench_config(source: Path, folder: Path, quick: bool, prompt: str = "minimal") -> Path:
    """The user's config with a short distill: one epoch (quick: one step of a 10-layer student), the experts
    reading `prompt`, and a test share of the captured calls to evaluate on (blocks of 4 consecutive calls)."""
    raw = yaml.safe_load(source.read_text())
    raw.setdefault("distill", {}).update(max_epochs=1)
    raw.setdefault("student", {})["prompt"] = prompt
    if quick:
        raw["distill"].update(max_steps=1, batch_size=1)
        raw["student"]["prune"] = {"from": "teacher", "every": 3}
    else:
        raw.setdefault("capture", {}).update(test_ratio=0.25, test_block=4)
    path = folder / f"mem0-bench-{prompt}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # a schema's property order is its output's
    return path


def start(args: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen([MEMLORA, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=REPO)


def up(proc: subprocess.Popen, port: int, log_path: Path) -> str:
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=300)
    except (RuntimeError, TimeoutError) as err:
        raise SystemExit(f"{err}: {log_path.read_text()[-2000:]}") from None
    return url


class Usage:
    """Tokens of every LLM answer one Mem0 instance receives, and how many were cut by the token budget (Mem0
    cannot parse those: it logs "Invalid JSON response" and drops the call's facts or decisions)."""

    def __init__(self) -> None:
        self.calls = self.prompt = self.completion = self.cut = 0

    def __call__(self, response) -> None:
        self.calls += 1
        self.cut += response.choices[0].finish_reason == "length"
        self.prompt += response.usage.prompt_tokens
        self.completion += response.usage.completion_tokens


def chunks(conversation, turns: int, per_add: int) -> list[list[dict]]:
    return [mem0_messages(conversation, start, per_add) for start in range(0, min(turns, len(conversation.turns)),
                                                                            per_add)]


def distilled_from_capture(out: Path) -> bool:
    """OUT's experts learnt from captured calls (a pipeline run's OUT, whose experts speak our own prompts, is
    not what Mem0 would be served: the recipe then runs in scratch)."""
    return (out / "adapters").is_dir() and any((out / "traces").glob("*/part-capture-*.parquet"))


def capture(config: Path, out: Path, scratch: Path, train: list, turns: int, per_add: int) -> None:
    teacher_port, capture_port = free_port(), free_port()
    teacher = start(["serve-model", "--config", str(config), "--name", "teacher", "--port", str(teacher_port)],
                    scratch / "capture-teacher.log")
    capture = start(["capture", "--config", str(config), "--out", str(out), "--port", str(capture_port),
                     "--upstream", f"http://127.0.0.1:{teacher_port}/v1"], scratch / "capture.log")
    try:
        up(teacher, teacher_port, scratch / "capture-teacher.log")
        url = up(capture, capture_port, scratch / "capture.log")
        memory = mem0_memory(f"{url}/v1", "teacher", scratch / "m0-capture", max_tokens=MAX_TOKENS)
        started = time.perf_counter()
        for conversation in train:
            for messages in chunks(conversation, turns, per_add):
                memory.add(messages, user_id=conversation.conversation_id)
        print(f"captured Mem0's calls on {len(train)} conversations in {time.perf_counter() - started:.0f} s")
    finally:
        stop_group(capture)
        stop_group(teacher)


def memlora(command: str, config: Path, out: Path, scratch: Path) -> float:
    """Runs `memlora COMMAND --config --out`; its seconds."""
    env = dict(os.environ, PREFECT_HOME=str(scratch / "prefect"))
    started = time.perf_counter()
    done = subprocess.run([MEMLORA, command, "--config", str(config), "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"memlora {command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    print(done.stdout.strip()[-1500:], f"\nmemlora {command} ({out.name}) in {time.perf_counter() - started:.0f} s")
    return time.perf_counter() - started


def whole_prompt_out(out: Path, scratch: Path) -> Path:
    """An OUT with `out`'s captured calls for the experts that read Mem0's whole prompt."""
    whole = scratch / "out-whole"
    (whole / "traces").mkdir(parents=True)
    for folder in (out / "traces").iterdir():
        shutil.copytree(folder, whole / "traces" / folder.name)
    return whole


def has_test_share(out: Path) -> bool:
    """Whether capture held some calls out for testing (`capture.test_ratio`)."""
    import pyarrow.parquet as pq

    from memlora.data.split import captured_split

    return any(captured_split(cid) == "test" for f in (out / "traces").glob("*/part-capture-*.parquet")
               for cid in pq.read_table(f, columns=["conversation_id"]).column(0).to_pylist())


def held_out_agreement(out: Path) -> dict:
    """The student + experts' agreement with the teacher on capture's test share (`memlora evaluate`'s rows)."""
    import pyarrow.parquet as pq

    from memlora.layout import results_path

    rows = pq.read_table(results_path(out)).to_pylist()
    return {f"{r['operation']}.{r['metric']}": {"value": r["value"], "ci": [r["ci_low"], r["ci_high"]], "n": r["n"]}
            for r in rows if r["system"] == "student+experts" and r["section"] in ("agreement", "latency")
            and r["metric"] in ("fact_f1", "event_macro_f1", "prompt_tokens")}


def measure(urls: dict[str, str], scratch: Path, held_out: list, turns: int, per_add: int) -> dict:
    usage = {s: Usage() for s in SYSTEMS}
    memories = {s: mem0_memory(f"{urls[s]}/v1", "teacher" if s == "teacher" else "memlora", scratch / f"m0-{s}",
                               max_tokens=MAX_TOKENS, on_response=usage[s]) for s in SYSTEMS}
    walls: dict[str, dict[str, list[float]]] = {s: {} for s in SYSTEMS}
    events: dict[str, Counter] = {s: Counter() for s in SYSTEMS}
    for conversation in held_out:
        for i, messages in enumerate(chunks(conversation, turns, per_add)):
            for system in (SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]):  # alternate who goes first
                started = time.perf_counter()
                result = memories[system].add(messages, user_id=conversation.conversation_id)
                walls[system].setdefault(conversation.conversation_id, []).append(time.perf_counter() - started)
                events[system].update(r.get("event", "?") for r in result["results"])
    stored = {s: sum(len(memories[s].get_all(user_id=c.conversation_id)["results"]) for c in held_out)
              for s in SYSTEMS}
    return {s: {"add_wall_s": walls[s], "events": dict(events[s]), "stored": stored[s], "calls": usage[s].calls,
                "cut_by_budget": usage[s].cut, "prompt_tokens": usage[s].prompt,
                "completion_tokens": usage[s].completion} for s in SYSTEMS}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--config", default=str(REPO / "configs" / "mem0.yaml"))
    args = parser.parse_args()
    turns, per_add = (2, 2) if args.quick else (16, 2)
    corpus = load_corpus(SAMPLE, LoadOptions())
    train, held_out = (corpus[:1], corpus[1:2]) if args.quick else (corpus[:4], corpus[4:6])
    with tempfile.TemporaryDirectory(prefix="memlora-bench-") as tmp:
        scratch = Path(tmp)
        configs = {s: bench_config(Path(args.config), scratch, args.quick, prompt)
                   for s, prompt in (("experts-whole", "teacher"), ("experts-reduced", "minimal"))}
        configs["teacher"] = configs["experts-reduced"]
        distill_s = {}
        if args.out and distilled_from_capture(Path(args.out)):
            out = Path(args.out)
        else:
            out = scratch / "out"
            capture(configs["experts-reduced"], out, scratch, train, turns, per_add)
            distill_s["experts-reduced"] = memlora("distill", configs["experts-reduced"], out, scratch)
        outs = {"experts-reduced": out, "experts-whole": whole_prompt_out(out, scratch)}
        distill_s["experts-whole"] = memlora("distill", configs["experts-whole"], outs["experts-whole"], scratch)
        agreement = {}
        if has_test_share(out):
            for s in ("experts-whole", "experts-reduced"):
                memlora("evaluate", configs[s], outs[s], scratch)
                agreement[s] = held_out_agreement(outs[s])
        ports = {s: free_port() for s in SYSTEMS}
        logs = {s: scratch / f"{s}.log" for s in SYSTEMS}
        procs = {"teacher": start(["serve-model", "--config", str(configs["teacher"]), "--name", "teacher",
                                   "--port", str(ports["teacher"])], logs["teacher"])}
        for s in ("experts-whole", "experts-reduced"):
            procs[s] = start(["serve-experts", "--config", str(configs[s]), "--out", str(outs[s]), "--port",
                              str(ports[s])], logs[s])
        try:
            urls = {s: up(procs[s], ports[s], logs[s]) for s in SYSTEMS}
            records = measure(urls, scratch, held_out, turns, per_add)
            for s in SYSTEMS:
                records[s]["peak_rss_mb"] = peak_rss_mb(procs[s].pid)
        finally:
            for proc in procs.values():
                stop_group(proc)

    rows = []
    for s, r in records.items():
        adds = [w for ws in r["add_wall_s"].values() for w in ws]
        per_conversation = [sum(ws) for ws in r["add_wall_s"].values()]
        rows.append({"system": s, "conversations": len(per_conversation), "adds": len(adds),
                     "add_p50_s": f"{statistics.median(adds):.2f}", "add_max_s": f"{max(adds):.2f}",
                     "per_conversation_s": " / ".join(f"{w:.1f}" for w in per_conversation),
                     "llm_calls": r["calls"], "cut": r["cut_by_budget"],
                     "tokens_in_per_call": f"{r['prompt_tokens'] / max(r['calls'], 1):.0f}",
                     "tokens_in/out": f"{r['prompt_tokens']}/{r['completion_tokens']}",
                     "events": " ".join(f"{k}:{v}" for k, v in sorted(r["events"].items())) or "-",
                     "memories": r["stored"], "peak_rss_MiB": f"{r['peak_rss_mb']:.0f}"})
    print(table(rows, list(rows[0])))
    wall = {s: sum(w for ws in records[s]["add_wall_s"].values() for w in ws) for s in SYSTEMS}
    per_call = {s: records[s]["prompt_tokens"] / max(records[s]["calls"], 1) for s in SYSTEMS}
    for s in ("experts-whole", "experts-reduced"):
        print(f"{s} / teacher: add() wall time {wall[s] / wall['teacher']:.2f}x over the same {rows[0]['adds']} "
              f"add() calls; input tokens per call {per_call[s] / per_call['teacher']:.2f}x; peak RSS "
              f"{records[s]['peak_rss_mb'] / records['teacher']['peak_rss_mb']:.2f}x")
    print(f"experts-reduced / experts-whole: add() wall time {wall['experts-reduced'] / wall['experts-whole']:.2f}x,"
          f" input tokens per call {per_call['experts-reduced'] / per_call['experts-whole']:.2f}x")
    for s, metrics in agreement.items():
        print(f"{s} on capture's held-out calls: " + "; ".join(
            f"{k} {v['value']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] (n={v['n']})" if v["ci"][0] is not None
            else f"{k} {v['value']:.1f} (n={v['n']})" for k, v in sorted(metrics.items())))
    if not agreement:
        print("no captured call was held out for testing (capture.test_ratio 0): no agreement measured")
    print("saved", save("mem0_add", {"rows": rows, "records": records, "agreement": agreement, "distill_s": distill_s,
                                     "turns": turns, "per_add": per_add,
                                     "train": [c.conversation_id for c in train],
                                     "held_out": [c.conversation_id for c in held_out]}))


if __name__ == "__main__":
    main()
