"""The bundled teacher's GGUF file is converted to safetensors once and loaded from there: the same weights,
the same tokenizer, the same outputs as loading the GGUF itself."""

import json

import pytest
import torch

from tests.conftest import TEACHER_REF


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_converted_teacher_equals_the_gguf_it_came_from(monkeypatch):
    from memlora.data.io import sha256_file
    from memlora.llm.gguf_cache import MARKER, converted
    from memlora.llm.hf_backend import load_causal_lm
    from memlora.models import resolve

    ref = resolve(TEACHER_REF)
    folder = converted(ref)
    marker = json.loads((folder / MARKER).read_text())
    assert marker["sha256"] == sha256_file(f"{ref.path}/{ref.gguf_file}")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", MARKER}
    assert converted(ref) == folder and (folder / MARKER).stat().st_mtime == (folder / MARKER).stat().st_mtime

    cached, cached_tok, cached_id = load_causal_lm(TEACHER_REF, device="cpu")
    monkeypatch.setenv("MEMLORA_GGUF_CACHE", "0")
    direct, direct_tok, direct_id = load_causal_lm(TEACHER_REF, device="cpu")
    assert cached_id == direct_id == TEACHER_REF  # rows name the packaged model, not the cache folder
    direct_state = direct.state_dict()
    assert all(torch.equal(t, direct_state[k]) for k, t in cached.state_dict().items())
    messages = [{"role": "system", "content": "Extract facts."}, {"role": "user", "content": "Ann: I adopted Tom."}]
    text = direct_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert cached_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert cached_tok(text)["input_ids"] == direct_tok(text)["input_ids"]
    assert cached_tok.eos_token_id == direct_tok.eos_token_id


@pytest.mark.timeout(30)
def test_a_changed_or_half_written_conversion_is_not_used(tmp_path):
    from memlora.llm.gguf_cache import MARKER, _complete

    folder = tmp_path / "model-0123"
    folder.mkdir()
    assert not _complete(folder, "ab")  # no marker: never finished
    (folder / MARKER).write_text(json.dumps({"sha256": "cd"}))
    assert not _complete(folder, "ab") and _complete(folder, "cd")


@pytest.mark.timeout(120)
def test_an_unwritable_cache_falls_back_to_the_gguf_itself(tmp_path, monkeypatch):
    from memlora.llm.hf_backend import load_causal_lm

    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("MEMLORA_CACHE_DIR", str(blocked))
    model, tokenizer, model_id = load_causal_lm(TEACHER_REF, device="cpu")
    assert model_id == TEACHER_REF and tokenizer("Ann")["input_ids"]

