"""The CUDA and bf16 paths, run for real on whatever GPU is visible (CPU where none is, as a smoke run).

No model hub is reachable on a lent GPU machine and the bundled models do not travel to it, so the models are
built here: a tiny random Llama (the distill test's) and one of the student's exact shape (its config.json), both
with the student's tokenizer. What runs, each step on its own (a failing step is recorded and the next runs):

- distill: one expert through the real `deepspeed` launcher (ZeRO-2, then ZeRO-3 for a second operation) on the
  tiny model: the training record's device, world size, stage, loss before and after, seconds;
- experts: the trained experts served by `ExpertBackend` on the device (merged in float32; in bf16 they stay
  un-merged by design), their logits against the un-merged PeftModel's, and the time of a switch;
- decode: `TransformersBackend` on the student-shaped model (bf16 on a GPU), constrained extraction requests at
  batch 1 and 8 with log-probs: time per generated token and every answer valid JSON.

    python bench/gpu_paths.py (--student-dir DIR | --out OUT) [--quick]   (DIR: the student's config + tokenizer)

--quick (the test suite's smoke run) leaves out training, which the launcher's own tests cover, and decodes with
the tiny model.

Writes bench/results/gpu_paths.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ACCELERATOR = os.environ.get("DS_ACCELERATOR")  # as the user set it, before the tests' conftest sets a default

from common import bench_parser, save  # noqa: E402

from tests.conftest import save_tiny_llama  # noqa: E402


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    bf16=torch.cuda.is_bf16_supported(), gpus=torch.cuda.device_count())
    return info


def student_shaped(folder: Path, student_dir: Path) -> Path:
    """A random model of the student's exact shape: timings do not depend on the weights' values."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_dir)).save_pretrained(
        folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(folder)
    return folder


def distill(work: Path, tiny: Path) -> dict:
    """Two experts through the real launcher: extraction under ZeRO-2, update under ZeRO-3."""
    from transformers import AutoTokenizer

    from memlora.student.build import build_student
    from memlora.student.distill import distill_operation
    from tests.student_fixtures import distill_config, write_traces

    if ACCELERATOR is None:  # the test suite's conftest keeps DeepSpeed on the CPU; here the GPU is the point
        os.environ.pop("DS_ACCELERATOR", None)

    out = work / "out"
    write_traces(out, AutoTokenizer.from_pretrained(tiny), operations=("extraction", "update"))
    results = {}
    for operation, stage in (("extraction", 2), ("update", 3)):
        path, config = distill_config(work / f"{operation}.yaml", str(tiny),
                                      student={"prune": {"from": "teacher", "keep_layers": [0, 2]}},
                                      max_steps=8, batch_size=2, learning_rate=0.01, num_ranks=1,
                                      timeout_s=600, zero_stage=stage)
        lines: list[str] = []
        started = time.perf_counter()
        record = distill_operation(config, out, operation, build_student(config, out), on_line=lines.append)
        results[operation] = {"seconds": time.perf_counter() - started, "device": record.device,
                              "world_size": record.world_size, "stage": record.deepspeed_stage,
                              "steps": record.steps, "loss_before": record.loss_before,
                              "loss_after": record.loss_after, "log_tail": lines[-5:]}
    results["out"] = str(out)
    return results


def experts(work: Path, base: Path, trained: dict[str, Path], rounds: int = 50) -> dict:
    """Experts served by ExpertBackend on the device (merged in float32, un-merged in bf16: `merged` says which)
    against the PeftModel's logits: the trained ones, whose few steps barely move the weights, and one made far
    from zero (the tests' perturbed expert), where a merge's rounding would show."""
    import torch
    from peft import PeftModel

    from memlora.llm.hf_backend import load_causal_lm
    from memlora.student.experts import ExpertBackend
    from tests.student_fixtures import saved_expert

    adapters = dict(trained) or {"extraction": saved_expert(base, work / "perturbed-1", seed=1)}
    adapters["generation"] = saved_expert(base, work / "perturbed-2", seed=2)
    backend = ExpertBackend(base, adapters, merge=True)
    device = next(backend.model.parameters()).device
    ids = torch.tensor([backend.tokenizer("Alice: I moved to Paris last spring.")["input_ids"]], device=device)
    result = {"device": str(device), "dtype": str(next(backend.model.parameters()).dtype), "merged": backend.merge}
    for op in adapters:
        backend.use(op)
        with torch.inference_mode():
            merged = backend.model(input_ids=ids).logits.float()
        plain, _, _ = load_causal_lm(str(base), device=str(device))
        reference = PeftModel.from_pretrained(plain, str(adapters[op]), use_safetensors=True).eval()
        with torch.inference_mode():
            unmerged = reference(input_ids=ids).logits.float()
        scale = unmerged.std().item()
        result[op] = {"max_abs_diff_over_std": (merged - unmerged).abs().max().item() / scale,
                      "same_top_token": bool((merged.argmax(-1) == unmerged.argmax(-1)).float().mean() == 1)}
    started = time.perf_counter()
    for _ in range(rounds):
        backend.use("extraction")
        backend.use("generation")
    if device.type == "cuda":
        torch.cuda.synchronize()
    result["switch_ms"] = (time.perf_counter() - started) / (2 * rounds) * 1e3
    return result


def decode(model_dir: Path) -> dict:
    """Constrained extraction requests through TransformersBackend at batch 1 and 8, with log-probs."""
    import torch

    from memlora.llm.hf_backend import TransformersBackend, load_causal_lm
    from memlora.memory.llm import GenerationRequest
    from memlora.memory.parsing import extract_json
    from memlora.memory.prompts import extraction_schema

    model, tok, model_id = load_causal_lm(str(model_dir))
    backend = TransformersBackend(model, tok, model_id, batch_size=8, logprobs_top_k=1)
    schema = extraction_schema(max_facts=2, max_chars=24)  # short enough that a random model's answer closes
    tokens = 48
    result = {"device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype)}
    for batch in (1, 8):
        requests = [GenerationRequest("extraction", [{"role": "system", "content": "Extract facts as JSON."},
                                                      {"role": "user", "content": f"Bob {i}: I run every day."}],
                                      tokens, schema) for i in range(batch)]
        backend.generate(requests)  # warm-up: the grammar compiled, kernels loaded
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        answers = backend.generate(requests)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        generated = sum(a.completion_tokens for a in answers)
        result[f"batch_{batch}"] = {
            "seconds": seconds, "generated_tokens": generated, "ms_per_step": seconds / max(
                max(a.completion_tokens for a in answers), 1) * 1e3,
            "valid_json": sum(extract_json(a.text).ok for a in answers), "answers": len(answers),
            "finish": sorted({a.finish_reason for a in answers}),
            "logprobs": all(a.token_logprobs is not None and len(a.token_logprobs) == a.completion_tokens
                            for a in answers)}
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--student-dir", help="config.json + tokenizer of the student (default: OUT's student)")
    args = parser.parse_args()
    if not (args.student_dir or args.out):
        parser.error("give --student-dir, or --out with a built student")
    student_dir = Path(args.student_dir or Path(args.out) / "student" / "base")
    results: dict = {"environment": environment()}
    print(json.dumps(results["environment"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="memlora-gpu-") as scratch:
        work = Path(scratch)
        tiny = save_tiny_llama(work / "tiny", student_dir)  # the distill tests' tiny model

        def trained_experts() -> dict:
            if args.quick:  # the launcher's own tests train; quick mode keeps to what serving does
                return experts(work, tiny, {}, rounds=5)
            out = Path(results["distill"]["out"])
            return experts(work, out / "student" / "base", {op: out / "adapters" / op
                                                            for op in ("extraction", "update")})

        steps = [("distill", lambda: {"skipped": "quick"} if args.quick else distill(work, tiny)),
                 ("experts", trained_experts),
                 ("decode", lambda: decode(tiny if args.quick else student_shaped(work / "student", student_dir)))]
        for name, step in steps:
            started = time.perf_counter()
            try:
                results[name] = step()
            except Exception:  # recorded, and the next step still runs: one run must say as much as it can
                results[name] = {"error": traceback.format_exc()[-3000:]}
            results[name]["step_seconds"] = time.perf_counter() - started
            print(name, json.dumps(results[name], default=str)[:3000], flush=True)
    print("saved", save("gpu_paths", results))
    failed = [name for name, result in results.items() if "error" in result]
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (the tracebacks are in the results)")


if __name__ == "__main__":
    main()
