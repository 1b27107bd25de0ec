"""Quantized weights give back their float32 pages (llm/file_pages.py): a model read from a memory-mapped
safetensors file keeps every page it touched resident until the pages are released."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memlora.llm.file_pages import model_tensors, release_file_pages
from memlora.llm.hf_backend import load_causal_lm
from memlora.llm.quantize import quantize_base

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux memory maps only")


def resident_kb(path: Path) -> int:
    """This process's resident pages of the mappings of `path` (file-backed and copy-on-write)."""
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            current = head[5] if len(head) > 5 else None
        elif head[0] == "Rss:" and current == str(path):
            total += int(head[1])
    return total


def linears(model) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if type(m) is torch.nn.Linear and m is not model.lm_head]


def loaded(folder: Path):
    """The tiny model as a backend loads it (float32 weights read from its mapped safetensors file), a prompt,
    and the model's logits on it."""
    model, tokenizer, _ = load_causal_lm(str(folder), dtype="float32", device="cpu")
    ids = torch.tensor([tokenizer("Ann adopted a cat named Tom.")["input_ids"]])
    with torch.no_grad():
        return model, ids, model(input_ids=ids).logits


@pytest.mark.timeout(120)
def test_pages_of_weights_no_longer_read_are_released_and_live_or_anonymous_ones_never(tiny_model_dir):
    model, ids, before = loaded(tiny_model_dir)
    weights = linears(model)
    assert release_file_pages(weights, model_tensors(model)) == 0  # the model still reads them: kept
    released = release_file_pages(weights, live=[])
    assert released >= 4096 * len(weights) // 2  # a 64 x 128 float32 weight spans 8 pages
    with torch.no_grad():  # read again (only a test would): the pages come back from the unchanged file
        assert torch.equal(model(input_ids=ids).logits, before)
    anonymous = torch.randn(100_000)
    copy = anonymous.clone()
    assert release_file_pages([anonymous], live=[]) == 0 and torch.equal(anonymous, copy)


@pytest.mark.timeout(120)
def test_int8_quantization_gives_back_the_float32_pages_and_keeps_the_tied_embedding(tiny_model_dir):
    model, ids, before = loaded(tiny_model_dir)
    embedding = model.get_input_embeddings().weight.detach().clone()
    file = (Path(tiny_model_dir) / "model.safetensors").resolve()
    resident = resident_kb(file)
    linear_kb = sum(w.numel() * 4 for w in linears(model)) // 1024
    assert quantize_base(model, "int8") > 0
    assert resident_kb(file) <= resident - linear_kb // 2  # the quantized layers' float32 pages are gone
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # tied to the (quantized) output head
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.corrcoef(torch.stack([before.flatten(), after.flatten()]))[0, 1] > 0.95
