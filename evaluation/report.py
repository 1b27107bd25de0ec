"""OUT/eval/report.md and OUT/eval/report.png: the comparison a person reads (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from memlora.config import OPERATIONS
from memlora.data.io import atomic_path, write_text
from memlora.evaluation.agreement import PRIMARY
from memlora.evaluation.qa import CATEGORIES
from memlora.evaluation.results import ANSWERABLE, headline, lookup
from memlora.evaluation.systems import TEACHER, in_rows
from memlora.layout import adapter_dir, report_path
from memlora.student.records import TRAINING_FILE

COLORS = {"teacher": "#4C72B0", "teacher-int8": "#8172B3", "student": "#DD8452", "student+experts": "#55A868",
          "experts+guard": "#64B5CD", "experts+teacher": "#937860"}


def report_paths(out: str | Path) -> tuple[Path, Path]:
    return report_path(out, ".md"), report_path(out, ".png")


def _fmt(row: dict | None, digits: int = 3, count: bool = False) -> str:
    if row is None:
        return "–"
    if row["value"] is None:
        return f"n/a (n={row['n']})"
    value = row["value"]
    if count:
        return f"{value:.0f} of {row['n']}"
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    if row["ci_low"] is not None and row["ci_high"] is not None:
        text += f" [{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]"
    if row["ci_method"] != "none" or row["section"] != "memory":
        text += f" n={row['n']}"
    return text


def _table(rows, items: list[tuple[str, str, str]], counts: bool = False) -> list[str]:
    """items: (label, operation, metric) -> one Markdown table line each, one column per system; `counts`: the
    values are counts out of n (calls per class), not means or rates."""
    systems = in_rows(rows)
    lines = ["| | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for label, operation, metric in items:
        cells = [_fmt(lookup(rows, s, operation, metric), count=counts) for s in systems]
        if all(c == "–" for c in cells):
            continue
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def free_decoded(rows: list[dict]) -> bool:
    """Whether the requests were also replayed without their schema (`evaluation.free_decoding`)."""
    return any(r["decoding"] == "free" for r in rows)


def scope_sentence(rows: list[dict], meta: dict) -> str:
    """What these numbers can and cannot say, in one plain sentence, for this config."""
    params = lookup(rows, "teacher", "model", "params_base")
    size = f"{params['value'] / 1e6:,.0f}M-parameter " if params and params["value"] else ""
    n_conv = len(meta["conversations"])
    return (f"These numbers say how closely a small student agrees with this config's {size}teacher "
            f"(`{meta['probes']['teacher'].model_id}`) on {n_conv} held-out conversation"
            f"{'s' if n_conv != 1 else ''} and {meta['questions']} gold questions; they cannot say how much any of "
            "the systems knows about the world or how it would do on other conversations, and with samples this "
            "small the 95% intervals, not the point values, are what to compare.")


def headline_text(heads: list[dict]) -> str:
    """The headline for a terminal: one line per measure, one column per system."""
    if not heads:
        return "(no headline: nothing was evaluated)"
    measures = [k for k in heads[0] if k != "system"]
    width = max(map(len, measures))
    cols = [max(15, len(str(h["system"]))) for h in heads]
    lines = [" " * width + "  " + "  ".join(f"{h['system']:>{c}}" for h, c in zip(heads, cols))]
    for m in measures:
        lines.append(f"{m:<{width}}  " + "  ".join(f"{'-' if h[m] is None else h[m]!s:>{c}}" for h, c in zip(heads, cols)))
    return "\n".join(lines)


def skill_sentences(rows: list[dict]) -> list[str]:
    """Where a system's update decisions agree with the teacher's no better than chance, say so in words."""
    out = []
    for system in (s for s in in_rows(rows) if s != TEACHER):  # the teacher's kappa is with itself
        r = lookup(rows, system, "update", "cohen_kappa")
        if r is None or r["value"] is None or r["ci_low"] is None:
            continue
        if r["ci_low"] <= 0:
            out.append(f"- **{system}: no measurable update skill here.** Cohen's kappa against the teacher is "
                       f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] (n={r['n']}): its interval holds 0, "
                       "so its update decisions agree with the teacher's no more than their label frequencies "
                       "would by chance.")
    return ["", *out] if out else []


def served_section(rows: list[dict]) -> list[str]:
    """Who answered the served systems' calls, and what every system deleted end to end."""
    served = any(r["section"] == "served" and r["metric"] != "deletes_e2e" for r in rows)
    lines = ["", "## Served, and memories deleted", "",
             "`deletes_e2e`: DELETE events in each system's own update calls end to end (memories its store lost), "
             "out of its update calls."]
    if served:
        lines[-1] += (" The served systems (`evaluation.served`) are the experts under OUT/deferral.json's "
                      "thresholds: `experts+guard` demotes an unsure DELETE or UPDATE (the memory stays) and lets "
                      "other unsure answers out as written; `experts+teacher` gives an unsure call to the teacher "
                      "(without the expert decoding it where the thresholds keep none of its operation's answers). "
                      "Shares of calls: on the teacher's requests, then end to end (`e2e`).")
    lines += ["", *_table(rows, [("update DELETEs end to end", "update", "deletes_e2e")], counts=True)]
    if served:
        lines += ["", *_table(rows, [(f"{op} {label}{' (e2e)' if suffix else ''}", op, metric + suffix)
                                     for op in OPERATIONS for suffix in ("", "_e2e")
                                     for metric, label in (("kept_by_expert", "kept by the expert"),
                                                           ("demoted", "demoted"),
                                                           ("unsure", "unsure, sent as written"),
                                                           ("deferred_to_teacher", "answered by the teacher"))])]
    return lines


def latency_sentence(probes: dict, systems: tuple[str, ...]) -> str:
    """How a call's latency was taken, which depends on how its system batched (`evaluation.continuous_batching`)."""
    ways = {s: probes[s].batching or "merged" for s in systems}
    running = [s for s, way in ways.items() if way == "running"]
    merged = [s for s, way in ways.items() if way != "running"]
    parts = []
    if running:
        parts.append(f"{', '.join(running)}: calls joined one running batch between decode steps, and a call's time "
                     "is its share of each prefill and step it was in (the step's time over the rows in it)")
    if merged:
        parts.append(f"{', '.join(merged)}: calls were merged into batches decoded to their end, and a call's time "
                     "is its batch's time over the batch's size")
    return "; ".join(parts) + "."


def render_markdown(rows: list[dict], meta: dict) -> str:
    probes = meta["probes"]
    lines = [
        "# Evaluation: teacher vs student vs student+experts",
        "",
        scope_sentence(rows, meta),
        "",
        f"Config `{meta['config_name']}`; test conversations: {', '.join(meta['conversations']) or 'none'}; "
        f"{meta['questions']} gold questions; judge: `{meta['judge']}`. "
        f"Written {datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
        "",
        "| system | model | device | pid | experts |",
        "|---|---|---|---|---|",
    ]
    for s in in_rows(rows):
        p = probes[s]
        experts = ", ".join(sorted(p.adapters)) or "–"
        if p.adapters and p.experts_design:
            experts += f" ({p.experts_design})"
        lines.append(f"| {s} | `{p.model_id}` | {p.device} ({p.dtype}) | {p.pid} | {experts} |")
    heads = headline(rows, meta.get("independent_judge", False))
    if not meta.get("independent_judge", False):
        lines += ["", f"The LLM judge is the teacher itself (`{meta['judge']}`): a model judging its own answers, "
                  "and here one too small to judge, so its accuracy is left out of the headline (it is in the QA "
                  "table below for reference). Configure `evaluation.judge` with another model to make it count."]
    free = free_decoded(rows)
    lines += ["", "## Headline", "", "| " + " | ".join(heads[0]) + " |", "|" + "---|" * len(heads[0])]
    for h in heads:
        lines.append("| " + " | ".join("–" if v is None else str(v) for v in h.values()) + " |")
    lines += ["", "`parse_ok_constrained` is the mean of the three operations' parse rates (each is in the validity "
              "table). " + ("`parse_ok_free` is the same under free decoding." if free else
                            "`parse_ok_free` is empty: free decoding was off (`evaluation.free_decoding: false`), "
                            "so the same requests were not replayed without their schema.")
              + " Latency p50 is per call: its share of its batch's time (how, under Latency below)."]
    lines += [
        "", "## Agreement with the teacher (teacher-forced, constrained decoding)", "",
        "Each system answered the teacher's own requests on the test conversation(s) (same messages, same schema, "
        "same batches) and is scored against the teacher's parsed output; calls the teacher's output failed to "
        "parse are left out, a system output that fails to parse scores 0. The teacher's row is its agreement "
        "with itself (1 by construction): the ceiling. Values: mean or rate [95% CI] n.", "",
    ]
    items = [("extraction fact precision", "extraction", "fact_precision"),
             ("extraction fact recall", "extraction", "fact_recall"),
             ("extraction fact F1", "extraction", "fact_f1"),
             ("update event macro-F1", "update", "event_macro_f1"),
             ("update majority-class baseline macro-F1", "update", "majority_baseline_macro_f1"),
             ("update Cohen's kappa (beyond chance)", "update", "cohen_kappa"),
             ("update event accuracy", "update", "event_accuracy"),
             ("update majority-class baseline accuracy", "update", "majority_baseline_accuracy"),
             ("generation token F1", "generation", "answer_token_f1"),
             ("generation ROUGE-L", "generation", "answer_rouge_l")]
    lines += _table(rows, items)
    lines += skill_sentences(rows)
    events = ("add", "update", "delete", "none", "invalid")
    lines += ["", "Update decisions per class (teacher-forced, constrained): what the teacher decided on these calls, "
              "then what each system decided. The majority-class baseline always answers the teacher's most common "
              "event: an expert is only useful above it.", ""]
    lines += _table(rows, [(f"teacher says {e.upper()}", "update", f"reference_{e}") for e in events[:4]]
                    + [(f"system says {e.upper()}", "update", f"predicted_{e}") for e in events], counts=True)
    lines += ["", "### The same requests without their schema (free decoding)", ""]
    lines += (_table(rows, [(label, op, metric + "_free") for label, op, metric in items]) if free else
              ["Not run: `evaluation.free_decoding` is off in this config."])
    lines += ["", "## Output validity", "",
              "Each measure means one thing. `schema_valid`: the raw output is exactly one JSON object valid under "
              "the operation's schema (format, no repair). `parse_ok`: the memory system's tolerant parser took "
              "something it can apply (under free decoding it also takes plain text, so a model that ignores the "
              "format can still score 1 here). `empty`: a degenerate output, blank or a blank answer such as "
              '`{"answer": " "}`, which can be schema-valid yet says nothing. `cut_at_limit`: generation stopped at '
              "the token budget, not by itself. Free decoding shows what a model writes by itself; constrained "
              "decoding what the grammar forces.", ""]
    validity = []
    for op in OPERATIONS:
        for decoding, suffix in (("constrained", ""), ("free", "_free"))[:2 if free else 1]:
            validity += [(f"{op} {m} ({decoding})", op, m + suffix)
                         for m in ("schema_valid", "parse_ok", "empty", "cut_at_limit")]
    lines += _table(rows, validity)
    lines += ["", "## End-to-end QA", "",
              "Each system built its own memory from the test conversation, then answered the gold questions. "
              "Token F1 and BLEU-1 against the gold answer; category-5 (adversarial) questions score 1 only if the "
              "answer says the information is not mentioned. `judge_accuracy`: share labelled CORRECT by the judge "
              "(an empty answer is WRONG without asking). `answered`: the answer parsed. `abstains`: the answer says "
              "the conversation does not hold it (right on category 5, a miss on 1-4). The headline's QA is "
              "categories 1-4, so abstaining cannot flatter it.", ""]
    qa_items = []
    groups = [(ANSWERABLE, "cat 1-4"), ("qa", "all")] + [(f"qa/cat-{c}", f"cat {c} ({n})")
                                                         for c, n in CATEGORIES.items()]
    for operation, name in groups:
        qa_items += [(f"{name} token F1", operation, "token_f1"), (f"{name} BLEU-1", operation, "bleu1"),
                     (f"{name} judge accuracy", operation, "judge_accuracy"),
                     (f"{name} answered", operation, "answered"), (f"{name} abstains", operation, "abstain_rate")]
    lines += _table(rows, qa_items)
    lines += served_section(rows)
    lines += ["", "## Latency (teacher-forced requests, constrained, sent the same way by every system)", "",
              latency_sentence(probes, in_rows(rows)) + " Calls of one merged batch share a value: p50 and p95 may "
              "be equal, and an interval may end at its point. Read it with the tokens each call generated next to "
              "it: a call that writes 6 tokens, or stops at the budget, is fast for that reason; seconds per "
              "generated token compares the models themselves.", ""]
    lat = []
    for op in OPERATIONS:
        lat += [(f"{op} p50 (s)", op, "latency_p50"), (f"{op} p95 (s)", op, "latency_p95"),
                (f"{op} generated tokens per call", op, "completion_tokens"),
                (f"{op} s per generated token", op, "s_per_token"),
                (f"{op} prompt tokens per call", op, "prompt_tokens"), (f"{op} tokens/s", op, "tokens_per_s")]
    lines += _table(rows, lat)
    lines += ["", "## Memory (each system in its own process)", "",
              "`peak_rss_e2e_mb` is the end-to-end phase's own peak (the memory system's work, which every system "
              "does; measured from the loaded model with the heap trimmed, so the students' replay of the teacher's "
              "requests before it does not count); `peak_rss_mb` is the process's VmHWM (its own peak resident set "
              "over every phase, model + runtime + retrieval embedder); `ru_maxrss_mb` is getrusage's figure, which "
              "Linux carries over from the parent process across fork/exec and so can exceed the system's own peak; "
              "`rss_baseline_mb` is after importing torch and transformers, `rss_after_load_mb` after loading the "
              "model (and experts).", ""]
    lines += _table(rows, [(m, "model", m) for m in (
        "params_base", "params_adapters", "adapter_bytes", "peak_rss_e2e_mb", "peak_rss_mb", "ru_maxrss_mb",
        "rss_baseline_mb", "rss_after_load_mb", "peak_cuda_allocated_mb", "peak_cuda_reserved_mb", "load_s")])
    lines += ["", "Per-call records: `eval/systems/<system>/calls.parquet` (phases e2e, forced, forced_free) and "
              "`qa.parquet`; judge labels: `eval/systems/judge/judgements.parquet`; all metrics: "
              "`eval/results.parquet`.", ""]
    return "\n".join(lines)


def _bars(ax, groups: list[str], series: dict[str, list[tuple[float | None, float | None, float | None]]],
          ylabel: str, title: str, labels: bool = False) -> None:
    names = list(series)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(groups))
    for k, name in enumerate(names):
        vals = [v if v is not None else math.nan for v, _, _ in series[name]]
        # a percentile-bootstrap interval need not contain the point estimate: clip, never negative
        lo = [max(0.0, v - l) if v is not None and l is not None else 0.0 for v, l, _ in series[name]]
        hi = [max(0.0, h - v) if v is not None and h is not None else 0.0 for v, _, h in series[name]]
        system = name.split(" ")[0]
        yerr = [lo, hi] if any(lo) or any(hi) else None
        bars = ax.bar(x - 0.4 + width * (k + 0.5), vals, width, yerr=yerr, capsize=2, label=name,
               color=COLORS.get(system, "grey"), alpha=0.55 if name.endswith("p95") else 1.0,
               hatch="//" if name.endswith("p95") else None, edgecolor="white", linewidth=0.5)
        if labels:
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        for bar, v in zip(bars, vals):
            if v == 0:  # a zero bar has no height: draw it as a thick line at zero, labelled, so it reads as zero
                left = bar.get_x()
                ax.plot([left, left + bar.get_width()], [0, 0], color=COLORS.get(system, "grey"), linewidth=3,
                        solid_capstyle="butt", clip_on=False, zorder=3)
                ax.annotate("0", (left + bar.get_width() / 2, 0), xytext=(0, 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7, color=COLORS.get(system, "grey"))
    ax.set_xticks(x, groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, framealpha=0.7)
    ax.grid(axis="y", alpha=0.3)


def _v(rows, system, operation, metric):
    r = lookup(rows, system, operation, metric)
    if r is None:
        return (None, None, None)
    return (r["value"], r["ci_low"], r["ci_high"])


def training_records(out: str | Path) -> dict[str, dict]:
    """Each expert's training.json, by operation (the per-epoch losses the report plots)."""
    records = {}
    for op in OPERATIONS:
        path = adapter_dir(out, op) / TRAINING_FILE
        if path.is_file():
            records[op] = json.loads(path.read_text())
    return records


def training_markdown(records: dict[str, dict]) -> list[str]:
    if not records:
        return []
    lines = ["", "## Expert training (per epoch; the best validation epoch is the expert kept)", "",
             "| expert | epochs run | best epoch | train loss per epoch | validation loss per epoch | stopped early | "
             "student prompt tokens (mean) | target cleaning |", "|---|---|---|---|---|---|---|---|"]
    for op, r in records.items():
        epochs = r.get("epochs") or []
        fmt = lambda key: ", ".join("–" if e[key] is None else f"{e[key]:.3f}" for e in epochs) or "–"  # noqa: E731
        lines.append(f"| {op} | {len(epochs)} | {r.get('best_epoch', '–')} | {fmt('train_loss')} | "
                     f"{fmt('validation_loss')} | {r.get('stopped_early', '–')} | {r.get('prompt_tokens_mean', '–')} "
                     f"({r.get('prompt', 'teacher')}) | {r.get('targets') or '–'} |")
    lines += ["", "Weight deviation: ||W_adapted - W||_F over every adapted layer, relative to ||W||_F "
              "(`student/deviation.py`): per epoch, then the saved adapter's, and its largest single layer. ETHER "
              "bounds it by construction, DeLoRA by lambda and the weight's column norms; LoRA does not bound it.", "",
              "| expert | method | relative, per epoch | saved: absolute | saved: relative | largest layer, relative |",
              "|---|---|---|---|---|---|"]
    for op, r in records.items():
        saved = r.get("weight_deviation") or {}
        per_epoch = ", ".join(f"{e['weight_deviation']['total_relative']:.4f}" for e in r.get("epochs") or []
                              if (e.get("weight_deviation") or {}).get("total_relative") is not None) or "–"
        lines.append(f"| {op} | {r.get('method', '–')} | {per_epoch} | {saved.get('total', '–')} | "
                     f"{saved.get('total_relative', '–')} | {saved.get('max_relative', '–')} |")
    return lines


def _curves(ax, records: dict[str, dict]) -> None:
    colors = dict(zip(OPERATIONS, ("#4C72B0", "#DD8452", "#55A868")))
    for op, r in records.items():
        epochs = r.get("epochs") or []
        x = [e["epoch"] for e in epochs]
        ax.plot(x, [e["train_loss"] for e in epochs], "o--", color=colors[op], label=f"{op} train", alpha=0.7)
        if any(e["validation_loss"] is not None for e in epochs):
            ax.plot(x, [e["validation_loss"] for e in epochs], "o-", color=colors[op], label=f"{op} validation")
        if r.get("best_epoch"):
            best = epochs[r["best_epoch"] - 1]
            if best["validation_loss"] is not None:
                ax.plot([best["epoch"]], [best["validation_loss"]], "*", color=colors[op], markersize=14)
    ax.set_xlabel("epoch")
    ax.set_ylabel("distillation loss")
    ax.set_title("Expert training: loss per epoch (star: the epoch kept)", fontsize=10)
    ax.grid(alpha=0.3)
    if records:
        ax.legend(fontsize=7, framealpha=0.7)


def render_png(rows: list[dict], path: Path, records: dict[str, dict] | None = None) -> Path:
    import matplotlib  # only where a figure is drawn: it is the slowest import here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = in_rows(rows)
    fig, axes = plt.subplots(3, 2, figsize=(13, 13))
    _curves(axes[2, 0], records or {})
    axes[2, 1].axis("off")
    acc = [(f"{op}\n{m}", op, m) for op, m in PRIMARY.items()] + [
        ("QA cat 1-4\ntoken F1", ANSWERABLE, "token_f1"), ("QA cat 1-4\nabstains", ANSWERABLE, "abstain_rate"),
        ("QA all\ntoken F1", "qa", "token_f1")]
    # The teacher is the reference its agreement is measured against (1 by construction): its bars are QA only.
    _bars(axes[0, 0], [g for g, _, _ in acc],
          {s: [(None, None, None) if s == TEACHER and op in PRIMARY else _v(rows, s, op, m) for _, op, m in acc]
           for s in systems},
          "score (95% CI)", "Agreement with the teacher's answers (the others); QA vs gold (all)")
    axes[0, 0].set_ylim(0, 1.05)
    decodings = ("constrained", "free") if free_decoded(rows) else ("constrained",)
    val = [(f"{op}\n{d}", op, "schema_valid" + ("" if d == "constrained" else "_free"))
           for op in OPERATIONS for d in decodings]
    _bars(axes[0, 1], [g for g, _, _ in val], {s: [_v(rows, s, op, m) for _, op, m in val] for s in systems},
          "schema_valid rate (95% CI)", "Schema-valid outputs, " + " vs ".join(decodings) + " decoding")
    axes[0, 1].set_ylim(0, 1.05)
    mem = [("peak RSS, end to end", "peak_rss_e2e_mb"), ("peak RSS", "peak_rss_mb"),
           ("RSS after load", "rss_after_load_mb"), ("peak CUDA", "peak_cuda_allocated_mb")]
    mem = [m for m in mem if any(_v(rows, s, "model", m[1])[0] is not None for s in systems)]
    _bars(axes[1, 0], [g for g, _ in mem], {s: [_v(rows, s, "model", m) for _, m in mem] for s in systems},
          "MiB", "Peak memory (each system in its own process)", labels=True)
    lat = {}
    for s in systems:
        lat[f"{s} p50"] = [_v(rows, s, op, "latency_p50") for op in OPERATIONS]
        lat[f"{s} p95"] = [_v(rows, s, op, "latency_p95") for op in OPERATIONS]
    _bars(axes[1, 1], list(OPERATIONS), lat, "seconds per call (95% CI)", "Latency p50 / p95 per operation")
    fig.suptitle("memlora evaluation: " + " vs ".join(systems), fontsize=12)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_report(rows: list[dict], meta: dict, out: str | Path) -> tuple[Path, Path]:
    md, png = report_paths(out)
    records = training_records(out)
    write_text(render_markdown(rows, meta) + "\n".join(training_markdown(records)) + "\n", md)
    render_png(rows, png, records)
    return md, png
