"""How far each system's decode step is from what this machine's memory allows: a CPU decode step reads every weight
once (and the KV cache so far), so the step cannot take less than those bytes over the memory bandwidth.

Measured here, in one run: the bandwidth (a large copy and a triad `a = b + s * c` in torch, best of the repeats,
bytes moved per second), and per system and batch size the time of a decode step (generate N + 1 tokens minus
generate 1, over N; greedy, no early stop) against its floor (weight bytes + KV-cache bytes read per step, over the
triad bandwidth). Systems: the teacher in float32 (as the config deploys it) and int8, the student base in float32
(experts merged read the same bytes), int8, int8 with an expert beside it, un-merged and folded into a low-rank pair
as `ExpertBackend` runs it (`student.quantize: int8`: the difference is what the expert beside costs), and int8 with
the expert merged before quantizing (the other design: one int8 copy of the base per expert, a switch a pointer
swap), and the weight-only schemes (`int8_weight` bare and merged, `int4_weight` bare and with an expert beside).
Every system decodes with the backends' CPU product (`llm.cpu_matmul`: this machine's faster of `F.linear` and rows
first); the teacher also through each of the two, for what the choice buys. `teacher-compiled` and
`student-compiled` (not in the default list: each compiles for minutes per batch size) decode through
`torch.compile` (inductor, weights frozen and prepacked) on a static KV cache: whether a compiler, rather than
the eager kernels, closes the gap. The ratio says how much faster a step could get on this CPU; it is not a guess
at the kernels.

    python bench/bandwidth_floor.py [--quick] [--out OUT] [--systems teacher,student,...]
        (OUT: use its student base)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CONFIG, bench_parser, bench_student, save, table  # noqa: E402

from memlora.llm.quantize import INT4, WEIGHT_ONLY  # noqa: E402  `student.quantize: int8_weight / int4_weight`


def bandwidth(megabytes: int, repeats: int) -> dict:
    """Bytes moved per second by a copy (read + write) and a triad (two reads + a write), best of `repeats`."""
    import torch

    n = megabytes * 2**20 // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    results = {}
    for name, moved, step in (("copy", 2, lambda: a.copy_(b)),
                              ("triad", 3, lambda: torch.add(b, c, alpha=1.5, out=a))):
        step()  # pages touched before timing
        best = min(_time(step) for _ in range(repeats))
        results[f"{name}_gb_s"] = moved * n * 4 / best / 1e9
    return results


def _time(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every linear layer's weight and bias (quantized ones with their scales
    and zero points) and the norms; the token embedding only where the output head reads it (tied weights are in
    the head's linear already: one row of the input embedding is read per token)."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from memlora.llm.quantize import BesideLinear, Int4WeightLinear, Int8WeightLinear

    total, seen = 0, set()
    for module in model.modules():
        # quantized: weights, scales (and zeros), bias; beside: the folded expert's pair (one expert here)
        if isinstance(module, (Int8WeightLinear, Int4WeightLinear, BesideLinear)):
            total += sum(t.numel() * t.element_size() for t in module.buffers(recurse=False))
        elif isinstance(module, DynamicLinear):
            weight, bias = module._packed_params._weight_bias()
            total += weight.numel() * weight.element_size() + weight.size(0) * 16  # + per-channel scale, zero
            total += bias.numel() * bias.element_size() if bias is not None else 0
            continue
        if isinstance(module, torch.nn.Embedding):
            continue
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel() * param.element_size()
    return total


def kv_bytes(model, tokens: int, batch: int) -> int:
    """Bytes of KV cache one step reads at `tokens` positions (keys and values of every layer, float32)."""
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * tokens * batch * 4


def step_seconds(model, prompt: int, steps: int, batch: int, repeats: int, compiled: bool = False) -> float:
    """Median over `repeats` of (generate steps + 1 tokens - generate 1 token) / steps: the prefill cancels."""
    import torch

    ids = torch.randint(100, model.config.vocab_size - 100, (batch, prompt), generator=torch.Generator().manual_seed(0))
    if compiled:
        return compiled_step_seconds(model, ids, steps, repeats)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - started

    run(2)  # warm-up
    return statistics.median((run(steps + 1) - run(1)) / steps for _ in range(repeats))


def compiled_step_seconds(model, ids, steps: int, repeats: int) -> float:
    """The median greedy decode step through `torch.compile` (inductor; weights frozen, so its linears are
    prepacked) on a static KV cache of one size for every run: graphs per batch size (prefill and step), compiled
    in the warm-up. Timed step by step (the forward alone; the prefill is not in it). transformers' own compiled
    `generate` (`CompileConfig` with freezing as a compile option) was slower than eager on this host; with
    freezing set in inductor's config and this loop it is not (docs/results.md)."""
    import torch
    from transformers import StaticCache

    import torch._inductor.config as inductor

    forward = getattr(model, "_bench_compiled", None)
    if forward is None:
        inductor.freezing = True  # set globally: as a torch.compile option it did not take effect here
        forward = model._bench_compiled = torch.compile(model.forward)
    batch, prompt = ids.shape

    def run() -> list[float]:
        cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=prompt + steps + 16)
        times = []
        with torch.no_grad():
            logits = forward(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt),
                             position_ids=torch.arange(prompt).expand(batch, -1), logits_to_keep=1).logits
            for i in range(steps):
                token = logits[:, -1].argmax(-1, keepdim=True)
                started = time.perf_counter()
                logits = forward(input_ids=token, past_key_values=cache, cache_position=torch.tensor([prompt + i]),
                                 position_ids=torch.full((batch, 1), prompt + i), logits_to_keep=1).logits
                times.append(time.perf_counter() - started)
        return times

    run()  # warm-up: the compilation
    return statistics.median(statistics.median(run()) for _ in range(repeats))


def load(system: str, base: Path, config):
    from memlora.llm.cpu_matmul import use_fastest_decode_product, use_rows_first_linears
    from memlora.llm.hf_backend import load_causal_lm
    from memlora.llm.quantize import fold_beside, quantize_base
    from memlora.student.experts import attach_expert

    model = load_causal_lm(config.teacher.model if system.startswith("teacher") else str(base), dtype="float32",
                           device="cpu")[0]
    if "+expert" in system:  # as ExpertBackend serves `student.quantize: int8`: un-merged
        model = attach_expert(model, config.student.expert)
    if system.endswith("+expert-merged"):  # the other design: one int8 copy per expert, merged before
        model = model.merge_and_unload()
    if "int" in system:
        quantize_base(model, next((s for s in (WEIGHT_ONLY, INT4) if s in system), "int8"))
        if system.endswith("+expert"):  # as ExpertBackend runs an expert beside a quantized base: folded
            fold_beside(model, ["default"])["active"] = "default"
    if system == ROWS_FIRST:
        use_rows_first_linears(model)
    elif system not in (PLAIN, *COMPILED):  # compiled: torch's F.linear, which inductor prepacks
        use_fastest_decode_product(model)  # the product the backends decode with (float32 linears only)
    return model.eval()


# The teacher through plain `F.linear`, as torch multiplies by default, and through rows first: beside "teacher"
# (the backends' product, the faster of the two here: llm/cpu_matmul.py), what the choice buys in the same run.
PLAIN, ROWS_FIRST = "teacher-F.linear", "teacher-rows-first"
SYSTEMS = ("teacher", PLAIN, ROWS_FIRST, "teacher-int8", "student", "student-int8", "student-int8+expert",
           "student-int8+expert-merged", f"student-{WEIGHT_ONLY}", f"student-{WEIGHT_ONLY}+expert-merged",
           f"student-{INT4}", f"student-{INT4}+expert")  # int4 experts stay beside (student/experts.py)
COMPILED = ("teacher-compiled", "student-compiled")  # asked for by name: minutes of compilation per batch size


def main() -> None:
    import torch

    from memlora.config import load_config

    parser = bench_parser(__doc__)
    parser.add_argument("--batches", default=None, help="batch sizes, comma-separated (default 1,8)")
    parser.add_argument("--systems", default=None, help=f"comma-separated, of {', '.join(SYSTEMS + COMPILED)} "
                        "(default all but the compiled ones)")
    args = parser.parse_args()
    systems = args.systems.split(",") if args.systems else list(SYSTEMS)
    if set(systems) - set(SYSTEMS) - set(COMPILED):
        parser.error(f"--systems: unknown {', '.join(sorted(set(systems) - set(SYSTEMS) - set(COMPILED)))}")
    config = load_config(CONFIG)
    prompt, steps, repeats = (8, 4, 1) if args.quick else (128, 16, 3)
    batches = [int(b) for b in (args.batches or ("1,2" if args.quick else "1,8")).split(",")]
    measured = bandwidth(32 if args.quick else 512, 2 if args.quick else 5)
    floor_bw = measured["triad_gb_s"] * 1e9
    print(f"memory bandwidth ({torch.get_num_threads()} threads): copy {measured['copy_gb_s']:.1f} GB/s, "
          f"triad {measured['triad_gb_s']:.1f} GB/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="memlora-bench-") as scratch:
        base = bench_student(config, args.out or scratch)
        for system in systems:  # one after the other, each loaded alone
            model = load(system, base, config)
            weights = weight_bytes(model)
            for batch in batches:
                seconds = step_seconds(model, prompt, steps, batch, repeats, compiled=system in COMPILED)
                read = weights + kv_bytes(model, prompt + steps, batch)
                rows.append({"system": system, "batch": batch, "weights_mb": weights / 1e6, "read_mb": read / 1e6,
                             "step_ms": seconds * 1e3, "floor_ms": read / floor_bw * 1e3,
                             "over_floor": seconds / (read / floor_bw)})
                print(f"{system} batch {batch}: step {seconds * 1e3:.1f} ms, floor {read / floor_bw * 1e3:.1f} ms "
                      f"({rows[-1]['over_floor']:.2f}x)", flush=True)
            del model
    printed = [{k: (f"{v:.2f}x" if k == "over_floor" else f"{v:.1f}" if isinstance(v, float) else v)
                for k, v in r.items()} for r in rows]
    print(table(printed, list(printed[0])))
    print("saved", save("bandwidth_floor", {"bandwidth": measured, "prompt_tokens": prompt, "steps": steps,
                                            "repeats": repeats, "rows": rows}))


if __name__ == "__main__":
    main()
