"""A local `transformers` causal LM as an LLM backend: batched, left-padded, greedy generation.

The student with its experts reuses this class (it only adds adapter switching per operation), so teacher and
student decode exactly the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from itertools import groupby

import torch

from memlora.config import LLMConfig
from memlora.memory.llm import GenerationRequest, GenerationResult
from memlora.models import resolve
from memlora.teacher.grammar import GrammarCache

log = logging.getLogger("memlora.teacher")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_causal_lm(ref: str, *, tokenizer_ref: str | None = None, dtype: str = "auto", device: str = "auto",
                   trust_remote_code: bool = False):
    """Load a model and its tokenizer from a hub id, a folder, a GGUF file or a package (safetensors only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    model_ref = resolve(ref)
    tok_ref = resolve(tokenizer_ref) if tokenizer_ref else model_ref
    tokenizer = AutoTokenizer.from_pretrained(
        tok_ref.path, trust_remote_code=trust_remote_code, **tok_ref.pretrained_kwargs()
    )
    kwargs = model_ref.pretrained_kwargs()
    if not model_ref.gguf_file:
        kwargs["use_safetensors"] = True  # never unpickle weights
    model = AutoModelForCausalLM.from_pretrained(
        model_ref.path, dtype=pick_dtype(dtype, device), trust_remote_code=trust_remote_code, **kwargs
    )
    model.to(device).eval()
    prepare_tokenizer(tokenizer)
    return model, tokenizer, model_ref.model_id


def prepare_tokenizer(tokenizer) -> None:
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left so generation continues each row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


class TransformersBackend:
    backend_name = "transformers"

    def __init__(self, model, tokenizer, model_id: str, batch_size: int = 8, logprobs_top_k: int = 0):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.batch_size, self.logprobs_top_k = batch_size, logprobs_top_k
        prepare_tokenizer(tokenizer)
        self.grammars = GrammarCache(tokenizer, model.config.vocab_size)
        self._lock = threading.Lock()  # one generate at a time on a shared model
        self.stop_ids = {i for i in _as_list(model.generation_config.eos_token_id) + [tokenizer.eos_token_id]
                         if i is not None}

    @classmethod
    def from_config(cls, config: LLMConfig) -> "TransformersBackend":
        model, tokenizer, model_id = load_causal_lm(
            config.model, tokenizer_ref=config.tokenizer, dtype=config.dtype, device=config.device,
            trust_remote_code=config.trust_remote_code,
        )
        return cls(model, tokenizer, model_id, config.batch_size, config.logprobs_top_k)

    def prompt_text(self, request: GenerationRequest) -> str:
        return self.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)

    def before_batch(self, operation: str) -> None:
        """Hook for subclasses (the student switches its expert here)."""

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Group requests that can share a batch (same operation, cap and decoding mode), keep input order."""
        results: list[GenerationResult | None] = [None] * len(requests)
        key = lambda i: (requests[i].operation, requests[i].max_new_tokens, requests[i].constrained)  # noqa: E731
        for _, group in groupby(sorted(range(len(requests)), key=key), key=key):
            indices = list(group)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, result in zip(chunk, self._generate_batch([requests[i] for i in chunk])):
                    results[i] = result
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        with self._lock:
            self.before_batch(batch[0].operation)
            started = time.perf_counter()
            enc = self.tokenizer([self.prompt_text(r) for r in batch], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.model.device)
            kwargs = dict(
                max_new_tokens=batch[0].max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=self.tokenizer.pad_token_id, return_dict_in_generate=True,
                output_logits=self.logprobs_top_k > 0, temperature=None, top_p=None, top_k=None,
            )
            if batch[0].constrained:
                kwargs["logits_processor"] = [self.grammars.logits_processor([r.schema for r in batch])]
            out = self.model.generate(**enc, **kwargs)
            elapsed = time.perf_counter() - started
        prompt_len = enc["input_ids"].shape[1]
        new_tokens = out.sequences[:, prompt_len:].tolist()
        prompt_counts = enc["attention_mask"].sum(dim=1).tolist()
        logprobs = None
        if self.logprobs_top_k > 0:
            # Raw logits, before the grammar mask: the teacher's own distribution is what distillation needs.
            stacked = torch.stack(out.logits, dim=1).float().log_softmax(dim=-1)
            top = stacked.topk(self.logprobs_top_k, dim=-1)
            logprobs = (top.indices.tolist(), top.values.tolist())
        results = []
        for row, tokens in enumerate(new_tokens):
            kept, finish = [], "length"
            for tok in tokens:
                if tok in self.stop_ids:
                    finish = "stop"
                    break
                kept.append(tok)
            top_lp = None
            if logprobs is not None:
                top_lp = [list(zip(logprobs[0][row][t], logprobs[1][row][t])) for t in range(len(kept))]
            results.append(
                GenerationResult(
                    text=self.tokenizer.decode(kept, skip_special_tokens=True),
                    prompt_tokens=int(prompt_counts[row]),
                    completion_tokens=len(kept),
                    latency_s=elapsed / len(batch),
                    batch_size=len(batch),
                    constrained=batch[0].constrained,
                    finish_reason=finish,
                    token_ids=kept,
                    top_logprobs=top_lp,
                )
            )
        return results


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
