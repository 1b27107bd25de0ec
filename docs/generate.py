"""Write every generated block of README.md and docs/*.md from the committed reference files, so that no number
is copied by hand (`make docs`). A block is the text between `<!-- generated: NAME -->` and
`<!-- end generated -->`; everything outside the markers is left as written.

    python docs/generate.py            rewrite the blocks
    python docs/generate.py --check    exit 1 naming each block that differs from what would be written (a test)
    python docs/generate.py --results OUT --name embedded_default
                                       store OUT/eval/results.parquet as bench/reference/cpu-2core/NAME.json
                                       (after a `make run`: the README's headline comes from that file)
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "bench" / "reference" / "cpu-2core"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)
SYSTEMS = {"teacher": "teacher", "teacher-int8": "teacher int8", "student": "bare student",
           "student+experts": "student + experts"}


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def reference(name: str) -> dict:
    return json.loads((REFERENCE / f"{name}.json").read_text())


# --- results of a pipeline run (eval/results.parquet, stored by --results) -------------------------------------

def store_results(out: Path, name: str) -> Path:
    """A run's result rows with where they came from: the only copy of a run's numbers the docs read."""
    import pyarrow.parquet as pq

    manifest = json.loads((out / "manifest.json").read_text())
    rows = pq.read_table(out / "eval" / "results.parquet").to_pylist()
    for row in rows:
        for key in ("value", "ci_low", "ci_high"):
            if isinstance(row[key], float):
                row[key] = round(row[key], 4)
    evaluation = manifest.get("evaluation", {})
    data = {"source": {"git_revision": manifest.get("git_revision"), "evaluated_at": manifest.get("updated_at"),
                       "config": evaluation.get("config", {}).get("name"),
                       "data": manifest.get("traces", {}).get("data"),
                       "test_conversations": evaluation.get("conversations"),
                       "questions": evaluation.get("questions"),
                       "machine": {"platform": platform.platform(), "processor": platform.processor()}},
            "rows": rows}
    path = REFERENCE / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def _find(rows: list[dict], system: str, operation: str, metric: str) -> dict | None:
    for r in rows:
        if (r["system"], r["operation"], r["metric"]) == (system, operation, metric) and r["decoding"] in (
                None, "constrained"):
            return r
    return None


def _cell(row: dict | None, digits: int = 3, point: bool = False) -> str:
    if row is None or row["value"] is None:
        return "-"
    text = f"{row['value']:.{digits}f}"
    low, high = row.get("ci_low"), row.get("ci_high")
    if not point and low is not None and high is not None and low != high:
        text += f" [{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]"
    return text


# (label, operation, metric, digits): the measures a results table shows, in its order.
HEADLINE = [
    ("extraction fact F1 vs teacher", "extraction", "fact_f1", 3),
    ("update event macro-F1 vs teacher", "update", "event_macro_f1", 3),
    ("update Cohen's kappa vs teacher", "update", "cohen_kappa", 3),
    ("generation answer token F1 vs teacher", "generation", "answer_token_f1", 3),
    ("**QA token F1 vs gold, categories 1-4**", "qa/answerable", "token_f1", 3),
    ("answers that abstain, categories 1-4", "qa/answerable", "abstain_rate", 3),
    ("QA token F1 vs gold, all categories", "qa", "token_f1", 3),
]
# Point values only: one process per system, and a call's time is its share of the batch steps it was in, which
# moves with how the two conversations' calls happened to meet: a latency interval says little.
FOOTPRINT = [
    ("peak RSS of the end-to-end phase (MiB)", "model", "peak_rss_e2e_mb", 0),
    ("peak RSS of the system's process (MiB)", "model", "peak_rss_mb", 0),
    ("extraction s per call, p50", "extraction", "latency_p50", 3),
    ("update s per call, p50", "update", "latency_p50", 3),
    ("generation s per call, p50", "generation", "latency_p50", 3),
]
CATEGORIES = [("cat 1 multi-hop", "qa/cat-1"), ("cat 2 temporal", "qa/cat-2"), ("cat 3 open-domain", "qa/cat-3"),
              ("cat 4 single-hop", "qa/cat-4"), ("cat 5 adversarial (abstaining scores 1)", "qa/cat-5")]


def results_table(name: str, categories: bool = False, footprint: bool = True) -> str:
    data = reference(name)
    rows = data["rows"]
    measures = list(HEADLINE)
    if categories:
        measures += [(label, op, "token_f1", 3) for label, op in CATEGORIES]
    if footprint:
        measures += FOOTPRINT
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]  # teacher-int8: a quantized run only
    lines = ["| | n | " + " | ".join(SYSTEMS[s] for s in systems) + " |", "|---|---|" + "---|" * len(systems)]
    phase_peaks = any(_find(rows, system, "model", "peak_rss_e2e_mb") for system in systems)
    for label, op, metric, digits in measures:
        cells = [_find(rows, system, op, metric) for system in systems]
        if all(c is None for c in cells) or (metric == "peak_rss_mb" and phase_peaks):
            continue  # the process's peak only where a run has no end-to-end phase's own (before 2026-12-05)
        if op == "update" and metric == "event_macro_f1":
            majority = _find(rows, "student+experts", "update", "majority_baseline_macro_f1")
            if majority is not None:
                label += f" (always the majority event: {majority['value']:.3f})"
        n = next((c["n"] for c in reversed(cells) if c is not None and c.get("n")), "")
        point = (label, op, metric, digits) in FOOTPRINT
        lines.append(f"| {label} | {n if not point or not metric.startswith('peak_rss') else ''} | "
                     + " | ".join(_cell(c, digits, point=point) for c in cells) + " |")
    source = data["source"]
    lines += ["", f"<sub>{source['config']} on {', '.join(source['test_conversations'] or [])} "
                  f"(evaluated {str(source['evaluated_at'])[:10]}, revision {str(source['git_revision'])[:7]}); "
                  f"95 % intervals; agreement is with the teacher's own answers to the same calls. Source: "
                  f"`bench/reference/cpu-2core/{name}.json`.</sub>"]
    return "\n".join(lines)


# --- benches ---------------------------------------------------------------------------------------------------

def _markdown(header: list[str], rows: list[list]) -> str:
    """A Markdown table: the header, its rule, one line per row."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)])


def _interval(triple) -> str:
    value, low, high = triple
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def methods_table() -> str:
    data = reference("methods")
    header = ["run", "lr", "validation loss", f"fact F1 vs teacher (n={data['held_out_rows']})", "trainable",
              "s/step", "relative \\|\\|dW\\|\\|_F"]
    return _markdown(header, [[r["run"], f"{r['lr']:.1e}", f"{r['val_loss']:.3f}",
                               _interval([r["agreement"]["value"], *r["agreement"]["ci"]]), f"{r['trainable']:,}",
                               f"{r['step_s']:.1f}", f"{r['dW_rel']:.4f}"] for r in data["runs"]])


def warm_start_table() -> str:
    data = reference("warm_start")
    header = ["operation", "n", "agreement cold", "warm", "warm - cold, 95 %", "warm, new rows alone",
              "its - cold, 95 %", "best validation loss cold / warm / new alone", "steps cold / warm / new alone",
              "training time new alone / warm"]

    def ci(r, key, bounds):
        return f"{r[key]:+.3f} [{r[bounds][0]:+.3f}, {r[bounds][1]:+.3f}]"

    return _markdown(header, [[r["operation"], r["n"], f"{r['cold_agreement']:.3f}", f"{r['warm_agreement']:.3f}",
                               ci(r, "difference_warm_minus_cold", "ci"), f"{r['warm_new_agreement']:.3f}",
                               ci(r, "difference_warm_new_minus_cold", "warm_new_ci"),
                               f"{r['cold_validation_loss']:.3f} / {r['warm_validation_loss']:.3f} / "
                               f"{r['warm_new_validation_loss']:.3f}",
                               f"{r['cold_steps']} / {r['warm_steps']} / {r['warm_new_steps']}",
                               f"{r['warm_new_train_s'] / r['warm_train_s']:.2f}x"] for r in data["rows"]])


def data_scaling_table(name: str = "data_scaling") -> str:
    data = reference(name)
    rows = data["rows"]
    sizes = data["sizes"]
    by = {(r["size"], r["operation"]): r for r in rows}

    def line(label, op, cell):
        return f"| {label} | " + " | ".join(cell(by[(s, op)]) if (s, op) in by else "-" for s in sizes) + " |"

    n = {op: next(r["n"] for r in rows if r["operation"] == op) for op in ("extraction", "update", "generation")}
    majority = next(r["majority_baseline_macro_f1"][0] for r in rows if r["operation"] == "update")
    teacher_qa = next(r["qa_token_f1_teacher"][0] for r in rows if r["operation"] == "generation")
    qa_n = next(r["qa_n"] for r in rows if r["operation"] == "generation")
    teacher_abstains = next(r["abstains_teacher"] for r in rows if r["operation"] == "generation")
    out = ["| training conversations | " + " | ".join(map(str, sizes)) + " |", "|---|" + "---|" * len(sizes),
           line("extraction training calls", "extraction", lambda r: str(r["training_rows"])),
           line(f"extraction fact F1 vs teacher (n={n['extraction']})", "extraction",
                lambda r: _interval(r["fact_f1"])),
           line("extraction validation loss", "extraction", lambda r: f"{r['validation_loss']:.3f}"),
           line("update training calls", "update", lambda r: str(r["training_rows"])),
           line(f"update macro-F1 (n={n['update']}; majority {majority:.3f})", "update",
                lambda r: _interval(r["event_macro_f1"])),
           line("update Cohen's kappa", "update", lambda r: _interval(r["cohen_kappa"])),
           line("update validation loss", "update", lambda r: f"{r['validation_loss']:.3f}"),
           line("generation training calls", "generation", lambda r: str(r["training_rows"])),
           line(f"generation token F1 vs teacher (n={n['generation']})", "generation",
                lambda r: _interval(r["answer_token_f1"])),
           line(f"QA F1 cat 1-4 on the teacher's memories (n={qa_n}; teacher {teacher_qa:.3f})", "generation",
                lambda r: f"{r['qa_token_f1_expert'][0]:.3f}"),
           line(f"answers abstaining, cat 1-4 (teacher {teacher_abstains:.2f})", "generation",
                lambda r: f"{r['abstains_expert']:.2f}"),
           line("generation validation loss", "generation", lambda r: f"{r['validation_loss']:.3f}")]
    return "\n".join(out)


def closed_loop_table() -> str:
    data = reference("closed_loop")
    lines = ["| day | served by | operation | calls | kept by the expert | served agrees with the teacher [95 % CI] "
             "| kept answers disagreeing, upper 95 % | p50 s / call | tokens / call | DELETEs served / teacher | "
             "abstains served / teacher |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    front = {"capture": "capture -> teacher", "experts": "serve-experts --fallback"}
    for d in data["days"]:
        for op, e in d["operations"].items():
            agree = (f"{e['served_agreement']:.2f} [{e['served_agreement_ci'][0]:.2f}, "
                     f"{e['served_agreement_ci'][1]:.2f}]" if e["served_agreement"] is not None else "-")
            upper = "-" if e["kept_disagreement_upper"] is None else f"{e['kept_disagreement_upper']:.2f}"
            deletes = f"{e['served_deletes']} / {e['teacher_deletes']}" if "served_deletes" in e else ""
            abstains = f"{e['served_abstains']} / {e['teacher_abstains']}" if "served_abstains" in e else ""
            lines.append(f"| {d['day']} | {front.get(d['served_by'], d['served_by'])} | {op} | {e['calls']} | "
                         f"{e['kept']} ({e['keep_share']:.0%}) | {agree} | {upper} | {e['p50_s']:.0f} | "
                         f"{e['tokens_per_call']:.0f} | {deletes} | {abstains} |")
    lines.append("")
    for night in data["nights"]:
        decisions = "; ".join(f"{x['operation']} {'promoted' if x['promote'] else 'kept out'} ({x['reason']})"
                              for x in night["decisions"])
        lines.append(f"- night {night['after_day']} ({night['seconds']:.0f} s): {decisions}")
        if night.get("thresholds"):
            lines.append("  - calibrated on, kept: " + "; ".join(
                f"{op} {name} {t['kept']} of {t['n']}" for op, classes in night["thresholds"].items()
                for name, t in classes.items()))
    for d in data["days"]:
        rss = ", ".join(f"{k} {v:.0f} MiB" for k, v in d["peak_rss_mb"].items())
        calls = sum(e["calls"] for e in d["operations"].values())
        lines.append(f"- day {d['day']}: {calls} calls in {d['seconds']:.0f} s; peak RSS {rss}")
    lines += ["", f"<sub>{data['per_day']} conversations a day, budget {data['budget']}, sessions "
                  f"{data['sessions'] or 'all'}; source `bench/reference/cpu-2core/closed_loop.json`.</sub>"]
    return "\n".join(lines)


def mem0_add_table() -> str:
    data = reference("mem0_add")
    names = {"teacher": "teacher (SmolLM2-135M)", "experts-whole": "student + experts, whole prompt",
             "experts-reduced": "student + experts, what changes"}
    header = ["", "`add()` p50", "`add()` max", "per conversation", "input tokens / call", "tokens in / out",
              "memories stored", "server peak RSS"]
    # the bench stores this table's cells as it printed them
    return _markdown(header, [[names.get(r["system"], r["system"]), f"{r['add_p50_s']} s", f"{r['add_max_s']} s",
                               r["per_conversation_s"].replace(" / ", " s / ") + " s",
                               f"{int(r['tokens_in_per_call']):,}", r["tokens_in/out"].replace("/", " / "),
                               r["memories"], f"{r['peak_rss_MiB']} MiB"] for r in data["rows"]])


def continuous_serving_table(name: str) -> str:
    data = reference(name)
    ops = [k[: -len("_p50_s")] for k in data["rows"][0] if k.endswith("_p50_s")]
    rows = [[r["batching"], r["calls"], r["clients"], f"{r['wall_s']} s", r["requests_per_s"],
             *(f"{r[f'{op}_p50_s']} s" for op in ops), f"{r['peak_rss_mb']} MiB"] for r in data["rows"]]
    spread = data["merged_over_running_wall"]
    return (_markdown(["batching", "calls", "clients", "wall", "requests / s", *(f"{op} p50" for op in ops),
                       "peak RSS"], rows)
            + f"\n\n<sub>wall time merged / running {spread['median']:.2f}x ({spread['min']:.2f}-{spread['max']:.2f}), "
              f"{data['repeats']} repeats; answers identical: {data['identical_answers']}; "
              f"{data['machine']['cpu']}, {data['machine']['cpus']} cores; source "
              f"`bench/reference/cpu-2core/{name}.json`.</sub>")


def serving_cost_table() -> str:
    data = reference("serving_cost")
    systems = list(data["memory"])
    ops = list(dict.fromkeys(r["operation"] for r in data["rows"]))
    by = {(r["system"], r["operation"]): r for r in data["rows"]}
    lines = ["| | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems),
             "| peak RSS (MiB) | " + " | ".join(f"{data['memory'][s]['peak_rss_mb']:.0f} "
                                               f"({data['peak_rss_ratio'][s]:.2f}x)" for s in systems) + " |"]
    for op in ops:
        cells = [by[(systems[1], op)]["teacher_p50_s"] if s == "teacher" else
                 f"{by[(s, op)]['p50_s']} ({by[(s, op)]['p50_vs_teacher']})" for s in systems]
        lines.append(f"| {op} p50 s per call | " + " | ".join(cells) + " |")
    for op in ops:
        cells = ["1.00x" if s == "teacher" else by[(s, op)]["per_token_vs_teacher"] for s in systems]
        lines.append(f"| {op} s per generated token, vs the teacher | " + " | ".join(cells) + " |")
    lines += ["", f"<sub>{data['per_op']} calls per operation, {data['repeats']} repeats, one call at a time, each "
                  "system in its own process; source `bench/reference/cpu-2core/serving_cost.json`.</sub>"]
    return "\n".join(lines)


def bandwidth_floor_table(name: str = "bandwidth_floor") -> str:
    data = reference(name)
    rows = [[r["system"], r["batch"], f"{r['weights_mb']:.0f}", f"{r['step_ms']:.1f}", f"{r['floor_ms']:.1f}",
             f"{r['over_floor']:.2f}x"] for r in data["rows"]]
    bandwidth = data["bandwidth"]
    return "\n".join([_markdown(["system", "batch", "weights read per step (MB)", "decode step (ms)",
                                 "floor (ms)", "step / floor"], rows), "",
                      f"<sub>bandwidth copy {bandwidth['copy_gb_s']:.1f} GB/s, triad {bandwidth['triad_gb_s']:.1f} "
                      f"GB/s ({data['machine']['torch_threads']} threads); {data['prompt_tokens']} prompt tokens, "
                      f"{data['steps']} steps, median of {data['repeats']}; source "
                      f"`bench/reference/cpu-2core/{name}.json`.</sub>"])


def teacher_quantize_table() -> str:
    data = reference("teacher_quantize")
    rows = [[r["teacher"], r["operation"], r["n"], _interval(r["identical"]), _interval(r["agrees"]),
             f"{_METRIC_NAMES[r['operation']]} {_interval(r[_PRIMARY[r['operation']]])}", r["tokens"]]
            for r in data["rows"]]
    speed = data["tokens_per_s"]
    return _sourced("teacher_quantize", ["teacher", "operation", "calls", "identical to the recording",
                                         "agrees with it", "agreement metric", "tokens generated"], rows,
                    f"generated tokens per second, same calls, same process: float32 {speed['none']:.1f}, "
                    + ", ".join(f"{scheme} {tps:.1f} ({tps / speed['none']:.2f}x)" for scheme, tps in speed.items()
                                if scheme != "none") + "; 95 % intervals (Wilson; the "
                    "metric's: bootstrap)")


def _sourced(name: str, header: list[str], rows: list[list], note: str) -> str:
    """A table and its footnote, which names the reference file it was generated from."""
    return "\n".join([_markdown(header, rows), "",
                      f"<sub>{note}; source `bench/reference/cpu-2core/{name}.json`.</sub>"])


def int8_designs_table(name: str = "int8_designs") -> str:
    data = reference(name)
    rows = [[r["design"], r["operation"], r["n"], f"{_METRIC_NAMES[r['operation']]} "
             f"{_interval([r['agreement'], *r['ci']])}", f"{r['parse_ok']:.2f}", f"{r['same_as_float32']:.2f}",
             r["s_per_token_vs_float32"]] for r in data["rows"]]
    return _sourced(name, ["design", "operation", "calls", "agreement with the teacher", "valid JSON",
                           "answers identical to float32's", "s per generated token vs float32"], rows,
                    f"the {data['calls']}' teacher calls, one design after the other in one process; -keep: "
                    f"{', '.join(data['keep_float32'])} float32; 95 % intervals (bootstrap)")


def int8_logits_table() -> str:
    data = reference("int8_logits")
    rows = [[r["variant"], f"{r['logit_error_vs_std']:.3f}", f"{r['same_top_token']:.3f}"] for r in data["rows"]]
    worst = sorted(data["down_proj_outliers"].items(), key=lambda kv: -kv[1])[:4]
    first = data["rows"][0]
    return _sourced("int8_logits", ["student base", "mean logit error / float32 logits' std",
                                    "positions with float32's top token"], rows,
                    f"{first['sequences']} validation calls, teacher-forced (prompt + the teacher's answer, "
                    f"{first['positions']} positions); largest down_proj input over its mean: "
                    + ", ".join(f"layer {k} {v:,.0f}x" for k, v in worst))


_PRIMARY = {"extraction": "fact_f1", "update": "event_macro_f1", "generation": "answer_token_f1"}
_METRIC_NAMES = {"extraction": "fact F1", "update": "event macro-F1", "generation": "answer token F1"}


RENDERERS = {
    "headline": lambda: results_table("embedded_default"),
    "headline-categories": lambda: results_table("embedded_default", categories=True),
    "headline-int8": lambda: results_table("embedded_default_int8"),
    "headline-int8-weight": lambda: results_table("embedded_default_int8_weight"),
    "headline-int4-weight": lambda: results_table("embedded_default_int4_weight"),
    "headline-compact": lambda: results_table("embedded_default_compact", categories=True),
    "locomo-protocol": lambda: results_table("locomo_protocol", categories=True, footprint=False),
    "methods": methods_table,
    "warm-start": warm_start_table,
    "data-scaling": data_scaling_table,
    "data-scaling-locomo": lambda: data_scaling_table("data_scaling_locomo"),
    "teacher-quantize": teacher_quantize_table,
    "closed-loop": closed_loop_table,
    "mem0-add": mem0_add_table,
    "serving-cost": serving_cost_table,
    "bandwidth-floor": bandwidth_floor_table,
    "bandwidth-floor-int8-weight": lambda: bandwidth_floor_table("bandwidth_floor_int8_weight"),
    "bandwidth-floor-int4-weight": lambda: bandwidth_floor_table("bandwidth_floor_int4_weight"),
    "bandwidth-floor-compiled": lambda: bandwidth_floor_table("bandwidth_floor_compiled"),
    "int8-designs": int8_designs_table,
    "int8-designs-int8-weight": lambda: int8_designs_table("int8_designs_int8_weight"),
    "int8-designs-int4-weight": lambda: int8_designs_table("int8_designs_int4_weight"),
    "int8-designs-kv-cache": lambda: int8_designs_table("int8_designs_kv_cache"),
    "int8-designs-int8-weight-beside": lambda: int8_designs_table("int8_designs_int8_weight_beside"),
    "headline-int8-weight-beside": lambda: results_table("embedded_default_int8_weight_beside"),
    "int8-logits": int8_logits_table,
    "continuous-serving-experts": lambda: continuous_serving_table("continuous_serving_experts"),
}


def render(text: str, where: Path) -> str:
    def one(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise SystemExit(f"{where}: unknown generated block {name!r} (one of {', '.join(RENDERERS)})")
        return f"{match[1]}{RENDERERS[name]()}\n{match[4]}"

    return BLOCK.sub(one, text)


def stale_blocks() -> list[str]:
    """'page: block' for every generated block whose text differs from what would be written now."""
    stale = []
    for page in pages():
        text = page.read_text()
        now = {m["name"]: m["body"] for m in BLOCK.finditer(text)}
        fresh = {m["name"]: m["body"] for m in BLOCK.finditer(render(text, page))}
        stale += [f"{page.relative_to(REPO)}: {name}" for name in now if now[name] != fresh[name]]
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated block is out of date")
    parser.add_argument("--results", type=Path, help="a run's OUT whose eval/results.parquet to store")
    parser.add_argument("--name", default="embedded_default", help="the reference file --results writes")
    args = parser.parse_args(argv)
    if args.results:
        print("stored", store_results(args.results, args.name))
    if args.check:
        stale = stale_blocks()
        for line in stale:
            print(f"out of date: {line} (run `make docs`)")
        return 1 if stale else 0
    for page in pages():
        text = page.read_text()
        new = render(text, page)
        if new != text:
            page.write_text(new)
            print("wrote", page.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
