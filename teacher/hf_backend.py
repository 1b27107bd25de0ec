"""A local `transformers` causal LM as an LLM backend: batched, left-padded, greedy generation.

The student with its experts reuses this class (it only adds adapter switching per operation), so teacher and
student decode exactly the same way.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
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

    def __init__(self, model, tokenizer, model_id: str, batch_size: int = 8, logprobs_top_k: int = 0,
                 prefix_cache: bool = True):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.batch_size, self.logprobs_top_k = batch_size, logprobs_top_k
        self.prefix_cache = prefix_cache
        self._prefixes: OrderedDict[tuple, tuple[list[int], object]] = OrderedDict()
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
        return cls(model, tokenizer, model_id, config.batch_size, config.logprobs_top_k, config.prefix_cache)

    def prompt_text(self, request: GenerationRequest) -> str:
        return self.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)

    def before_batch(self, operation: str) -> None:
        """Hook for subclasses (the student switches its expert here)."""

    def cache_tag(self) -> str:
        """What, besides the prompt, decides the model's activations: a cached prefix is only reused under
        the same tag. Subclasses that switch adapters must include the active one."""
        return str(getattr(self.model, "active_adapters", ""))

    def _shared_prefix(self, batch: list[GenerationRequest], rows: list[list[int]]):
        """The KV cache of the messages every row shares (system prompt + few-shot examples), computed once.

        Those shared messages are most of each prompt, so prefilling them once per run instead of once per
        row is the largest saving on CPU. Returns (prefix token ids, cache) or None where rows share none."""
        head = batch[0].messages[:-1]
        if not self.prefix_cache or not head or any(r.messages[:-1] != head for r in batch):
            return None
        key = (self.cache_tag(), repr(head))
        if key not in self._prefixes:
            from transformers import DynamicCache

            text = self.tokenizer.apply_chat_template(head, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            cache = DynamicCache(config=self.model.config)
            self.model(input_ids=torch.tensor([ids], device=self.model.device), past_key_values=cache, use_cache=True)
            self._prefixes[key] = (ids, cache)
            while len(self._prefixes) > 16:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(key)
        ids, cache = self._prefixes[key]
        if any(len(r) <= len(ids) or r[: len(ids)] != ids for r in rows):
            return None  # the template does not tokenize the prefix the same way inside the full prompt
        return ids, cache

    def _encode(self, batch: list[GenerationRequest]) -> tuple[dict, object | None]:
        """Token ids + attention mask, left-padded; with a shared prefix, the padding sits between the prefix and
        each row's own part (masked out, so positions and outputs match the unpadded prompt)."""
        rows = [self.tokenizer(self.prompt_text(r), add_special_tokens=False)["input_ids"] for r in batch]
        shared = self._shared_prefix(batch, rows)
        start, cache = (len(shared[0]), shared[1]) if shared else (0, None)
        width = max(len(r) for r in rows) - start
        ids = torch.full((len(rows), start + width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            own = row[start:]
            ids[i, :start], mask[i, :start] = torch.tensor(row[:start], dtype=torch.long), 1
            ids[i, start + width - len(own):], mask[i, start + width - len(own):] = torch.tensor(own), 1
        if cache is not None:
            cache = copy.deepcopy(cache)  # generate() extends the cache in place
            cache.batch_repeat_interleave(len(rows))
        device = self.model.device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, cache

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Group requests that can share a batch (same operation, cap and decoding mode), keep input order."""
        results: list[GenerationResult | None] = [None] * len(requests)
        key = lambda i: (requests[i].operation, requests[i].max_new_tokens, requests[i].constrained,  # noqa: E731
                         requests[i].no_repeat_ngram or 0)
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
            enc, cache = self._encode(batch)
            kwargs = dict(
                max_new_tokens=batch[0].max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=self.tokenizer.pad_token_id, return_dict_in_generate=True,
                output_logits=self.logprobs_top_k > 0, temperature=None, top_p=None, top_k=None,
            )
            if cache is not None:
                kwargs["past_key_values"] = cache
            processors = []
            if batch[0].constrained:
                processors.append(self.grammars.logits_processor([r.schema for r in batch]))
            if batch[0].no_repeat_ngram:  # after the grammar: it never bans the only token the grammar allows
                processors.append(CompletionNgramBlock(batch[0].no_repeat_ngram, enc["input_ids"].shape[1]))
            if processors:
                kwargs["logits_processor"] = processors
            out = self.model.generate(**enc, **kwargs)
            elapsed = time.perf_counter() - started
        prompt_len = enc["input_ids"].shape[1]
        new_tokens = out.sequences[:, prompt_len:].tolist()
        prompt_counts = enc["attention_mask"].sum(dim=1).tolist()
        logprobs = None
        if self.logprobs_top_k > 0:
            # `output_logits` are the logits the processors saw; xgrammar masks them in place, so under a
            # schema these are the teacher's log-probs over what the grammar allowed: the distribution it
            # actually decoded from, and the one the student will decode from under the same schema.
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
            if logprobs is not None:  # tokens the grammar forbade (log-prob -inf) are left out
                top_lp = [[(i, lp) for i, lp in zip(logprobs[0][row][t], logprobs[1][row][t]) if lp > float("-inf")]
                          for t in range(len(kept))]
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
                    extra={"decoding": {"no_repeat_ngram": batch[0].no_repeat_ngram}} if batch[0].no_repeat_ngram
                    else {},
                )
            )
        return results


class CompletionNgramBlock:
    """A logits processor that bans any token completing an n-gram the output already holds. Unlike
    transformers' `no_repeat_ngram_size`, the prompt is not counted (an extraction copies phrases from its
    input), and a token is never banned where the grammar left nothing else."""

    def __init__(self, n: int, prompt_len: int):
        self.n, self.prompt_len = n, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n = self.n
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] < n - 1:
            return scores
        for row, seq in enumerate(generated.tolist()):
            head = seq[len(seq) - (n - 1):]  # n >= 2 (OperationConfig)
            banned = {seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i : i + n - 1] == head}
            if not banned:
                continue
            banned_ids = torch.tensor(sorted(banned), device=scores.device)
            allowed = torch.isfinite(scores[row])
            if int(allowed.sum()) > int(allowed[banned_ids].sum()):
                scores[row, banned_ids] = float("-inf")
        return scores


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
