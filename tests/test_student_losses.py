"""Distillation losses against values computed by hand: top-k forward KL, generalised JSD, the CE fallback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memlora.student.losses import IGNORE, distillation_loss, topk_divergence

# One position, a 6-token vocabulary. The teacher stored its top-3: ids 5, 1, 0 (un-normalised log-probs: the
# rest of its mass is unknown). The student's logits over the whole vocabulary:
STUDENT = [1.0, 2.0, 0.5, -1.0, 0.0, 3.0]
TOP_IDS = [5, 1, 0]
TOP_LPS = [-0.2, -2.0, -3.0]


def by_hand() -> tuple[list[float], list[float]]:
    """p: the teacher's top-3 renormalised; q: the student's softmax over the same 3 ids."""
    st = sum(math.exp(v) for v in TOP_LPS)
    p = [math.exp(v) / st for v in TOP_LPS]
    sq = sum(math.exp(STUDENT[i]) for i in TOP_IDS)
    q = [math.exp(STUDENT[i]) / sq for i in TOP_IDS]
    return p, q


def tensors(k_pad: int = 0):
    ids = torch.tensor([TOP_IDS + [0] * k_pad])
    lps = torch.tensor([TOP_LPS + [float("-inf")] * k_pad])
    return torch.tensor([STUDENT]), ids, lps, torch.tensor([True])


@pytest.mark.timeout(30)
def test_forward_kl_equals_hand_computed_value():
    p, q = by_hand()
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert expected == pytest.approx(0.0562308, abs=1e-6)  # written out once, so a formula slip shows too
    got = topk_divergence(*tensors(), kind="forward_kl")
    assert float(got) == pytest.approx(expected, rel=1e-5)


@pytest.mark.timeout(30)
def test_generalised_jsd_equals_hand_computed_value():
    p, q = by_hand()
    beta = 0.5
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    expected = beta * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + (1 - beta) * sum(
        qi * math.log(qi / mi) for qi, mi in zip(q, m)
    )
    assert expected == pytest.approx(0.0148650, abs=1e-6)
    got = topk_divergence(*tensors(), kind="jsd", beta=beta)
    assert float(got) == pytest.approx(expected, rel=1e-5)


@pytest.mark.timeout(30)
def test_padding_candidates_at_minus_inf_are_ignored():
    """A step where the grammar left fewer than K candidates is padded with -inf: same value as without it."""
    p, q = by_hand()
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = topk_divergence(*tensors(k_pad=2), kind="forward_kl")
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert torch.isfinite(got)


@pytest.mark.timeout(30)
def test_zero_when_student_matches_teacher_on_the_top_k():
    logits = torch.tensor([[0.0, -2.0 + 7, 9.0, 9.0, 9.0, -0.2 + 7]])  # ids 5, 1 shifted by the same constant
    ids, lps = torch.tensor([[5, 1]]), torch.tensor([[-0.2, -2.0]])
    assert float(topk_divergence(logits, ids, lps, torch.tensor([True]))) == pytest.approx(0.0, abs=1e-6)


def batch(with_logprobs: bool):
    """Two rows, 4 positions, labels on the last two (the completion); teacher top-3 at those positions."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[IGNORE, IGNORE, 5, 1], [IGNORE, IGNORE, 0, 5]])
    ids = torch.zeros(2, 4, 3, dtype=torch.long)
    lps = torch.full((2, 4, 3), float("-inf"))
    mask = torch.zeros(2, 4, dtype=torch.bool)
    if with_logprobs:
        for row in range(2):
            for t in (2, 3):
                ids[row, t] = torch.tensor(TOP_IDS)
                lps[row, t] = torch.tensor(TOP_LPS)
                mask[row, t] = True
    return logits, labels, ids, lps, mask


@pytest.mark.timeout(30)
def test_weighted_sum_of_ce_and_kd():
    logits, labels, ids, lps, mask = batch(with_logprobs=True)
    w = 0.3
    loss, parts = distillation_loss(logits, labels, ids, lps, mask, kd_weight=w)
    # CE: logits at t-1 predict the label at t.
    ce = F.cross_entropy(logits[:, 1:3].reshape(-1, 6), labels[:, 2:4].reshape(-1))
    kd = topk_divergence(logits[:, 1:3].reshape(-1, 6), ids[:, 2:4].reshape(-1, 3), lps[:, 2:4].reshape(-1, 3),
                         torch.ones(4, dtype=torch.bool))
    assert float(loss) == pytest.approx(float((1 - w) * ce + w * kd), rel=1e-5)
    assert parts["ce"] == pytest.approx(float(ce), rel=1e-5) and parts["kd"] == pytest.approx(float(kd), rel=1e-5)


@pytest.mark.timeout(30)
def test_token_weights_give_the_weighted_mean_of_both_terms():
    """distill.targets.event_weight: a token weighted w counts w times in the CE and KD means; all ones is the
    unweighted loss."""
    logits, labels, ids, lps, mask = batch(with_logprobs=True)
    plain, _ = distillation_loss(logits, labels, ids, lps, mask, kd_weight=0.5)
    ones, _ = distillation_loss(logits, labels, ids, lps, mask, kd_weight=0.5, weights=torch.ones(2, 4))
    assert float(ones) == pytest.approx(float(plain), rel=1e-6)

    weights = torch.ones(2, 4)
    weights[1, 2] = 5.0  # row 1's first completion token
    loss, parts = distillation_loss(logits, labels, ids, lps, mask, kd_weight=0.5, weights=weights)
    ce_each = F.cross_entropy(logits[:, 1:3].reshape(-1, 6), labels[:, 2:4].reshape(-1), reduction="none")
    kd_each = torch.stack([topk_divergence(logits[r, t - 1 : t], ids[r, t : t + 1], lps[r, t : t + 1],
                                           torch.ones(1, dtype=torch.bool)) for r in range(2) for t in (2, 3)])
    w = torch.tensor([1.0, 1.0, 5.0, 1.0])
    assert parts["ce"] == pytest.approx(float((ce_each * w).sum() / w.sum()), rel=1e-5)
    assert parts["kd"] == pytest.approx(float((kd_each * w).sum() / w.sum()), rel=1e-5)
    assert float(loss) == pytest.approx(0.5 * parts["ce"] + 0.5 * parts["kd"], rel=1e-5)


@pytest.mark.timeout(60)
def test_update_examples_weigh_the_tokens_of_their_event(smol_tokenizer_dir):
    """The tokens that spell the event value (`event_token_indices`), and only those, get the collator's weight."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from memlora.data.schemas import TRACES
    from memlora.llm.confidence import event_token_indices
    from memlora.student.examples import build_examples
    from memlora.student.trainer import Collator

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    text = '{"memory": [{"id": "0", "text": "Alice has a dog", "event": "DELETE"}]}'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    positions = event_token_indices(tok, ids)
    assert positions and tok.decode([ids[i] for i in positions]).strip('"') == "DELETE"
    assert event_token_indices(tok, tok('{"facts": ["a"]}', add_special_tokens=False)["input_ids"]) == []

    row = {name: None for name in TRACES.names}
    row.update(trace_id="c:update:0", operation="update", conversation_id="c", session=1, step=0, parse_ok=True,
               messages=[{"role": "system", "content": "Decide."}, {"role": "user", "content": "New fact: x"}],
               raw_output=text, finish_reason="stop")
    data = build_examples(pa.Table.from_pylist([row], schema=TRACES), tok, 512, False)
    example = data.examples[0]
    assert example.decision == positions and example.label == "DELETE"
    assert "loss_weights" not in Collator(tok.pad_token_id, 1)([example])
    weights = Collator(tok.pad_token_id, 1, event_weight=4.0)([example])["loss_weights"][0]
    weighted = {i for i, w in enumerate(weights.tolist()) if w != 1.0}
    assert weighted == {example.prompt_len + j for j in positions} and float(weights.max()) == 4.0


@pytest.mark.timeout(30)
def test_rows_without_logprobs_fall_back_to_ce():
    logits, labels, ids, lps, mask = batch(with_logprobs=False)
    loss, parts = distillation_loss(logits, labels, ids, lps, mask, kd_weight=0.5)
    ce = F.cross_entropy(logits[:, 1:3].reshape(-1, 6), labels[:, 2:4].reshape(-1))
    assert float(loss) == pytest.approx(float(ce), rel=1e-6)
    assert parts["kd"] == 0.0


@pytest.mark.timeout(30)
def test_kd_gradient_reaches_only_the_top_k_logits():
    logits = torch.tensor([STUDENT], requires_grad=True)
    _, ids, lps, mask = tensors()
    topk_divergence(logits, ids, lps, mask).backward()
    outside = [i for i in range(6) if i not in TOP_IDS]
    assert torch.all(logits.grad[0, outside] == 0)
    assert torch.all(logits.grad[0, TOP_IDS] != 0)


@pytest.mark.timeout(60)
def test_logits_on_the_completion_window_give_the_full_loss_and_gradient(tiny_model_dir):
    """The trainer asks the model for logits from the position before the earliest label on; loss and
    gradients are those of the full logits (rows of different prompt lengths, right-padded)."""
    from transformers import AutoModelForCausalLM

    from memlora.student.losses import completion_window
    from memlora.student.trainer import forward_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    width, k = 12, 3
    ids_ = torch.randint(5, 200, (2, width))
    attention = torch.ones(2, width, dtype=torch.long)
    attention[1, 10:] = 0
    labels = torch.full((2, width), IGNORE)
    labels[0, 7:12] = ids_[0, 7:12]  # prompt of 7 tokens
    labels[1, 4:10] = ids_[1, 4:10]  # prompt of 4 tokens, then padding
    teacher_ids = torch.randint(5, 200, (2, width, k))
    teacher_lps = torch.randn(2, width, k).log_softmax(-1)
    inputs = {"input_ids": ids_, "attention_mask": attention, "labels": labels, "teacher_ids": teacher_ids,
              "teacher_logprobs": teacher_lps, "teacher_mask": labels != IGNORE}
    assert completion_window(labels) == width - 4 + 1

    loss, outputs = forward_loss(model, inputs, 0.5, "forward_kl", 0.5)
    assert outputs.logits.shape[1] == 9
    loss.backward()
    windowed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = model(input_ids=ids_, attention_mask=attention).logits
    reference, _ = distillation_loss(full, labels, teacher_ids, teacher_lps, labels != IGNORE, 0.5)
    reference.backward()
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    for got, want in zip(windowed, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert completion_window(torch.full((2, 5), IGNORE)) == 5  # no labels at all: every position


@pytest.mark.timeout(60)
def test_bfloat16_training_steps_keep_weights_gradients_and_loss_in_float32(tiny_model_dir, monkeypatch):
    """distill.cpu_precision: autocast multiplies in bfloat16 where the CPU has the units for it ("auto"), the
    loss over the logits is taken in float32 and the float32 weights get float32 gradients close to the
    float32 step's."""
    from transformers import AutoModelForCausalLM

    import memlora.student.trainer as trainer
    from memlora.config import DistillConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    ids_ = torch.randint(5, 200, (2, 10))
    labels = torch.full((2, 10), IGNORE)
    labels[:, 5:] = ids_[:, 5:]
    inputs = {"input_ids": ids_, "attention_mask": torch.ones(2, 10, dtype=torch.long), "labels": labels,
              "teacher_ids": torch.randint(5, 200, (2, 10, 3)),
              "teacher_logprobs": torch.randn(2, 10, 3).log_softmax(-1), "teacher_mask": labels != IGNORE}
    grads = {}
    for bf16 in (False, True):
        model.zero_grad()
        loss, outputs = trainer.forward_loss(model, inputs, 0.5, "forward_kl", 0.5, cpu_bf16=bf16)
        loss.backward()
        assert loss.dtype == torch.float32 and outputs.logits.dtype == (torch.bfloat16 if bf16 else torch.float32)
        grads[bf16] = (float(loss), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert grads[True][0] == pytest.approx(grads[False][0], rel=0.05) and grads[True][0] != grads[False][0]
    for got, want in zip(grads[True][1], grads[False][1]):
        assert got.dtype == torch.float32
        assert float((got - want).norm()) <= 0.1 * float(want.norm()) + 1e-6

    for units, setting, on_gpu, expected in [(True, "auto", False, True), (False, "auto", False, False),
                                             (False, "bfloat16", False, True), (True, "float32", False, False),
                                             (True, "auto", True, False)]:  # a GPU trains in bf16 its own way
        monkeypatch.setattr(trainer, "has_bf16_units", lambda: units)
        assert trainer.cpu_autocast(DistillConfig(cpu_precision=setting), on_gpu) is expected
