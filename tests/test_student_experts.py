"""Experts on a tiny random Llama: which modules DeLoRA adapts and trains, save/reload, one base with every
expert switched per operation (no reload), the bare mode, and the export to plain LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memlora.config import OPERATIONS, ExpertConfig
from memlora.llm.hf_backend import load_causal_lm
from memlora.manifest import UntrustedArtifact, update_manifest
from memlora.memory.llm import GenerationRequest
from memlora.memory.prompts import STUDENT_SYSTEM
from memlora.student.experts import ExpertBackend, adapter_config, adapter_name, attach_expert
from tests.student_fixtures import perturb

PROMPT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where does Alice live?"}]


def fresh(tiny_model_dir: Path):
    model, tokenizer, _ = load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu")
    return model, tokenizer


def logits_of(model, tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def experts_out(tmp_path_factory, tiny_model_dir) -> Path:
    """OUT/adapters/<op>/ for every operation: DeLoRA experts with different (non-zero) weights."""
    out = tmp_path_factory.mktemp("experts-out")
    for i, op in enumerate(OPERATIONS):
        model, _ = fresh(tiny_model_dir)
        torch.manual_seed(i)
        peft_model = attach_expert(model, ExpertConfig(r=4), name="default")
        perturb(peft_model, seed=10 + i)
        peft_model.save_pretrained(str(out / "adapters" / op), safe_serialization=True)
    update_manifest(out)  # as the distill stage does: loads are checked against these sha256s
    return out


@pytest.mark.timeout(60)
def test_delora_adapts_only_the_target_modules_and_only_it_trains(tiny_model_dir):
    from peft.tuners.delora.layer import DeloraLinear

    model, tokenizer = fresh(tiny_model_dir)
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = attach_expert(model, ExpertConfig(r=4, target_modules=targets))
    adapted = {n for n, m in peft_model.named_modules() if isinstance(m, DeloraLinear)}
    assert adapted and all(n.rsplit(".", 1)[-1] in targets for n in adapted)
    assert len(adapted) == len(targets) * model.config.num_hidden_layers
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("delora_" in n for n in trainable)
    # r * (in + out) for A and B, plus one lambda, per adapted Linear
    expected = sum(4 * (m.in_features + m.out_features) + 1
                   for n, m in peft_model.named_modules() if isinstance(m, DeloraLinear))
    assert sum(p.numel() for p in trainable.values()) == expected

    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    before = logits_of(peft_model, tokenizer)
    assert torch.allclose(before, logits_of(fresh(tiny_model_dir)[0], tokenizer))  # B = 0: outputs unchanged
    optimizer = torch.optim.AdamW(trainable.values(), lr=5e-3)
    peft_model.train()
    logits_of_train = peft_model(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits
    logits_of_train.logsumexp(-1).mean().backward()
    optimizer.step()
    peft_model.eval()
    for n, p in peft_model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"{n} changed but is not part of the expert"
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in trainable.items() if "delora_B" in n)
    assert not torch.allclose(before, logits_of(peft_model, tokenizer))  # one step moves the outputs


@pytest.mark.timeout(60)
def test_lora_is_a_config_switch_with_r_and_alpha():
    cfg = adapter_config(ExpertConfig(method="lora", r=4, lora_alpha=8, target_modules=["q_proj"]))
    assert type(cfg).__name__ == "LoraConfig" and cfg.r == 4 and cfg.lora_alpha == 8
    cfg = adapter_config(ExpertConfig(r=4, delora_lambda=10, target_modules=["q_proj"]))
    assert type(cfg).__name__ == "DeloraConfig" and cfg.r == 4 and cfg.delora_lambda == 10


@pytest.mark.timeout(60)
def test_saved_adapter_reloads_with_the_same_logits(tiny_model_dir, experts_out):
    from peft import PeftModel

    folder = experts_out / "adapters" / "extraction"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "DELORA"
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "adapter_model.bin").exists()

    model, tokenizer = fresh(tiny_model_dir)
    torch.manual_seed(0)
    original = attach_expert(model, ExpertConfig(r=4))
    perturb(original, seed=10)  # the same weights the fixture saved for `extraction`
    expected = logits_of(original, tokenizer)

    base, _ = fresh(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, str(folder), use_safetensors=True)
    got = logits_of(reloaded, tokenizer)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, logits_of(fresh(tiny_model_dir)[0], tokenizer), atol=1e-3)


def requests(operation: str) -> list[GenerationRequest]:
    return [GenerationRequest(operation=operation, messages=PROMPT, max_new_tokens=6)]


def peft_reference(tiny_model_dir: Path, experts_out: Path):
    """Every expert loaded by peft itself onto a fresh base, un-merged: the yardstick of the backend's designs."""
    from peft import PeftModel

    model, _ = fresh(tiny_model_dir)
    first, *rest = OPERATIONS
    model = PeftModel.from_pretrained(model, str(experts_out / "adapters" / first), adapter_name=adapter_name(first))
    for op in rest:
        model.load_adapter(str(experts_out / "adapters" / op), adapter_name=adapter_name(op))
    return model.eval()


@pytest.mark.timeout(120)
def test_switching_experts_changes_outputs_without_reloading(tiny_model_dir, experts_out, monkeypatch):
    """Un-merged (`merge_experts: false`) the experts sit beside the float32 base folded into low-rank pairs: a
    switch is one assignment, the base is neither copied nor changed, and each expert computes what peft's own
    adapter does."""
    import memlora.student.experts as experts
    from memlora.llm.quantize import BesideLinear

    loads = []
    real_load = experts.load_causal_lm
    monkeypatch.setattr(experts, "load_causal_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    backend = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu", batch_size=4)
    assert backend.operations == list(OPERATIONS) and len(loads) == 1
    assert backend.folded and not backend.merge and not backend._originals  # no float32 copy of the base
    model = backend.model
    assert any(isinstance(m, BesideLinear) and type(m.base) is torch.nn.Linear for m in model.modules())
    weights = {n: p.data_ptr() for n, p in model.named_parameters()}
    reference = peft_reference(tiny_model_dir, experts_out)
    from memlora.evaluation.probes import parameter_counts

    low_rank = sum(p.numel() for n, p in reference.named_parameters() if "delora_A" in n or "delora_B" in n)
    assert parameter_counts(model) == {"base": parameter_counts(reference)["base"], "adapters": low_rank}

    seen = {}
    for op in [*OPERATIONS, "extraction", "generation"]:
        backend.use(op)
        assert backend.active == op
        seen.setdefault(op, logits_of(model, backend.tokenizer))
        assert torch.equal(logits_of(model, backend.tokenizer), seen[op])  # switching back restores it exactly
    for op in OPERATIONS:  # what peft's own un-merged adapter computes, to float32 rounding
        reference.set_adapter(adapter_name(op))
        want = logits_of(reference, backend.tokenizer)
        assert (seen[op] - want).abs().max() < 1e-4 * want.abs().max(), op
    assert not torch.allclose(seen["extraction"], seen["update"], atol=1e-3)
    assert not torch.allclose(seen["update"], seen["generation"], atol=1e-3)

    # Through the LLMBackend interface, mixed operations in one call: each batch runs on its own expert.
    mixed = requests("extraction") + requests("update") + requests("generation") + requests("extraction")
    results = backend.generate(mixed)
    alone = {op: backend.generate(requests(op))[0].token_ids for op in OPERATIONS}
    assert [r.token_ids for r in results] == [alone[r.operation] for r in mixed]
    assert len(loads) == 1 and backend.model is model
    assert weights == {n: p.data_ptr() for n, p in model.named_parameters()}  # nothing reloaded or copied


@pytest.mark.timeout(120)
def test_merged_experts_compute_what_unmerged_ones_do_and_switching_restores_the_base(tiny_model_dir, experts_out):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from memlora.llm.quantize import BesideLinear

    plain = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu")  # folded beside: base never merged
    merged = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu", merge=True)
    assert merged.merge and not plain.merge
    base_weights = {n: m.base.weight for n, m in plain.model.named_modules() if isinstance(m, BesideLinear)}
    expected = {}
    for op in OPERATIONS:
        plain.use(op)
        expected[op] = logits_of(plain.model, plain.tokenizer)
    for op in [*OPERATIONS, "extraction", "update", "generation", "update"]:
        merged.use(op)
        assert all(layer.merged for layer in merged._tuner_layers)  # the forward runs the base layer alone
        assert torch.allclose(logits_of(merged.model, merged.tokenizer), expected[op], atol=1e-4)
        # the same tokens through the LLMBackend interface, as the evaluation and the server call it
        assert merged.generate(requests(op))[0].token_ids == plain.generate(requests(op))[0].token_ids
    with merged.bare():
        merged.use(None)
        restored = {n: m.get_base_layer().weight for n, m in merged.model.named_modules()
                    if isinstance(m, BaseTunerLayer)}
        assert len(restored) == len(base_weights) > 0  # bit for bit: restored from the copy, not subtracted
        assert all(torch.equal(p, base_weights[n]) for n, p in restored.items())
        with plain.bare():
            assert torch.equal(logits_of(merged.model, merged.tokenizer), logits_of(plain.model, plain.tokenizer))
    merged.use("update")
    assert torch.allclose(logits_of(merged.model, merged.tokenizer), expected["update"], atol=1e-4)


@pytest.mark.timeout(120)
def test_bfloat16_experts_asked_to_merge_stay_beside_the_base_folded(tiny_model_dir, experts_out):
    """A merged update of ~1 % of a bfloat16 weight loses much of its precision: asked to merge, a bfloat16
    backend keeps the experts beside its base, folded as float32's are (not peft's slower layers)."""
    from memlora.llm.quantize import BesideLinear

    backend = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu", merge=True, dtype="bfloat16")
    assert backend.folded and not backend.merge and not backend._originals
    assert any(isinstance(m, BesideLinear) and m.base.weight.dtype == torch.bfloat16 for m in backend.model.modules())
    answers = {}
    for op in [*OPERATIONS, "extraction"]:
        backend.use(op)
        answers.setdefault(op, backend.generate(requests(op))[0].token_ids)
        assert backend.generate(requests(op))[0].token_ids == answers[op]


@pytest.mark.timeout(120)
def test_bare_mode_equals_the_base_model(tiny_model_dir, experts_out):
    base, tokenizer = fresh(tiny_model_dir)
    expected = logits_of(base, tokenizer)
    backend = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu")
    with backend.bare():
        assert torch.allclose(logits_of(backend.model, tokenizer), expected, atol=1e-6)
        bare_ids = backend.generate(requests("extraction"))[0].token_ids
    backend.use("extraction")
    assert not torch.allclose(logits_of(backend.model, tokenizer), expected, atol=1e-3)

    no_experts = ExpertBackend(tiny_model_dir, None, device="cpu")  # the student base alone
    assert no_experts.operations == []
    assert no_experts.generate(requests("extraction"))[0].token_ids == bare_ids
    with pytest.raises(KeyError):
        no_experts.use("extraction")


@pytest.mark.timeout(120)
def test_lora_export_reloads_as_lora_and_matches_the_delora_expert(tiny_model_dir, experts_out, tmp_path):
    import shutil

    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    from memlora.student.export import export_lora

    out = tmp_path / "out"
    shutil.copytree(experts_out, out)
    # What each exported expert must be sent travels with it (a multi-LoRA server passes prompts through).
    (out / "adapters" / "update" / "training.json").write_text(json.dumps({"operation": "update", "prompt": "minimal"}))
    (out / "adapters" / "generation" / "training.json").write_text(json.dumps({"operation": "generation",
                                                                               "prompt": "minimal"}))
    (out / "adapters" / "generation" / "client_template.json").write_text('{"operation": "generation"}')
    update_manifest(out)
    written = export_lora(out, tiny_model_dir)
    assert set(written) == set(OPERATIONS)
    prompts = {op: json.loads((written[op] / "prompt.json").read_text()) for op in OPERATIONS}
    assert prompts["extraction"]["reads"] == "teacher" and prompts["extraction"]["system"] is None  # no record
    assert prompts["update"]["reads"] == "minimal" and prompts["update"]["system"] == STUDENT_SYSTEM["update"]
    assert prompts["generation"]["reads"] == "reduced"
    assert (written["generation"] / "client_template.json").read_text() == '{"operation": "generation"}'
    for op in ("extraction", "generation"):
        folder = out / "export" / "lora" / op
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
        lora = PeftModel.from_pretrained(fresh(tiny_model_dir)[0], str(folder), use_safetensors=True)
        assert isinstance(lora.base_model, LoraModel)
        delora = PeftModel.from_pretrained(fresh(tiny_model_dir)[0], str(out / "adapters" / op))
        tok = fresh(tiny_model_dir)[1]
        expected, got = logits_of(delora, tok), logits_of(lora, tok)
        base = logits_of(fresh(tiny_model_dir)[0], tok)
        # DeLoRA's update has rank r, so the rank-r LoRA is the same update up to float error.
        assert (got - expected).abs().max() < 1e-3 * (expected - base).abs().max()
        # Readable by a server running as another user, like any normally written file.
        import os
        import stat

        umask = os.umask(0o022)
        os.umask(umask)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
        assert stat.S_IMODE((folder / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~umask

    # A base inside OUT is recorded relative to OUT, so a copied OUT does not point back at this machine.
    shutil.copytree(tiny_model_dir, out / "student" / "base")
    export_lora(out)
    config = json.loads((out / "export" / "lora" / "update" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "student/base"


@pytest.mark.timeout(120)
def test_a_lora_expert_exports_through_peft_conversion(tiny_model_dir, tmp_path):
    """The closed form is DeLoRA's; an expert of another method (`student.expert.method: lora`) still exports."""
    from peft import PeftModel

    from memlora.student.export import export_lora

    out = tmp_path / "out"
    model, tok = fresh(tiny_model_dir)
    torch.manual_seed(0)
    peft_model = attach_expert(model, ExpertConfig(method="lora", r=4), name="default")
    perturb(peft_model, seed=3)
    peft_model.save_pretrained(str(out / "adapters" / "extraction"), safe_serialization=True)
    update_manifest(out)
    folder = export_lora(out, tiny_model_dir)["extraction"]
    lora = PeftModel.from_pretrained(fresh(tiny_model_dir)[0], str(folder), use_safetensors=True)
    expected = logits_of(PeftModel.from_pretrained(fresh(tiny_model_dir)[0], str(out / "adapters" / "extraction")), tok)
    base = logits_of(fresh(tiny_model_dir)[0], tok)
    assert (expected - base).abs().max() > 1e-3  # the expert changes the model, and the export keeps that
    assert (logits_of(lora, tok) - expected).abs().max() < 1e-3 * (expected - base).abs().max()


@pytest.mark.timeout(60)
def test_a_changed_or_unrecorded_adapter_is_not_loaded(tiny_model_dir, experts_out, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(experts_out, out)
    weights = out / "adapters" / "update" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(UntrustedArtifact, match=r"adapters/update/adapter_model\.safetensors: sha256 .* differs"):
        ExpertBackend.from_out(tiny_model_dir, out, device="cpu")

    update_manifest(out)  # recorded again: loads
    assert ExpertBackend.from_out(tiny_model_dir, out, device="cpu").operations == list(OPERATIONS)

    (out / "manifest.json").unlink()  # nothing recorded: nothing loaded
    with pytest.raises(UntrustedArtifact, match="not recorded in"):
        ExpertBackend.from_out(tiny_model_dir, out, device="cpu")


@pytest.mark.timeout(120)
def test_experts_read_the_minimal_prompt_and_the_bare_base_the_teachers(tiny_model_dir, experts_out):
    """student.prompt: minimal: an operation with an expert is sent the student template (one instruction line
    and the input); the bare base, and the same backend in bare mode, keep the teacher's few-shot prompt."""
    from memlora.memory.prompts import TEMPLATES, student_messages

    minimal = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu", prompt="minimal")
    teacher_prompt = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu")
    reqs = [GenerationRequest("extraction", TEMPLATES["extraction"].messages(
        "Conversation on 8 May 2023:\nAnn: I adopted a cat named Tom."), 6)]
    short, full = minimal.generate(reqs)[0], teacher_prompt.generate(reqs)[0]
    assert short.prompt_tokens < 0.5 * full.prompt_tokens
    rewritten = [GenerationRequest(r.operation, student_messages(r.operation, r.messages), r.max_new_tokens, r.schema)
                 for r in reqs]
    assert teacher_prompt.generate(rewritten)[0].token_ids == short.token_ids  # the very same input
    with minimal.bare():
        assert minimal.generate(reqs)[0].prompt_tokens == full.prompt_tokens


# Per scheme: the mean and worst logit error allowed, as shares of float32's logits' standard deviation, and the
# least share of positions with float32's top token (the docstring below says where they come from).
TOLERANCE = {"int8": (0.04, 0.30, 0.8), "int8_weight": (0.04, 0.30, 0.8), "int4_weight": (0.20, 1.20, 0.3)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme, merge, alpha, keep", [
    ("int8", False, 0.0, ()), ("int8", True, 0.0, ()), ("int8", True, 0.5, ()),
    ("int8", True, 0.5, ("down_proj", "lm_head")), ("int8_weight", False, 0.0, ()), ("int8_weight", True, 0.0, ()),
    ("int4_weight", False, 0.0, ())],
    ids=["beside", "merged", "merged-smoothed", "merged-smoothed-keep", "weight-only-beside", "weight-only-merged",
         "int4-beside"])
def test_an_int8_base_stays_close_to_float32_and_switching_experts_on_it_is_exact(tiny_model_dir, experts_out, scheme,
                                                                                    merge, alpha, keep):
    """`student.quantize: int8`: the base's linears int8 (torch's dynamic quantization), the experts float32 beside
    them (merge off), or one int8 copy of each adapted layer per expert, merged before quantizing (merge on).
    `int8_weight`: the same int8 weights, the activations multiplied in bfloat16 instead of rounded to int8 (a
    relative rounding of at most 2^-9, under int8's), so the same bounds hold with room to spare.

    Tolerance: an int8 weight per output channel is off by at most half a step (max|w_row| / 254), and each call's
    activations are quantized per tensor the same way, about 0.4 % of their largest value; over this model's few
    layers the logits move by a small fraction of their spread. We allow, against the float32 logits' standard
    deviation, 4 % on average and 30 % at the worst of the vocabulary x positions entries (measured here: about
    2 % and 12-15 % beside, 2-3 % and 15-23 % merged, whose weights, the expert's update merged in, round over a
    wider range); the same greedy token wherever float32's top token leads the next by more than the errors could
    close, and at 80 % of positions overall (this random model's logits are nearly flat, so near-ties flip).

    `int4_weight`: 16 levels per group of 64 inputs, a step about ten times int8's here (this model's rows are one
    group each): measured 8-13 % on average and 59-82 % at the worst, float32's top token at 36-77 % of these
    nearly flat positions; allowed 20 %, 120 % and 30 %, and the top token still may not flip where it leads
    clearly. What int4 keeps of the real student's answers is measured on its validation calls
    (`bench/int8_logits.py`, `bench/int8_designs.py`), not here."""
    plain = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu")
    quantized = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu", merge=merge, quantize=scheme,
                                       smoothing_alpha=alpha, keep_float32=keep)
    assert quantized.quantized == scheme and quantized.merge == merge
    from memlora.llm.quantize import BARE, BesideLinear, SwitchedLinear, is_quantized

    adapters = [p for n, p in quantized.model.named_parameters() if "delora_" in n]
    if merge:  # every adapted layer not kept float32 is its int8 variants, with no adapter or float32 copy left
        switched = [m for m in quantized.model.modules() if isinstance(m, SwitchedLinear)]
        assert switched and all(set(m.variants) == {BARE, *(f"expert_{op}" for op in OPERATIONS)} for m in switched)
        assert all(is_quantized(v) for m in switched for v in m.variants.values())
        # a kept layer is one float32 base shared by every expert, each expert's adapter beside it
        kept = {n.rpartition(".")[2] for n, m in quantized.model.named_modules() if m in quantized._tuner_layers}
        assert kept == set(keep) - {"lm_head"}
        assert all(type(m.get_base_layer()) is torch.nn.Linear for m in quantized._tuner_layers)
        assert all(set(n.split(".")) & set(keep) for n in (n for n, _ in quantized.model.named_parameters())
                   if "delora_" in n)  # adapters left only beside the kept layers
        float32 = {n.rpartition(".")[2] for n, v in quantized.model.named_modules()
                   if type(v) is torch.nn.Linear and ".variants." not in n}
        assert {n for n in float32 if n != "base_layer"} == ({"lm_head"} & set(keep))  # the tied output head
    else:  # each expert folded into a float32 low-rank pair beside the quantized base, no peft layer left
        beside = [m for m in quantized.model.modules() if isinstance(m, BesideLinear)]
        assert quantized.folded and beside and not adapters and not quantized._tuner_layers
        assert all(is_quantized(m.base) and set(m.index) == {f"expert_{op}" for op in OPERATIONS} for m in beside)
        assert all(b.dtype == torch.float32 for m in beside for b in m.buffers(recurse=False))
    if not keep:
        assert not any(type(m) is torch.nn.Linear for m in quantized.model.modules())  # the output head too
    first = {}
    for op in OPERATIONS:
        plain.use(op)
        quantized.use(op)
        want, got = logits_of(plain.model, plain.tokenizer), logits_of(quantized.model, quantized.tokenizer)
        error = (got - want).abs()
        mean, worst, same = TOLERANCE[scheme]
        assert error.mean() < mean * want.std() and error.max() < worst * want.std(), (op, error.max(), want.std())
        top2, top = want.topk(2, dim=-1)
        # the top token cannot flip where it leads by more than its own error plus the position's largest
        clear = (top2[..., 0] - top2[..., 1]) > error.gather(-1, top[..., :1])[..., 0] + error.max(dim=-1).values
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear]), op
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= same, op
        first[op] = got
    for op in ["update", "extraction", "generation", "extraction"]:  # back and forth: bit for bit the same
        quantized.use(op)
        assert torch.equal(logits_of(quantized.model, quantized.tokenizer), first[op]), op
        assert quantized.generate(requests(op))[0].token_ids == quantized.generate(requests(op))[0].token_ids
    with quantized.bare():
        bare = logits_of(quantized.model, quantized.tokenizer)
    quantized.use("update")
    assert torch.equal(logits_of(quantized.model, quantized.tokenizer), first["update"])
    with quantized.bare():
        assert torch.equal(logits_of(quantized.model, quantized.tokenizer), bare)


def products_match_the_rounded_weight(quantized, dequantized, bias):
    """On a decode step's few rows (the packed kernel) and a prefill's many (a bfloat16 GEMM), in the input's
    dtype and shape: the rounded weight's product, within 1 % of the largest output."""
    import torch.nn.functional as F

    from memlora.llm.quantize import PACKED_ROWS

    inputs = quantized.in_features
    for shape in ((1, inputs), (PACKED_ROWS, inputs), (PACKED_ROWS + 1, inputs), (2, 100, inputs)):  # 1-200 rows
        x = torch.randn(*shape)
        with torch.no_grad():
            want, got = F.linear(x, dequantized, bias), quantized(x)
        assert got.dtype == torch.float32 and got.shape == (*shape[:-1], quantized.out_features)
        assert (got - want).abs().max() < 0.01 * want.abs().max(), shape


@pytest.mark.timeout(60)
def test_a_weight_only_int8_linear_is_its_rounded_weight_times_a_bfloat16_input_on_both_paths():
    """`Int8WeightLinear`: every weight within half an int8 step of float32's (per output channel), and the output
    the dequantized weight's product on the input, whether a decode step's few rows (int8 kernel) or a prefill's
    many (bfloat16 GEMM), in the input's dtype and shape. Tolerance 1 % of the largest output: inputs and scales
    are rounded to bfloat16 (8 significant bits, 0.4 % each), over sums of 64 terms of mixed signs."""
    from memlora.llm.quantize import Int8WeightLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    quantized = Int8WeightLinear.from_float(linear.weight, linear.bias)
    scales = quantized.scales.float()
    dequantized = quantized.weight.float() * scales[:, None]
    assert quantized.weight.dtype == torch.int8
    assert ((dequantized - linear.weight).abs() <= scales[:, None] * 0.51).all()
    products_match_the_rounded_weight(quantized, dequantized, linear.bias)


def test_a_weight_rounded_in_chunks_of_rows_is_the_weight_rounded_whole(monkeypatch):
    """The output head is rounded a chunk of rows at a time (its float32 temporaries set the peak of loading);
    scales and weights are per row, so the result is the same to the bit."""
    from memlora.llm import quantize

    weight = torch.randn(50, 64)
    whole = quantize.Int8WeightLinear.from_float(weight, None)
    monkeypatch.setattr(quantize, "CHUNK_ROWS", 7)
    chunked = quantize.Int8WeightLinear.from_float(weight, None)
    assert torch.equal(chunked.weight, whole.weight) and torch.equal(chunked.scales, whole.scales)


@pytest.mark.timeout(60)
def test_a_weight_only_int4_linear_is_its_rounded_weight_times_a_bfloat16_input_on_both_paths():
    """`Int4WeightLinear`: every weight within about half a 4-bit step of float32's (per group of `INT4_GROUP`
    inputs; the scale and zero are rounded to bfloat16 first, hence 0.55), the packing undone exactly (the kernel's
    product equals the unpacked weight's), and the output that weight's product on the input on both paths; a
    weight already on a 16-level grid per group (a Q4_1 model's, as shipped) comes back nearly exactly. A layer
    whose shape the packing cannot take, and the output head, are int8 weight-only instead."""
    from memlora.llm.quantize import INT4, INT4_GROUP, Int4WeightLinear, Int8WeightLinear, _quantized

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 192)
    quantized = Int4WeightLinear.from_float(linear.weight, linear.bias)
    dequantized = quantized.dequantized().float()
    step = quantized.scales_zeros[..., 0].float().transpose(0, 1).repeat_interleave(INT4_GROUP, dim=1)
    assert quantized.packed.dtype == torch.uint8 and quantized.packed.numel() == 128 * 192 // 2
    assert ((dequantized - linear.weight).abs() <= step * 0.55).all()
    products_match_the_rounded_weight(quantized, dequantized, linear.bias)
    # Q4_1-like: 16 levels from each group's minimum, step 0.01. They come back within bfloat16's rounding of
    # each weight (2^-8 of it) plus 4 % of a step (the scale and zero in bfloat16; measured up to 3 %), where
    # weights off any grid are off by half a step at worst (above).
    levels = torch.randint(0, 16, (192, 128)).float()
    levels[:, ::INT4_GROUP], levels[:, 1::INT4_GROUP] = 0, 15  # each group spans its whole range, as Q4_1 sets it
    grid = levels * 0.01 - 0.07
    back = Int4WeightLinear.from_float(grid, None).dequantized().float()
    assert ((back - grid).abs() <= grid.abs() * 2**-8 + 0.04 * 0.01).all()
    assert isinstance(_quantized(INT4, torch.randn(32, 128), None), Int8WeightLinear)  # 32 rows: not a block
    assert isinstance(_quantized(INT4, torch.randn(64, 80), None), Int8WeightLinear)  # 80 inputs: not a group
    assert isinstance(_quantized(INT4, torch.randn(64, 128), None, "lm_head"), Int8WeightLinear)  # the head


def q8_0_grid(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """float32 values as GGUF's Q8_0 stores them: int8 in blocks of 32 (each block's largest at 127 steps) times
    the block's float16 scale."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-126, 127, (rows, dim // 32, 32), generator=gen)
    q[..., 0] = 127 * torch.where(torch.rand(rows, dim // 32, generator=gen) < 0.5, -1, 1)
    q[0] = 0  # an all-zero row (padding tokens often are)
    scale = (torch.rand(rows, dim // 32, 1, generator=gen) * 0.01).half().float()
    return (q.float() * scale).reshape(rows, dim)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme", ["int8_weight", "int4_weight"])
def test_a_q8_0_embedding_goes_to_block_int8_exactly_and_any_other_stays_float32(tiny_model_dir, scheme):
    from memlora.llm.quantize import BlockInt8Embedding, quantize_base

    model, _ = fresh(tiny_model_dir)
    rows, dim = model.get_input_embeddings().weight.shape
    grid = q8_0_grid(rows, dim)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(grid)  # tied: the output head reads it too, until quantized
    quantize_base(model, scheme)
    blocks = model.get_input_embeddings()
    assert isinstance(blocks, BlockInt8Embedding) and blocks.values.dtype == torch.int8
    ids = torch.arange(rows)[None]
    assert torch.equal(blocks(ids), grid[ids])  # bit for bit, every row

    off_grid, _ = fresh(tiny_model_dir)  # random float32 values: rounding them would change the model
    quantize_base(off_grid, scheme)
    assert type(off_grid.get_input_embeddings()) is torch.nn.Embedding

    tied_head_kept, _ = fresh(tiny_model_dir)
    with torch.no_grad():
        tied_head_kept.get_input_embeddings().weight.copy_(grid)
    quantize_base(tied_head_kept, scheme, keep=("lm_head",))  # the float32 head still reads the tied weight
    assert type(tied_head_kept.get_input_embeddings()) is torch.nn.Embedding


@pytest.mark.timeout(120)
def test_int4_experts_stay_beside_the_base_even_when_merging_is_asked(tiny_model_dir, experts_out):
    """A merged weight leaves the 16-level grid an int4 model shipped on, and rounding it again loses the expert
    (measured on the real student: no answer identical to float32's), so `int4_weight` keeps the experts float32
    beside an int4 base whatever `merge_experts` says, and switches them as peft does; `quantize_merged` itself
    refuses int4."""
    from memlora.llm.quantize import BesideLinear, Int4WeightLinear, SwitchedLinear, quantize_merged

    asked = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu", merge=True, quantize="int4_weight")
    beside = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu", merge=False, quantize="int4_weight")
    assert not asked.merge and not any(isinstance(m, SwitchedLinear) for m in asked.model.modules())
    assert any(isinstance(m, BesideLinear) and isinstance(m.base, Int4WeightLinear) for m in asked.model.modules())
    for op in ["update", "extraction", "generation"]:
        asked.use(op)
        beside.use(op)
        assert torch.equal(logits_of(asked.model, asked.tokenizer), logits_of(beside.model, beside.tokenizer)), op
    model, _ = fresh(tiny_model_dir)
    with pytest.raises(ValueError, match="keep the experts beside"):
        quantize_merged(attach_expert(model, ExpertConfig(r=4), name="expert_update"), ["expert_update"],
                        "int4_weight")


@pytest.mark.timeout(120)
def test_an_expert_folded_into_a_low_rank_pair_computes_what_peft_computes(tiny_model_dir):
    """`fold_beside`: DeLoRA's update (its norms and scales, recomputed by peft at every call) folded once into
    (x A^T) B^T gives the logits peft's own layers give, to float32 rounding; the bare state gives the base's."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from memlora.llm.quantize import BARE, fold_beside

    model, tokenizer = fresh(tiny_model_dir)
    peft_model = attach_expert(model, ExpertConfig(r=4), name="expert_update")
    perturb(peft_model, seed=3)  # an update far from zero, as a trained expert's
    peft_model.eval()
    want = logits_of(peft_model, tokenizer)
    with peft_model.disable_adapter():
        bare = logits_of(peft_model, tokenizer)
    assert (want - bare).abs().max() > 0.01 * bare.std()  # the expert changes something
    state = fold_beside(peft_model, ["expert_update"])
    assert state is not None and not any(isinstance(m, BaseTunerLayer) for m in peft_model.modules())
    state["active"] = "expert_update"
    assert (logits_of(peft_model, tokenizer) - want).abs().max() < 1e-4 * want.abs().max()
    state["active"] = BARE
    assert (logits_of(peft_model, tokenizer) - bare).abs().max() < 1e-5 * bare.abs().max()


def with_outlier_channels(model, factor: float = 60.0):
    """What real LLMs have and a tiny random one lacks: a few hidden channels far larger than the rest (the
    embedded default's student: down_proj inputs up to ~30,000x their mean), here through the norms' weights."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] *= factor
            layer.post_attention_layernorm.weight[7] *= factor


@pytest.mark.timeout(120)
def test_smoothing_keeps_the_float32_function_and_shrinks_outlier_channels(tiny_model_dir):
    """SmoothQuant's scales only move a channel's size from the activation into the weight: applied to a float32
    model they change no logit beyond float32 rounding, and the channel that carried the outlier gets the largest
    scale of its group."""
    from memlora.llm.quantize import smooth_in_place, smoothing
    from memlora.llm.calibration import calibration_ids

    model, tokenizer = fresh(tiny_model_dir)
    with_outlier_channels(model)
    want = logits_of(model, tokenizer)
    smooth = smoothing(model, calibration_ids(tokenizer), alpha=0.7)
    assert set(smooth.norms) == {f"model.layers.{i}.{n}" for i in range(3)
                                 for n in ("input_layernorm", "post_attention_layernorm")}
    assert set(smooth.rows) == {f"model.layers.{i}.mlp.up_proj" for i in range(3)}
    assert len(smooth.columns) == 3 * 6  # q, k, v, gate, up, down of each layer
    assert int(smooth.columns["model.layers.0.self_attn.q_proj"].argmax()) == 3
    assert int(smooth.columns["model.layers.0.mlp.gate_proj"].argmax()) == 7
    smooth_in_place(model, smooth)
    got = logits_of(model, tokenizer)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    with pytest.raises(ValueError, match="alpha"):
        smoothing(model, calibration_ids(tokenizer), alpha=1.0)


@pytest.mark.timeout(180)
def test_smoothing_brings_merged_int8_back_to_float32_where_channels_are_outliers_and_weight_only_needs_none(
        tiny_model_dir):
    """The merged int8 design on a base with outlier channels: with per-tensor activation rounding, an outlier
    channel sets every call's int8 step and the other channels lose their precision; smoothed first, the logits'
    error against the float32 model with the same expert merged falls (measured here: by about half)."""
    import copy

    from memlora.llm.quantize import quantize_merged, smoothing
    from memlora.llm.calibration import calibration_ids

    model, tokenizer = fresh(tiny_model_dir)
    with_outlier_channels(model)
    torch.manual_seed(0)
    peft_model = attach_expert(model, ExpertConfig(r=4), name="expert_update")
    perturb(peft_model, seed=3)
    peft_model.eval()
    want = logits_of(peft_model, tokenizer)  # float32, the expert beside: the function merging must keep
    errors = {}
    for scheme, alpha in (("int8", 0.0), ("int8", 0.5), ("int8_weight", 0.0)):
        quantized = copy.deepcopy(peft_model)
        smooth = smoothing(quantized, calibration_ids(tokenizer), alpha) if alpha else None
        state = quantize_merged(quantized, ["expert_update"], scheme, smooth)
        state["active"] = "expert_update"
        errors[scheme, alpha] = float((logits_of(quantized, tokenizer) - want).abs().mean())
    assert errors["int8", 0.5] < 0.7 * errors["int8", 0.0], errors
    # weight-only int8 rounds no activation, so the outlier channels cost it nothing: unsmoothed, it is closer to
    # float32 than smoothed dynamic int8 (measured here: 0.0029 against 0.0137, unsmoothed dynamic 0.0271)
    assert errors["int8_weight", 0.0] < errors["int8", 0.5], errors


@pytest.mark.timeout(120)
def test_smoothing_applies_where_every_linear_takes_its_scales(tiny_model_dir, experts_out):
    """Smoothing rewrites the weights: the bare student and merged experts take it; experts beside their layers
    would read the scaled input, so there it is not applied (and the probe says so)."""
    plain = ExpertBackend(tiny_model_dir, None, device="cpu")
    bare = ExpertBackend(tiny_model_dir, None, device="cpu", quantize="int8", smoothing_alpha=0.5)
    beside = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu", merge=False, quantize="int8",
                                    smoothing_alpha=0.5)
    assert (bare.smoothing_alpha, beside.smoothing_alpha) == (0.5, 0.0)
    # weight-only int8 rounds no activation: smoothing would only widen the weights' ranges, so it is not applied
    assert ExpertBackend(tiny_model_dir, None, device="cpu", quantize="int8_weight",
                         smoothing_alpha=0.5).smoothing_alpha == 0.0
    want, got = logits_of(plain.model, plain.tokenizer), logits_of(bare.model, bare.tokenizer)
    assert (got - want).abs().mean() < 0.04 * want.std()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme", ["none", "int8_weight"])
def test_rows_of_different_experts_share_a_running_batch_and_each_decodes_as_alone(tiny_model_dir, experts_out,
                                                                                  scheme):
    """Folded beside the base, a running batch holds rows of every expert (serve-experts' continuous batching):
    the base's product is shared, each pair runs on its own rows, and every row decodes the tokens it decodes
    alone on its expert. Merged experts switch per batch and keep whole batches."""
    from concurrent.futures import Future

    from memlora.llm.continuous import ContinuousDecoder, continuous_decoder

    backend = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu", batch_size=4, quantize=scheme)
    questions = ["Where does Alice live?", "What does Bob like?", "When did Carol move?", "Who is Dan?"]
    calls = [GenerationRequest(operation=op, messages=[PROMPT[0], {"role": "user", "content": q}], max_new_tokens=8)
             for op, q in zip(["extraction", "update", "generation", "extraction"], questions)]
    alone = [backend.generate([call])[0].token_ids for call in calls]
    with backend.bare():
        bare = [backend.generate([call])[0].token_ids for call in calls]
    routed = []
    real_route = backend._route
    backend._route = lambda specs: routed.append({s.adapter for s in specs}) or real_route(specs)
    decoder = continuous_decoder(backend, 4)
    assert isinstance(decoder, ContinuousDecoder)
    futures = [Future() for _ in calls]
    decoder.add([(calls[0], futures[0])])
    decoder.step()
    decoder.add([(calls[1], futures[1]), (calls[2], futures[2])])  # two operations: two prefills, one batch
    decoder.step()
    decoder.add([(calls[3], futures[3])])
    while len(decoder):
        decoder.step()
    assert [f.result().token_ids for f in futures] == alone
    assert max(len(names) for names in routed) == 3  # steps ran three experts' rows together
    assert alone != bare  # the experts do change what is decoded
    backend.use("update")  # a whole batch afterwards: no row is routed apart any more
    assert backend._switch["rows"] is None and backend.generate([calls[1]])[0].token_ids == alone[1]
    merged = ExpertBackend.from_out(tiny_model_dir, experts_out, device="cpu", merge=True)
    assert not merged.mixes_operations() and continuous_decoder(merged, 4) is None
