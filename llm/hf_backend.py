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
from memlora.llm import gguf_cache
from memlora.llm.cpu_matmul import use_fastest_decode_product
from memlora.llm.decoding import Decoded, RowSpec, RunningBatch, decode_rows, mergeable
from memlora.llm.grammar import GrammarCache
from memlora.llm.kv_cache import in_place, kv_dtype
from memlora.llm.calibration import calibration_ids
from memlora.llm.quantize import applied_smoothing, quantize_base, smooth_in_place, smoothing
from memlora.memory.llm import GenerationRequest, GenerationResult, cancelled_result, cut_at_stop
from memlora.models import resolve

log = logging.getLogger("memlora.llm")

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
    folder, kwargs = model_ref.path, model_ref.pretrained_kwargs()
    if model_ref.gguf_file and gguf_cache.enabled():
        try:
            folder, kwargs = str(gguf_cache.converted(model_ref, trust_remote_code=trust_remote_code)), {}
        except OSError as err:  # a read-only or full cache folder: load the GGUF itself, as without the cache
            log.warning("GGUF cache unusable (%s); loading %s directly", err, model_ref.gguf_file)
    tok_ref = resolve(tokenizer_ref) if tokenizer_ref else None
    tok_folder, tok_kwargs = (tok_ref.path, tok_ref.pretrained_kwargs()) if tok_ref else (folder, kwargs)
    tokenizer = AutoTokenizer.from_pretrained(tok_folder, trust_remote_code=trust_remote_code, **tok_kwargs)
    if "gguf_file" not in kwargs:
        kwargs["use_safetensors"] = True  # never unpickle weights
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=pick_dtype(dtype, device), trust_remote_code=trust_remote_code, **kwargs
    )
    model.to(device).eval()
    prepare_tokenizer(tokenizer)
    return model, tokenizer, model_ref.model_id


def prepare_tokenizer(tokenizer) -> None:
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left so generation continues each row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def quantize_model(model, tokenizer, scheme: str, smoothing_alpha: float = 0.0,
                   keep_float32: tuple[str, ...] = ()) -> str | None:
    """Quantize a model's linears for inference (`llm.quantize`), smoothing their inputs' outlier channels into
    the float32 weights first where `smoothing_alpha` > 0 (calibrated on the memory system's own prompts).
    Returns the scheme applied, or None where nothing was quantized."""
    if scheme == "none":
        return None
    if applied_smoothing(scheme, smoothing_alpha):
        smooth_in_place(model, smoothing(model, calibration_ids(tokenizer), smoothing_alpha, keep_float32))
    return scheme if quantize_base(model, scheme, keep_float32) else None


class TransformersBackend:
    backend_name = "transformers"
    quantized: str | None = None  # the weights' scheme where quantized, with how (report's dtype column)
    smoothing_alpha: float = 0.0
    keep_float32: tuple[str, ...] = ()

    def __init__(self, model, tokenizer, model_id: str, batch_size: int = 8, logprobs_top_k: int = 0,
                 prefix_cache: bool = True, grammars: GrammarCache | None = None):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.batch_size, self.logprobs_top_k = batch_size, logprobs_top_k
        self.prefix_cache = prefix_cache
        self._prefixes: OrderedDict[tuple, tuple[list[int], object]] = OrderedDict()
        prepare_tokenizer(tokenizer)
        use_fastest_decode_product(model)  # decode steps are a few rows: this machine's faster product
        vocab = model.config.vocab_size
        self.grammars = grammars if grammars is not None and grammars.fits(tokenizer, vocab) else \
            GrammarCache(tokenizer, vocab)
        self._lock = threading.Lock()  # one generate at a time on a shared model
        self.stop_ids = {i for i in _as_list(model.generation_config.eos_token_id) + [tokenizer.eos_token_id]
                         if i is not None}

    @classmethod
    def from_config(cls, config: LLMConfig, smoothing_alpha: float = 0.0,
                    keep_float32: tuple[str, ...] = ()) -> "TransformersBackend":
        """`smoothing_alpha` and `keep_float32` shape `config.quantize` as `student.int8_smoothing` and
        `student.int8_keep_float32` do (evaluation's teacher-int8, quantized the way the student is)."""
        model, tokenizer, model_id = load_causal_lm(
            config.model, tokenizer_ref=config.tokenizer, dtype=config.dtype, device=config.device,
            trust_remote_code=config.trust_remote_code,
        )
        # before the backend sets up its CPU linears (a quantized layer keeps its own kernel)
        quantized = quantize_model(model, tokenizer, config.quantize, smoothing_alpha, keep_float32)
        backend = cls(model, tokenizer, model_id, config.batch_size, config.logprobs_top_k, config.prefix_cache)
        if quantized:
            backend.quantized = quantized
            backend.smoothing_alpha = applied_smoothing(quantized, smoothing_alpha)  # what was applied
            backend.keep_float32 = tuple(keep_float32)
        return backend

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
            if kv_dtype(self.model) is not None:  # the prefix's own attention as the rows' will be: on that dtype
                cache = in_place(cache, dtype=kv_dtype(self.model))
            # Only the cache is kept: logits of the last position alone, not a (prefix x vocabulary) float32 block
            # (~190 MB for a 1,000-token prefix of SmolLM2's 49,152 tokens) and its GEMM through the output head.
            self.model(input_ids=torch.tensor([ids], device=self.model.device), past_key_values=cache, use_cache=True,
                       logits_to_keep=1)
            self._prefixes[key] = (ids, cache)
            while len(self._prefixes) > 16:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(key)
        ids, cache = self._prefixes[key]
        if any(len(r) <= len(ids) or r[: len(ids)] != ids for r in rows):
            return None  # the template does not tokenize the prefix the same way inside the full prompt
        return ids, cache

    def _encode(self, batch: list[GenerationRequest]) -> tuple[dict, object | None, int]:
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
            cache = copy.deepcopy(cache)  # decoding extends the cache in place
            cache.batch_repeat_interleave(len(rows))
        device = self.model.device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, cache, start

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Group requests that can share a batch (same operation, cap and decoding mode), keep input order."""
        results: list[GenerationResult | None] = [None] * len(requests)
        key = lambda i: requests[i].batch_key()  # noqa: E731
        for _, group in groupby(sorted(range(len(requests)), key=key), key=key):
            indices = list(group)
            for start in range(0, len(indices), self.batch_size):
                chunk = [i for i in indices[start : start + self.batch_size] if not requests[i].cancelled]
                for i in indices[start : start + self.batch_size]:
                    if requests[i].cancelled:  # its caller left while it waited: never decoded
                        results[i] = cancelled_result(requests[i])
                for i, result in zip(chunk, self._generate_batch([requests[i] for i in chunk]) if chunk else ()):
                    results[i] = result
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        with self._lock:
            first = batch[0]  # every row shares its batch key (operation, cap, decoding mode)
            self.before_batch(first.operation)
            started = time.perf_counter()
            enc, cache, cached_len = self._encode(batch)
            generator = None
            if first.temperature > 0 and first.seed is not None:
                generator = torch.Generator(device=self.model.device).manual_seed(first.seed)
            decoded = decode_rows(self.model, enc["input_ids"], enc["attention_mask"],
                                  [self.row_spec(r) for r in batch], cache=cache, cached_len=cached_len,
                                  stop_ids=self.stop_ids, temperature=first.temperature, top_p=first.top_p,
                                  generator=generator)
            elapsed = time.perf_counter() - started
        prompt_counts = enc["attention_mask"].sum(dim=1).tolist()
        return [self.result(batch[row], d, int(prompt_counts[row]), elapsed / len(batch), len(batch))
                for row, d in enumerate(decoded)]

    def result(self, request: GenerationRequest, decoded: Decoded, prompt_tokens: int, latency_s: float,
               batch_size: int) -> GenerationResult:
        """A decoded row as the memory system reads it; `latency_s`: its share of the batch's time."""
        extra = {"decoding": {"no_repeat_ngram": request.no_repeat_ngram}} if request.no_repeat_ngram else {}
        return GenerationResult(
            text=cut_at_stop(self.tokenizer.decode(decoded.tokens, skip_special_tokens=True), request.stop),
            prompt_tokens=prompt_tokens,
            completion_tokens=len(decoded.tokens),
            latency_s=latency_s,
            batch_size=batch_size,
            constrained=request.constrained,
            finish_reason="cancelled" if decoded.cancelled else "stop" if decoded.finished else "length",
            token_ids=decoded.tokens,
            top_logprobs=decoded.top_logprobs,
            token_logprobs=decoded.token_logprobs,
            extra=extra,
        )

    def mixes_operations(self) -> bool:
        """Whether calls of different operations may share one running batch (memlora.llm.continuous): the same
        weights for every operation (a subclass that switches adapters per batch may not, unless it routes each
        row to its own) and a KV cache whose rows can be merged."""
        return type(self).before_batch is TransformersBackend.before_batch and mergeable(self.model)

    def running_batch(self) -> RunningBatch:
        """An empty batch that rows join between steps (memlora.llm.continuous)."""
        return RunningBatch(self.model, self.stop_ids, trim=True)

    @torch.inference_mode()
    def join(self, batch: RunningBatch, requests: list[GenerationRequest]) -> tuple[list[Decoded], list[int]]:
        """Prefill `requests` (one operation, one shared prompt head: the cached prefix serves them all) into the
        running `batch`; returns their outputs, which fill as the batch steps, and their prompt lengths."""
        with self._lock:
            self.before_batch(requests[0].operation)
            enc, cache, cached_len = self._encode(requests)
            outs = batch.add(enc["input_ids"], enc["attention_mask"], [self.row_spec(r) for r in requests],
                             cache=cache, cached_len=cached_len)
        return outs, enc["attention_mask"].sum(dim=1).tolist()

    def advance(self, batch: RunningBatch) -> list[Decoded]:
        """One decode step of the running `batch`; the outputs of the rows that left it."""
        with self._lock:
            return batch.step()

    def row_spec(self, request: GenerationRequest) -> RowSpec:
        """How `request` decodes as a row of a running batch."""
        stops = request.stop
        return RowSpec(
            request.max_new_tokens,
            self.grammars.grammar(request.schema) if request.constrained else None,
            request.no_repeat_ngram or 0,
            self.logprobs_top_k if request.logprobs_top_k is None else request.logprobs_top_k,
            (lambda tokens: any(s in self.tokenizer.decode(tokens, skip_special_tokens=True) for s in stops))
            if stops else None,
            (lambda: request.cancelled) if request.cancel is not None else None,
            on_tokens=request.on_tokens,
        )


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
