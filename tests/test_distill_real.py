"""Distillation on the real bundled models: the SmolLM2 teacher writes three traces (with its top-k log-probs),
the layer-pruned student gets an extraction expert through the deepspeed launcher, and the expert backend
serves it."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from memlora.data.io import write_parquet
from memlora.data.schemas import TRACES
from memlora.memory.llm import GenerationRequest
from memlora.memory.prompts import TEMPLATES, extraction_schema
from tests.conftest import TEACHER_REF
from tests.student_fixtures import distill_config

MESSAGES = [
    "Caroline: I went to an LGBTQ support group yesterday and it was so powerful.",
    "Melanie: We took the kids camping at the lake last weekend.",
    "Caroline: I'm thinking about studying counseling next year.",
]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_distil_an_expert_on_the_real_bundled_models(teacher_backend, tmp_path):
    from memlora.llm.hf_backend import TransformersBackend
    from memlora.student.build import build_student
    from memlora.student.distill import distill_operation
    from memlora.student.experts import ExpertBackend

    # Three real teacher calls, top-4 log-probs kept (the loaded teacher is shared, not loaded again).
    teacher = TransformersBackend(teacher_backend.model, teacher_backend.tokenizer, teacher_backend.model_id,
                                  batch_size=3, logprobs_top_k=4)
    template, schema = TEMPLATES["extraction"], extraction_schema(2, 60)
    requests = [GenerationRequest("extraction", template.messages(m), max_new_tokens=64, schema=schema)
                for m in MESSAGES]
    rows = []
    for i, (req, res) in enumerate(zip(requests, teacher.generate(requests))):
        try:
            ok = isinstance(json.loads(res.text).get("facts"), list)
        except (ValueError, AttributeError):
            ok = False
        rows.append({
            "trace_id": f"c:{i}", "operation": "extraction", "conversation_id": "c", "session": 1, "step": i,
            "messages": req.messages, "output_schema": json.dumps(schema), "raw_output": res.text,
            "parsed_output": res.text if ok else None, "parse_ok": ok, "parse_error": None if ok else "invalid",
            "constrained": True, "finish_reason": res.finish_reason, "prompt_tokens": res.prompt_tokens,
            "completion_tokens": res.completion_tokens, "completion_token_ids": res.token_ids,
            "top_logprobs": [[{"token_id": t, "logprob": lp} for t, lp in step] for step in res.top_logprobs],
            "latency_s": res.latency_s, "batch_size": res.batch_size, "model_id": teacher.model_id,
            "backend": "transformers", "template_hash": template.hash,
        })
    out = tmp_path / "out"
    write_parquet(pa.Table.from_pylist(rows, schema=TRACES), out / "traces" / "extraction" / "part-c.parquet",
                  "traces")
    used = sum(r["parse_ok"] for r in rows)
    assert used >= 1

    # The embedded default's student (4 contiguous layers of 30 dropped, chosen on these traces) and expert.
    path, config = distill_config(tmp_path / "c.yaml", TEACHER_REF, max_steps=3, batch_size=3, num_ranks=1)
    base = build_student(config, out)
    marker = json.loads((base / "memlora_student.json").read_text())
    dropped = sorted(set(range(30)) - set(marker["kept_layers"]))
    assert len(dropped) == 4 and dropped == list(range(dropped[0], dropped[0] + 4)) and 29 not in dropped
    scores = marker["angular_distance_by_start"]
    assert len(scores) == 26 and scores[dropped[0]] == min(scores)
    lines: list[str] = []
    record = distill_operation(config, out, "extraction", base, on_line=lines.append)
    assert record.steps == 3 and record.rows_used == used and record.rows_with_teacher_logprobs == used
    assert record.world_size == 1 and record.trainable_parameters == 2116790  # r=8 on 7 projections x 26 layers
    # Three DeLoRA steps need not lower the loss (its first step jumps to the full lambda-bounded update, see
    # the report); the tiny-model launcher tests check that training lowers it. Here: finite, and it trained.
    assert all(0 < loss < float("inf") for loss in record.loss_curve + [record.loss_after])
    assert any("'loss'" in line for line in lines)

    backend = ExpertBackend.from_out(base, out, device="cpu", batch_size=3)
    assert backend.operations == ["extraction"]
    with backend.bare():
        bare = backend.generate(requests[:1])[0]
    expert = backend.generate(requests[:1])[0]
    assert expert.completion_tokens > 0 and expert.token_ids != bare.token_ids
