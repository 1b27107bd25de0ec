"""Training step: DeLoRA vs LoRA at equal rank and targets on the student (same batches, forward + backward +
optimizer step), DeLoRA's step with bfloat16 products (`distill.cpu_precision`) against its float32 one, and the
real DeepSpeed training with 1 vs 2 ranks on this machine, and the three experts in one launch vs a launch each.
Writes bench/results/training_step.json.

    python bench/training_step.py [--quick] [--out OUT] [--operation update] [--steps 6] [--no-ranks]

DeLoRA vs LoRA: both experts sit on their own copy of the same student base and train on the same batches of
the teacher's traces with the distillation loss; their steps alternate (DeLoRA, LoRA, DeLoRA in bfloat16, DeLoRA,
...) so that load from other processes hits them alike. Plain torch in one process: the adapters' own cost, not
DeepSpeed's.
Ranks: `memlora.student.launch.run_training` (the `deepspeed` launcher, ZeRO-2, CPU accelerator without a GPU)
with `distill.num_ranks` 1 then 2, same steps and per-rank batch; the record's step time and throughput.
Launches: `distill_operations` on the three operations at once (one launch) and on each alone, alternated; the
wall time, and what of it is outside the training loops (the records' train_runtime).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from common import CONFIG, bench_parser, bench_student, fmt, ratio_spread, save, spread, table, traces_root  # noqa: E402

from memlora.config import load_config, parse_config  # noqa: E402
from memlora.cpu import cpu_model  # noqa: E402
from memlora.layout import adapter_dir, trace_files  # noqa: E402
from memlora.llm.hf_backend import load_causal_lm  # noqa: E402
from memlora.student.build import build_student, shares_teacher_tokenizer  # noqa: E402
from memlora.student.examples import build_examples, load_traces  # noqa: E402
from memlora.student.experts import attach_expert  # noqa: E402
from memlora.student.trainer import Collator, forward_loss  # noqa: E402


def delora_vs_lora(config, base: Path, traces: Path, operation: str, steps: int, max_rows: int | None = None) -> dict:
    cfg, expert = config.distill, config.student.expert
    runs = {}
    for name, method, bf16 in (("delora", "delora", False), ("lora", "lora", False), ("delora bf16", "delora", True)):
        model, tokenizer, _ = load_causal_lm(str(base), dtype="float32", device="cpu")
        torch.manual_seed(cfg.seed)
        model = attach_expert(model, expert.model_copy(update={"method": method}))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = {"model": model, "opt": torch.optim.AdamW(params, lr=cfg.learning_rate), "bf16": bf16,
                      "trainable": sum(p.numel() for p in params), "times": [], "losses": []}
    data = build_examples(load_traces(trace_files(traces, operation)), tokenizer, cfg.max_length,
                          shares_teacher_tokenizer(config, tokenizer))
    data.examples = data.examples[:max_rows]
    top_k = max((len(s) for e in data.examples if e.teacher_ids for s in e.teacher_ids), default=1)
    collator = Collator(tokenizer.pad_token_id, top_k)
    batches = [collator(data.examples[i : i + cfg.batch_size]) for i in range(0, len(data.examples), cfg.batch_size)]
    for step in range(steps + 1):  # step 0 warms both up and is not timed
        batch = batches[step % len(batches)]
        for run in runs.values():
            started = time.perf_counter()
            loss, _ = forward_loss(run["model"], batch, cfg.kd_weight, cfg.kd_loss, cfg.jsd_beta, run["bf16"])
            loss.backward()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            if step:
                run["times"].append(time.perf_counter() - started)
            run["losses"].append(round(loss.item(), 3))
    ratio = ratio_spread(runs["delora"]["times"], runs["lora"]["times"])
    bf16_ratio = ratio_spread(runs["delora bf16"]["times"], runs["delora"]["times"])
    rows = [{"method": m, "trainable": f"{r['trainable']:,}", "step_median_s": f"{spread(r['times'])['median']:.3f}",
             "step_min_s": f"{spread(r['times'])['min']:.3f}", "loss": f"{r['losses'][0]} -> {r['losses'][-1]}"}
            for m, r in runs.items()]
    print(f"operation {operation}: {len(data.examples)} rows, batch {cfg.batch_size}, r={expert.r}, "
          f"targets {','.join(expert.target_modules)}, {steps} timed steps each, interleaved")
    print(table(rows, list(rows[0])))
    print(f"DeLoRA / LoRA step time: {fmt(ratio)} (target <= 1.2x)")
    print(f"DeLoRA bfloat16 / float32 products step time: {fmt(bf16_ratio)} "
          f"(bfloat16 units: {', '.join(cpu_model().get('bf16_units', [])) or 'none'})")
    return {"rows": rows, "delora_over_lora": ratio, "bf16_over_float32": bf16_ratio,
            "times": {m: r["times"] for m, r in runs.items()},
            "trainable": {m: r["trainable"] for m, r in runs.items()}}


def ranks(traces: Path, operation: str, steps: int, scratch: Path) -> dict:
    from memlora.student.distill import cache_key
    from memlora.student.launch import run_training

    records = {}
    for n in (1, 2):
        out = scratch / f"ranks-{n}"
        shutil.copytree(traces / "traces", out / "traces")
        raw = yaml.safe_load(CONFIG.read_text())
        raw["distill"].update(num_ranks=n, max_steps=steps)
        path = scratch / f"ranks-{n}.yaml"
        path.write_text(yaml.safe_dump(raw))
        config = parse_config(raw, path)
        base = build_student(config, out)
        started = time.perf_counter()
        record = run_training(config, str(out), operation, str(base), cache_key(config, out, operation),
                              on_line=lambda line: None)
        record["launch_wall_s"] = time.perf_counter() - started
        records[n] = record
    rows = [{"ranks": n, "steps": r["steps"], "global_batch": r["global_batch_size"], "step_s": r["step_time_s"],
             "examples_per_s": round(r["global_batch_size"] / r["step_time_s"], 2), "train_s": r["train_time_s"],
             "launch_wall_s": round(r["launch_wall_s"], 1)} for n, r in records.items()]
    speed = rows[1]["examples_per_s"] / rows[0]["examples_per_s"]
    print(table(rows, list(rows[0])))
    print(f"2 ranks / 1 rank throughput (examples/s): {speed:.2f}x on {os.cpu_count()} cores "
          "(each rank gets half the cores; gloo all-reduce of the adapter gradients each step)")
    return {"rows": rows, "throughput_2_over_1": speed}


def launches(traces: Path, scratch: Path, repeats: int = 2, steps: int = 1) -> dict:
    """The three experts in one launch (what `memlora distill` does) against a launch each, alternated, `steps`
    training steps each (the same either way): the launcher, the ranks' imports and their process group paid
    once instead of once per expert."""
    from memlora.config import OPERATIONS
    from memlora.student.distill import distill_operations

    raw = yaml.safe_load(CONFIG.read_text())
    raw["distill"].update(max_steps=steps)
    path = scratch / "launches.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = parse_config(raw, path)
    shutil.copytree(traces / "traces", scratch / "launches-base" / "traces")  # the pruning probe reads them
    base = build_student(config, scratch / "launches-base")
    ways = {"one launch": lambda out: distill_operations(config, out, list(OPERATIONS), base, on_line=quiet),
            "a launch each": lambda out: {op: distill_operations(config, out, [op], base, on_line=quiet)[op]
                                          for op in OPERATIONS}}
    walls: dict[str, list[float]] = {way: [] for way in ways}
    outside: dict[str, list[float]] = {way: [] for way in ways}  # the wall less the training loops' own seconds
    for i in range(repeats):
        for way, train in (ways.items() if i % 2 == 0 else reversed(ways.items())):
            out = scratch / f"launches-{i}-{way.replace(' ', '-')}"
            shutil.copytree(traces / "traces", out / "traces")
            started = time.perf_counter()
            records = train(out)
            walls[way].append(time.perf_counter() - started)
            outside[way].append(walls[way][-1] - sum(r.train_time_s for r in records.values()))
    # The same experts either way (same seeds, same steps): the first repeat's adapters, tensor for tensor
    first = {way: scratch / f"launches-0-{way.replace(' ', '-')}" for way in ways}
    identical = all(same_tensors(*(adapter_dir(out, op) / "adapter_model.safetensors" for out in first.values()))
                    for op in OPERATIONS)
    rows = [{"way": way, "experts": len(OPERATIONS), "steps_each": steps,
             "wall_s": " / ".join(f"{w:.1f}" for w in walls[way]),
             "outside_training_s": " / ".join(f"{w:.1f}" for w in outside[way])} for way in ways]
    print(table(rows, list(rows[0])))
    saved = sum(walls["a launch each"]) / sum(walls["one launch"])
    print(f"a launch each / one launch (wall, summed over {repeats} repeats): {saved:.2f}x; outside the training "
          f"loops {sum(outside['a launch each']) / repeats:.1f} s against {sum(outside['one launch']) / repeats:.1f} s;"
          f" identical experts: {identical}")
    return {"rows": rows, "walls": walls, "outside_training_s": outside, "each_over_one": saved,
            "identical_experts": identical}


def quiet(line: str) -> None:
    pass


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--operation", default="update")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--no-ranks", action="store_true", help="skip the 1 vs 2 DeepSpeed ranks part")
    args = parser.parse_args()
    steps = args.steps or (1 if args.quick else 6)
    config = load_config(CONFIG)
    traces = traces_root(args.out)
    result = {}
    with tempfile.TemporaryDirectory(prefix="memlora-bench-") as scratch:
        base = bench_student(config, args.out or scratch)
        result["delora_vs_lora"] = delora_vs_lora(config, base, traces, args.operation, steps,
                                                  max_rows=2 if args.quick else None)
        if not args.no_ranks:
            result["ranks"] = ranks(traces, args.operation, steps + 2, Path(scratch))
            result["launches"] = launches(traces, Path(scratch), repeats=1 if args.quick else 2)
    print("saved", save("training_step", {**result, "operation": args.operation, "steps": steps}))


if __name__ == "__main__":
    main()
