"""Helpers for the student/distill tests: synthetic trace shards, configs, tiny experts."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import yaml

from memlora.config import OPERATIONS, Config, parse_config
from memlora.data.io import write_parquet
from memlora.data.schemas import TRACES
from tests.conftest import REPO

SYSTEM = {
    "extraction": "Extract the salient facts from the messages as JSON.",
    "update": "Decide ADD, UPDATE, DELETE or NONE for the new fact, as JSON.",
    "generation": "Answer the question from the memories, briefly.",
}
FACTS = [
    ("Alice: I moved to Paris last spring.", '{"facts": ["Alice moved to Paris"]}'),
    ("Bob: My dog Rex turned five today.", '{"facts": ["Bob has a dog named Rex"]}'),
    ("Alice: I started painting in May.", '{"facts": ["Alice paints"]}'),
    ("Bob: I work as a nurse at night.", '{"facts": ["Bob is a nurse"]}'),
    ("Alice: My sister lives in Lyon.", '{"facts": ["Alice has a sister in Lyon"]}'),
    ("Bob: I run every morning.", '{"facts": ["Bob runs daily"]}'),
]


def trace_rows(tokenizer, operation: str, n: int = 6, top_k: int = 4, bad: int = 1, seed: int = 0,
               with_logprobs: bool = True) -> list[dict]:
    """Rows shaped like the teacher's: completion ids from the tokenizer, a peaked top-k per token; the last
    `bad` rows did not parse."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        user, answer = FACTS[i % len(FACTS)]
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        top = None
        if with_logprobs:
            top = []
            for tok in ids:
                others = rng.sample([t for t in range(100, 5000) if t != tok], top_k - 1)
                top.append([{"token_id": tok, "logprob": -0.1}]
                           + [{"token_id": o, "logprob": -3.0 - j} for j, o in enumerate(others)])
        ok = i < n - bad
        rows.append({
            "trace_id": f"c1:{operation}:{i}", "operation": operation, "conversation_id": "c1", "session": 1,
            "step": i, "output_schema": None,
            "messages": [{"role": "system", "content": SYSTEM[operation]}, {"role": "user", "content": user}],
            "raw_output": answer if ok else answer[:-3], "parsed_output": answer if ok else None, "parse_ok": ok,
            "parse_error": None if ok else "truncated JSON", "constrained": True, "finish_reason": "stop",
            "prompt_tokens": 20, "completion_tokens": len(ids), "completion_token_ids": ids, "top_logprobs": top,
            "latency_s": 0.1, "batch_size": 1, "model_id": "tiny", "backend": "transformers",
            "template_hash": "x",
        })
    return rows


def write_traces(out: Path, tokenizer, operations=OPERATIONS, **kwargs) -> Path:
    for op in operations:
        table = pa.Table.from_pylist(trace_rows(tokenizer, op, **kwargs), schema=TRACES)
        write_parquet(table, out / "traces" / op / "part-c1.parquet", "traces")
    return out


def distill_config(path: Path, teacher: str, student: dict | None = None, expert: dict | None = None,
                   **distill) -> tuple[Path, Config]:
    """The default config with a given teacher, student and distill settings, written to `path`."""
    raw = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    raw["teacher"].update(model=teacher, device="cpu")
    if student is not None:
        raw["student"] = {"expert": raw["student"]["expert"], **student}
    raw["student"]["expert"].update(expert or {})
    raw["distill"].update(distill)
    path.write_text(yaml.safe_dump(raw))
    return path, parse_config(raw, path)


def perturb(model, seed: int, scale: float = 0.5) -> None:
    """Give a fresh expert non-zero weights (peft starts B at zero, which leaves outputs unchanged)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # delora_B and lora_B
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def saved_expert(base: Path, folder: Path, seed: int, scale: float = 0.5) -> Path:
    """A DeLoRA expert (r=4) on `base` with non-zero weights from `seed`, saved as safetensors in `folder`."""
    import torch

    from memlora.config import ExpertConfig
    from memlora.llm.hf_backend import load_causal_lm
    from memlora.student.experts import attach_expert

    model, _, _ = load_causal_lm(str(base), dtype="float32", device="cpu")
    torch.manual_seed(seed)
    expert = attach_expert(model, ExpertConfig(r=4), name="default")
    perturb(expert, seed=seed, scale=scale)
    expert.save_pretrained(str(folder), safe_serialization=True)
    return folder


def pruned_config(tmp_path: Path, teacher: str) -> tuple[Path, Config]:
    """The default config on a tiny teacher, its student pruned to layers 0 and 2 and reading the teacher's prompt."""
    return distill_config(tmp_path / "c.yaml", teacher,
                          student={"prune": {"from": "teacher", "keep_layers": [0, 2]}, "prompt": "teacher"})
