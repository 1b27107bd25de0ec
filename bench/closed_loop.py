"""The closed loop, offline, on the embedded default: days of traffic from this project's own memory system (its
OpenAI backend, as any client would call) over the bundled sample's conversations, a few conversations a day.

Day 0 has no experts: the memory system calls `memlora capture` in front of `memlora serve-model` (the teacher),
and every call is recorded. After each day but the last, `memlora improve` trains candidates on what arrived and
promotes what passes its gate. From day 1 the memory system calls `memlora serve-experts --fallback` (the teacher
behind it); the server keeps running from day to day and takes each promotion by itself (hot reload). Deferred
calls are recorded into OUT, so the next night learns from them.

Per day and operation, on that day's calls: the share the experts kept, the agreement with the teacher of what
was served (the teacher is asked every call of the day afterwards, for the measurement only) with its Wilson
95 % interval, the disagreement of the kept answers against the budget (upper 95 % bound), served DELETEs and
abstentions against the teacher's, p50 latency and tokens per call as the client saw them, and the serving
processes' peak RSS. Writes bench/results/closed_loop.json (and a plot with --plot).

    python bench/closed_loop.py [--quick] [--per-day 4] [--days 3] [--budget 0.2] [--plot PNG] [--work DIR]
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CONFIG, REPO, bench_parser, free_port, peak_rss_mb, save, table  # noqa: E402

from memlora.serve import wait_healthy  # noqa: E402

SAMPLE = REPO / "data" / "samples" / "locomo_sample12.json"
TEACHER = "teacher"  # the name serve-model serves the teacher under
CONVERSATION_HEADER = "x-memlora-conversation"
# Conversations in the order the days take them, `--per-day` a day. capture.test_ratio 0.15 puts sample-1, -9 and
# -10 in the test share (a hash of the name, data.split.held_for_test): one of them comes each day.
ORDER = ["sample-1", "sample-3", "sample-4", "sample-5", "sample-9", "sample-6", "sample-7", "sample-8",
         "sample-10", "sample-11", "sample-12", "sample-2"]
QUICK_ORDER = ["sample-3", "sample-9"]


def bench_config(work: Path, budget: float, quick: bool) -> Path:
    """The embedded default, plus what a team running capture sets: a rule per operation (on the first words
    of our own system prompts), a test share by conversation, a quarter of the other calls held out for early
    stopping and calibration, and the deferral budget."""
    import yaml

    from memlora.memory.prompts import TEMPLATES

    config = yaml.safe_load(CONFIG.read_text())
    config["name"] = "closed-loop"
    config["capture"] = {
        "logprobs_top_k": config["teacher"]["logprobs_top_k"],
        "validation_ratio": 0.25, "test_ratio": 0.15,
        "rules": [{"operation": op, "system_contains": t.system[:60]} for op, t in TEMPLATES.items()]}
    # audit_share 1: every kept call is also asked of the teacher (after its answer), so each night recalibrates
    # the experts that stay on all of the day's calls they were not trained on. A team with more traffic than the
    # sample's audits a share (default 0.1); here the sample is all the traffic there is.
    config["deferral"] = {"budget": budget, "timeout_s": 900,  # a deferred call waits behind a busy teacher
                          "audit_share": 1.0}
    # reload_s: a promotion is served within 2 s. schema_timeout_s: four jobs share two cores while the loop runs
    # (teacher, experts, clients, a night's training), and a first compile may take longer than the default 10 s.
    config["serving"] = {"reload_s": 2, "schema_timeout_s": 60}
    if quick:  # a step per expert: keeps every path of the loop working, learns nothing
        config["distill"].update(max_steps=2, max_epochs=1, epochs={})
    path = work / "closed_loop.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Call:
    day: int
    operation: str
    conversation_id: str
    messages: list[dict]
    schema: dict | None
    max_new_tokens: int
    text: str
    answered_by: str  # expert or teacher (the response's `model`)
    latency_s: float
    completion_tokens: int


def client(url: str, model: str, headers: dict | None = None):
    """The memory system's own OpenAI backend, noting who answered each call (the response's `model`)."""
    from memlora.config import HttpConfig, LLMConfig
    from memlora.llm.http_backend import OpenAIBackend

    class Noted(OpenAIBackend):
        def _result(self, data, constrained, elapsed):
            result = super()._result(data, constrained, elapsed)
            result.extra["model"] = data.get("model")
            return result

    config = LLMConfig(backend="openai", model=model,
                       http=HttpConfig(base_url=url, timeout_s=900, max_retries=0, concurrency=8))
    return Noted(config, headers=headers)


def run_day(day: int, conversations, url: str, model: str, config, embedder, work: Path, sessions: int | None,
            questions: int | None) -> list[Call]:
    """The day's conversations through the memory system at once (their calls share the server's batches)."""
    from memlora.memory.store import MemoryStore
    from memlora.memory.system import MemorySystem

    def one(conversation) -> list[Call]:
        calls: list[Call] = []
        llm = client(url, model, {CONVERSATION_HEADER: conversation.conversation_id})
        store = MemoryStore(work / "memory" / f"day{day}-{conversation.conversation_id}.db")

        def note(record) -> None:
            r = record.result
            calls.append(Call(day, record.operation, record.conversation_id, record.request.messages,
                              record.request.schema, record.request.max_new_tokens, r.text,
                              "teacher" if r.extra.get("model") == TEACHER else "expert", r.latency_s,
                              r.completion_tokens))

        try:
            system = MemorySystem(llm, store, embedder, config.memory, on_call=note)
            system.ingest(conversation, max_sessions=sessions)
            system.answer(conversation.conversation_id, conversation.questions[:questions])
        finally:
            store.close()
            llm.close()
        return calls

    with ThreadPoolExecutor(len(conversations)) as pool:
        return [c for calls in pool.map(one, conversations) for c in calls]


def teacher_answers(calls: list[Call], url: str) -> list[str]:
    """The teacher's own answer to each call as it was sent (measurement only: nothing is recorded)."""
    from memlora.memory.llm import GenerationRequest

    llm = client(url, TEACHER)
    try:
        return [r.text for r in llm.generate([GenerationRequest(c.operation, c.messages, c.max_new_tokens, c.schema)
                                              for c in calls])]
    finally:
        llm.close()


def day_report(calls: list[Call], reference: list[str], config) -> dict:
    """Per operation: kept share, served agreement with the teacher, kept disagreement against the budget."""
    from memlora.evaluation import scoring
    from memlora.evaluation.deferral import agrees
    from memlora.evaluation.stats import wilson
    from memlora.llm.confidence import answer_events
    from memlora.memory.parsing import extract_json

    report = {}
    for op in dict.fromkeys(c.operation for c in calls):
        pairs = [(c, t) for c, t in zip(calls, reference) if c.operation == op]
        judged = [(c, extract_json(t).value) for c, t in pairs if extract_json(t).ok]
        agree = [agrees(op, c.text, ref, config) for c, ref in judged]
        kept = [a for (c, _), a in zip(judged, agree) if c.answered_by == "expert"]
        entry = {"calls": len(pairs), "kept": sum(c.answered_by == "expert" for c, _ in pairs),
                 "judged": len(judged), "served_agreement": sum(agree) / len(agree) if agree else None,
                 "served_agreement_ci": list(wilson(sum(agree), len(agree))),
                 "kept_disagree": len(kept) - sum(kept),
                 "kept_disagreement_upper": wilson(len(kept) - sum(kept), len(kept))[1] if kept else None,
                 "p50_s": statistics.median(c.latency_s for c, _ in pairs),
                 "tokens_per_call": statistics.mean(c.completion_tokens for c, _ in pairs)}
        entry["keep_share"] = entry["kept"] / entry["calls"]
        if op == "update":
            entry["served_deletes"] = sum(answer_events(c.text).count("DELETE") for c, _ in pairs)
            entry["teacher_deletes"] = sum(answer_events(t).count("DELETE") for _, t in pairs)
        if op == "generation":
            answer = lambda text: str((extract_json(text).value or {}).get("answer", ""))  # noqa: E731
            entry["served_abstains"] = sum(scoring.abstains(answer(c.text)) for c, _ in pairs)
            entry["teacher_abstains"] = sum(scoring.abstains(answer(t)) for _, t in pairs)
        report[op] = entry
    return report


class Servers:
    """The teacher, the day-0 capture proxy and the experts' server, each its own process and process group."""

    def __init__(self, config: Path, work: Path):
        self.config, self.work = config, work
        self.procs: dict[str, tuple[subprocess.Popen, str]] = {}

    def start(self, name: str, *args: str, timeout_s: float = 600) -> str:
        port = free_port()
        memlora = str(Path(sys.executable).parent / "memlora")
        log = open(self.work / f"{name}.log", "ab")
        proc = subprocess.Popen([memlora, *args, "--config", str(self.config), "--port", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, timeout_s=timeout_s)
        except Exception:
            raise SystemExit(f"{name} did not start: {(self.work / f'{name}.log').read_text()[-3000:]}") from None
        self.procs[name] = (proc, url)
        return url + "/v1"

    def peak_rss_mb(self, name: str) -> float:
        return peak_rss_mb(self.procs[name][0].pid)

    def health(self, name: str) -> dict:
        import httpx

        return httpx.get(self.procs[name][1] + "/health", timeout=30).json()

    def stop(self, name: str) -> None:
        from memlora.processes import stop_group

        proc, _ = self.procs.pop(name)
        stop_group(proc)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def improve(config: Path, out: Path, work: Path) -> dict:
    """`memlora improve` as the nightly deployment runs it; its decisions from OUT/improve/decisions.parquet."""
    import pyarrow.parquet as pq

    from memlora.layout import decisions_path

    memlora = str(Path(sys.executable).parent / "memlora")
    started = time.perf_counter()
    done = subprocess.run([memlora, "improve", "--config", str(config), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (work / "improve.log").open("a").write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"memlora improve failed ({done.returncode}): {(done.stdout + done.stderr)[-3000:]}")
    rows = pq.read_table(decisions_path(out)).to_pylist() if decisions_path(out).is_file() else []
    last = rows[-1]["run"] if rows else None
    return {"seconds": seconds, "stdout": done.stdout.strip().splitlines()[-6:],
            "decisions": [r for r in rows if r["run"] == last], "thresholds": thresholds(out)}


def thresholds(out: Path) -> dict:
    """Per operation and class, what the night's calibration had and kept: calls, kept, disagreeing, upper bound."""
    from memlora.layout import deferral_path

    if not deferral_path(out).is_file():
        return {}
    policy = json.loads(deferral_path(out).read_text())["operations"]
    return {op: {name: {k: t[k] for k in ("value", "n", "kept", "disagree", "upper")} for name, t in classes.items()}
            for op, classes in policy.items()}


def wait_for_version(servers: Servers, out: Path) -> str:
    """The running serve-experts took OUT's current experts and thresholds (hot reload, no restart)."""
    from memlora.layout import deferral_path
    from memlora.llm.reload import experts_version

    wanted = experts_version(out, [deferral_path(out)])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if servers.health("experts").get("experts", {}).get("version") == wanted:
            return wanted
        time.sleep(1)
    raise SystemExit(f"serve-experts did not take version {wanted}: {servers.health('experts')}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for op in ("extraction", "update", "generation"):
        days = [d["day"] for d in result["days"] if op in d["operations"]]
        axes[0].plot(days, [d["operations"][op]["keep_share"] for d in result["days"] if op in d["operations"]],
                     marker="o", label=op)
        axes[1].plot(days, [d["operations"][op]["served_agreement"] for d in result["days"]
                            if op in d["operations"]], marker="o", label=op)
    axes[0].set(title="share of calls the experts kept", xlabel="day", ylim=(-0.02, 1.02))
    axes[1].set(title="served answers agreeing with the teacher", xlabel="day", ylim=(-0.02, 1.02))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--days", type=int, default=None, help="days of traffic, day 0 included (default 3)")
    parser.add_argument("--per-day", type=int, default=None, help="conversations a day (default 4)")
    parser.add_argument("--sessions", type=int, default=None, help="sessions of each conversation (default all)")
    parser.add_argument("--budget", type=float, default=0.2,
                        help="deferral budget (default 0.2: at 0.1 a Wilson bound needs 29 agreeing held-out calls "
                             "with none disagreeing, more than three days of the sample hold per operation)")
    parser.add_argument("--work", default=None, help="keep OUT and the logs here (default: a temporary folder)")
    parser.add_argument("--plot", default=None, help="write the per-day plot here (PNG)")
    args = parser.parse_args()
    order = QUICK_ORDER if args.quick else ORDER
    per_day = args.per_day or (1 if args.quick else 4)
    days = args.days or (2 if args.quick else 3)
    sessions = args.sessions or (1 if args.quick else None)
    questions = 2 if args.quick else None
    if per_day * days > len(order):
        raise SystemExit(f"--per-day {per_day} x --days {days}: the sample has {len(order)} conversations")

    from memlora.config import load_config
    from memlora.data.loaders import load_corpus
    from memlora.memory.embedder import Embedder

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="memlora-closed-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    if out.exists():
        shutil.rmtree(out)
    config_path = bench_config(work, args.budget, args.quick)
    config = load_config(config_path)
    corpus = {c.conversation_id: c for c in load_corpus(SAMPLE)}
    embedder = Embedder(config.memory.embedder)
    servers = Servers(config_path, work)
    result = {"budget": args.budget, "per_day": per_day, "sessions": sessions, "quick": args.quick,
              "days": [], "nights": []}
    try:
        teacher = servers.start("teacher", "serve-model", "--name", TEACHER)
        for day in range(days):
            conversations = [corpus[cid] for cid in order[day * per_day:(day + 1) * per_day]]
            if day == 0:
                url, model, front = servers.start("capture", "capture", "--out", str(out), "--upstream", teacher), \
                    TEACHER, "capture"
            else:
                if "experts" not in servers.procs:
                    servers.start("experts", "serve-experts", "--out", str(out), "--fallback", teacher,
                                  "--fallback-model", TEACHER)
                version = wait_for_version(servers, out)
                url, model, front = servers.procs["experts"][1] + "/v1", "memlora", "experts"
            started = time.perf_counter()
            calls = run_day(day, conversations, url, model, config, embedder, work, sessions, questions)
            seconds = time.perf_counter() - started
            if day == 0:
                servers.stop("capture")
            reference = teacher_answers(calls, teacher)
            entry = {"day": day, "conversations": [c.conversation_id for c in conversations], "seconds": seconds,
                     "served_by": front, "operations": day_report(calls, reference, config),
                     "peak_rss_mb": {name: servers.peak_rss_mb(name) for name in servers.procs}}
            if day:
                entry["experts_version"] = version
                entry["deferral_counts"] = servers.health("experts").get("deferral", {}).get("counts", {})
            result["days"].append(entry)
            save("closed_loop", result)  # day by day: a run cut short keeps the days it measured
            print(f"day {day}: {len(calls)} calls in {seconds:.0f} s by {front}", flush=True)
            if day < days - 1:
                night = improve(config_path, out, work)
                result["nights"].append({"after_day": day, **night})
                print(f"night {day}: improve {night['seconds']:.0f} s: "
                      + "; ".join(f"{d['operation']} {'promoted' if d['promote'] else 'kept out'} ({d['reason']})"
                                  for d in night["decisions"]), flush=True)
    finally:
        servers.stop_all()

    rows = [{"day": d["day"], "operation": op, "calls": e["calls"], "kept": f"{e['keep_share']:.0%}",
             "served_agree": f"{e['served_agreement']:.2f} [{e['served_agreement_ci'][0]:.2f}, "
                             f"{e['served_agreement_ci'][1]:.2f}]" if e["served_agreement"] is not None else "-",
             "kept_disagree_upper": f"{e['kept_disagreement_upper']:.2f}" if e["kept_disagreement_upper"] is not None
             else "-", "p50_s": f"{e['p50_s']:.2f}", "tokens": f"{e['tokens_per_call']:.0f}",
             "deletes_served/teacher": f"{e['served_deletes']}/{e['teacher_deletes']}" if "served_deletes" in e
             else "", "abstains_served/teacher": f"{e['served_abstains']}/{e['teacher_abstains']}"
             if "served_abstains" in e else ""}
            for d in result["days"] for op, e in d["operations"].items()]
    print(table(rows, list(rows[0])))
    for d in result["days"]:
        print(f"day {d['day']}: peak RSS " + ", ".join(f"{k} {v:.0f} MiB" for k, v in d["peak_rss_mb"].items()))
    if args.plot:
        plot(result, Path(args.plot))
    print("saved", save("closed_loop", result), "; OUT and logs in", work)


if __name__ == "__main__":
    main()
