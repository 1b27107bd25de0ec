"""The three expert methods (ETHER, DeLoRA, LoRA) on one code path, and the weight deviation each makes."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from memlora.config import ExpertConfig
from memlora.manifest import update_manifest
from memlora.memory.llm import GenerationRequest
from memlora.student.deviation import weight_delta, weight_deviation
from memlora.student.experts import ExpertBackend, attach_expert
from tests.test_student_experts import fresh, logits_of

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def train_steps(peft_model, tokenizer, steps: int, lr: float, check=None) -> None:
    """A few AdamW steps of next-token loss on a fixed sentence (enough to move any adapter)."""
    ids = tokenizer("Alice moved to Paris and Bob adopted a dog named Rex.", return_tensors="pt")["input_ids"]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if check is not None:
            check(peft_model)
    peft_model.eval()


def tuner_layers(peft_model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.timeout(120)
def test_fresh_additive_experts_do_not_deviate_and_a_step_moves_them(tiny_model_dir):
    for method in ("delora", "lora"):
        model, tok = fresh(tiny_model_dir)
        torch.manual_seed(0)
        expert = attach_expert(model, ExpertConfig(method=method, r=4, target_modules=TARGETS))
        before = weight_deviation(expert, "default")
        assert before["total"] == 0.0 and len(before["layers"]) == len(tuner_layers(expert)) == 3 * len(TARGETS)
        train_steps(expert, tok, 1, 1e-2)
        after = weight_deviation(expert, "default")
        assert after["total"] > 0 and after["total_relative"] > 0, method


@pytest.mark.timeout(120)
def test_an_ether_expert_deviates_from_the_start_and_stays_within_two_norms(tiny_model_dir):
    model, tok = fresh(tiny_model_dir)
    torch.manual_seed(0)
    expert = attach_expert(model, ExpertConfig(method="ether", target_modules=TARGETS))
    assert sum(p.numel() for p in expert.parameters() if p.requires_grad) == sum(
        layer.in_features for layer in tuner_layers(expert))  # one normal vector u per adapted weight
    start = weight_deviation(expert, "default")
    assert start["total"] > 0  # a reflection is never the identity

    def within_two_norms(m):
        for layer in tuner_layers(m):
            w = layer.get_base_layer().weight.float()
            assert weight_delta(layer, "default").norm() <= 2 * w.norm() * (1 + 1e-5)

    within_two_norms(expert)
    train_steps(expert, tok, 5, 5e-2, check=within_two_norms)


@pytest.mark.timeout(120)
def test_a_delora_update_stays_within_its_bound_after_training_at_a_large_learning_rate(tiny_model_dir):
    """||dW||_F <= |lambda| * max_j ||W[:, j]|| on every layer: each of DeLoRA's r rank-one terms has unit norm
    before peft scales the input columns by the base weight's column norms (w_norm), and lambda / r weighs r
    of them."""
    model, tok = fresh(tiny_model_dir)
    torch.manual_seed(0)
    expert = attach_expert(model, ExpertConfig(method="delora", r=4, delora_lambda=2.0, target_modules=TARGETS))
    from tests.student_fixtures import perturb

    perturb(expert, seed=1)
    train_steps(expert, tok, 10, 0.5)  # 250x the embedded default's rate
    for layer in tuner_layers(expert):
        bound = layer.delora_lambda["default"].abs().item() * layer.delora_w_norm["default"].max().item()
        assert weight_delta(layer, "default").norm().item() <= bound * (1 + 1e-4)
    assert weight_deviation(expert, "default")["total"] > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("r", [1, 3])
def test_reflecting_the_input_computes_what_peft_hra_computes_with_the_same_gradients(tiny_model_dir, r):
    from peft import HRAConfig, get_peft_model

    from memlora.student.householder import use_input_reflections

    model, tok = fresh(tiny_model_dir)
    torch.manual_seed(r)
    expert = get_peft_model(model, HRAConfig(r=r, apply_GS=False, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():  # peft starts paired reflections as the identity; make every one count
        for name, p in expert.named_parameters():
            if "hra_u" in name:
                p.copy_(torch.randn_like(p))
    ids = tok("Alice moved to Paris and Bob adopted a dog named Rex.", return_tensors="pt")["input_ids"]

    def loss_and_grads():
        expert.zero_grad()
        out = expert(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in expert.named_parameters() if p.requires_grad}

    logits, grads = loss_and_grads()
    assert use_input_reflections(expert) == len(tuner_layers(expert)) > 0
    fast_logits, fast_grads = loss_and_grads()
    assert torch.allclose(fast_logits, logits, atol=1e-5)
    assert grads.keys() == fast_grads.keys()
    assert all(torch.allclose(fast_grads[n], g, atol=1e-6, rtol=1e-4) for n, g in grads.items())
    with torch.no_grad(), expert.disable_adapter():  # disabled: the base layer alone, as peft does
        assert torch.allclose(expert(input_ids=ids).logits, fresh(tiny_model_dir)[0](input_ids=ids).logits, atol=1e-6)


@pytest.mark.timeout(180)
def test_ether_experts_save_reload_switch_and_export(tiny_model_dir, tmp_path):
    from peft.tuners.lora import LoraModel

    from memlora.student.export import ExportRefused, export_lora

    out = tmp_path / "out"
    tok = fresh(tiny_model_dir)[1]
    expected = {}
    for seed, op in enumerate(("extraction", "update")):
        model, _ = fresh(tiny_model_dir)
        torch.manual_seed(seed)
        expert = attach_expert(model, ExpertConfig(method="ether", target_modules=TARGETS))
        train_steps(expert, tok, 3, 5e-2)
        expected[op] = logits_of(expert, tok)
        expert.save_pretrained(str(out / "adapters" / op), safe_serialization=True)
        assert (out / "adapters" / op / "adapter_model.safetensors").is_file()
        reloaded = PeftModel.from_pretrained(fresh(tiny_model_dir)[0], str(out / "adapters" / op),
                                             use_safetensors=True)
        # peft's own forward (the weight rebuilt) vs ours (the input reflected): the same function
        assert torch.allclose(logits_of(reloaded, tok), expected[op], atol=1e-5)
    assert not torch.equal(expected["extraction"], expected["update"])
    assert json.loads((out / "adapters" / "extraction" / "adapter_config.json").read_text())["peft_type"] == "HRA"
    update_manifest(out)

    # One base, both experts, switched per batch: each operation runs on its own expert.
    backend = ExpertBackend.from_out(tiny_model_dir, out, device="cpu")
    assert backend.operations == ["extraction", "update"]
    messages = [{"role": "user", "content": "Alice moved to Paris."}]
    alone = {op: ExpertBackend(tiny_model_dir, {op: out / "adapters" / op}, device="cpu").generate(
        [GenerationRequest(op, messages, 6)])[0].token_ids for op in ("extraction", "update")}
    both = backend.generate([GenerationRequest("extraction", messages, 6), GenerationRequest("update", messages, 6)])
    assert [r.token_ids for r in both] == [alone["extraction"], alone["update"]] and backend.switches >= 1
    merged = ExpertBackend.from_out(tiny_model_dir, out, device="cpu", merge=True)  # W (I - 2uu^T) written in
    for op in ("update", "extraction", "update"):
        merged.use(op)
        assert torch.allclose(logits_of(merged.model, tok), expected[op], atol=1e-4)

    # ETHER's change is rank one, so it exports exactly as a rank-1 LoRA.
    written = export_lora(out, tiny_model_dir)
    lora = PeftModel.from_pretrained(fresh(tiny_model_dir)[0], str(written["extraction"]), use_safetensors=True)
    assert isinstance(lora.base_model, LoraModel)
    assert json.loads((written["extraction"] / "adapter_config.json").read_text())["r"] == 1
    base = logits_of(fresh(tiny_model_dir)[0], tok)
    got = logits_of(lora, tok)
    assert (got - expected["extraction"]).abs().max() < 1e-3 * (expected["extraction"] - base).abs().max()

    # What has no LoRA form here is refused, naming the method: HRA with more than one reflection.
    from peft import HRAConfig, get_peft_model

    two = get_peft_model(fresh(tiny_model_dir)[0], HRAConfig(r=2, target_modules=TARGETS, task_type="CAUSAL_LM"))
    two.save_pretrained(str(out / "adapters" / "generation"), safe_serialization=True)
    update_manifest(out)
    with pytest.raises(ExportRefused, match="r=2 is not ETHER"):
        export_lora(out, tiny_model_dir)

    # Experts of two methods cannot share one base in peft: said plainly, naming them.
    delora = attach_expert(fresh(tiny_model_dir)[0], ExpertConfig(method="delora", r=4, target_modules=TARGETS))
    delora.save_pretrained(str(tmp_path / "delora"), safe_serialization=True)
    with pytest.raises(ValueError, match="extraction HRA, update DELORA"):
        ExpertBackend(tiny_model_dir, {"extraction": out / "adapters" / "extraction", "update": tmp_path / "delora"},
                      device="cpu")


@pytest.mark.timeout(30)
def test_each_method_has_its_own_default_learning_rate():
    import yaml

    from memlora.config import DEFAULT_LEARNING_RATES, parse_config
    from tests.conftest import REPO

    raw = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    raw["distill"].pop("learning_rate")
    for method, rate in DEFAULT_LEARNING_RATES.items():
        raw["student"]["expert"]["method"] = method
        config = parse_config(raw)
        assert config.distill.learning_rate == rate
        assert parse_config(config.model_dump(mode="json", by_alias=True)).fingerprint() == config.fingerprint()
    raw["distill"]["learning_rate"] = 0.123
    assert parse_config(raw).distill.learning_rate == 0.123  # given: kept
