"""Greedy decoding of a batch whose rows leave as soon as they are finished, and may join while it runs.

`model.generate` keeps every row in the batch until the longest one ends: a batch of 16 extraction calls that
average 57 tokens and end at 116 spends half its decode steps on rows that already stopped (measured on the
bundled teacher's traces). On a CPU the cost of a step grows with the rows in it, so this loop evicts a row,
with its KV cache, the step it emits a stop token. The arithmetic per kept row is the one `generate` does:
positions from the attention mask, the same processors in the same order (grammar, then n-gram block), argmax.

`RunningBatch.add` lets rows join between steps (continuous batching, `memlora.llm.continuous`): their prompts
are prefilled on their own and their KV cache is merged into the running one, both left-padded to one width
(masked out, so each row attends to exactly its own tokens). Every decoding setting is the row's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import xgrammar as xgr

from memlora.llm.kv_cache import drop_front, in_place, kv_dtype, merge


@dataclass
class Decoded:
    tokens: list[int]          # the completion, stop token excluded
    finished: bool             # ended on a stop token (else: ran to max_new_tokens)
    top_logprobs: list[list[tuple[int, float]]] | None
    token_logprobs: list[float] | None = None  # each emitted token's log-prob (with top_logprobs)
    cancelled: bool = False    # left the batch because nobody waits for it any more


@dataclass
class RowSpec:
    """How one row decodes."""

    max_new_tokens: int
    grammar: object | None = None           # a compiled xgrammar grammar; None: free decoding
    no_repeat_ngram: int = 0
    logprobs_top_k: int = 0
    stop_check: Callable[[list[int]], bool] | None = None  # True once the completion holds a stop string
    cancelled: Callable[[], bool] | None = None             # True once nobody waits for the row
    adapter: str | None = None  # the expert that decodes the row, where one running batch holds several
    on_tokens: Callable[[Decoded], None] | None = None   # streams the row's output after each token it adds


def banned_by_ngram(seq: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram `seq` (the completion so far) already holds."""
    if len(seq) < n - 1:
        return set()
    head = seq[len(seq) - (n - 1):]
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i : i + n - 1] == head}


def block_ngrams(scores: torch.Tensor, completions: list[list[int]], n: int) -> None:
    """Ban, in place, tokens that repeat an n-gram of the row's own output; never the only one left allowed."""
    for row, seq in enumerate(completions):
        banned = banned_by_ngram(seq, n)
        if not banned:
            continue
        ids = torch.tensor(sorted(banned), device=scores.device)
        allowed = torch.isfinite(scores[row])
        if int(allowed.sum()) > int(allowed[ids].sum()):
            scores[row, ids] = float("-inf")


def sample(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from softmax(scores / temperature), cut to the smallest set whose mass reaches top_p
    (the OpenAI API's sampling parameters); masked tokens (-inf) are never drawn."""
    probs = (scores / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # the most likely token always stays
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def mergeable(model) -> bool:
    """Whether rows can join a running batch of this model: a plain dynamic KV cache in every layer (a sliding
    window layer keeps its own positions)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


class RunningBatch:
    """The rows decoding now, with their KV cache and next logits. `add` prefills rows and merges them in; `step`
    picks one token per row, lets finished rows go and runs the others one position on. Sampling settings are
    the batch's; everything else is each row's (RowSpec). `trim` drops KV columns no row attends to any more
    (those a row that left padded the others to), which a batch that keeps taking rows needs. `route`, where
    given, is told the specs of the rows of every forward, in row order, before it runs (the student points each
    row at its own expert)."""

    def __init__(self, model, stop_ids: set[int], *, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, trim: bool = False,
                 route: Callable[[list[RowSpec]], None] | None = None):
        self.model, self.stop_ids, self.trim, self.route = model, stop_ids, trim, route
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.rows: list[tuple[RowSpec, Decoded, object | None]] = []  # (spec, its output, its grammar matcher)
        self.cache = self.mask = self.next_pos = self.logits = None
        self.width = 0  # KV cache length
        self._bitmask = None

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, specs: list[RowSpec], *, cache=None,
            cached_len: int = 0) -> list[Decoded]:
        """Prefill rows (left-padded; `cache` holds the KV of their first `cached_len` positions, or is None) and
        put them in the batch; returns their outputs, which fill as the batch steps."""
        from transformers import DynamicCache

        cache = in_place(cache if cache is not None else DynamicCache(config=self.model.config),
                         dtype=kv_dtype(self.model))
        width = input_ids.shape[1]
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        if self.route is not None:
            self.route(specs)
        logits = self.model(input_ids=input_ids[:, cached_len:], attention_mask=attention_mask,
                            position_ids=positions[:, cached_len:], past_key_values=cache, use_cache=True,
                            cache_position=torch.arange(cached_len, width, device=input_ids.device),
                            logits_to_keep=1).logits[:, -1, :]
        next_pos = positions[:, -1:] + 1
        outs = [Decoded([], False, [] if s.logprobs_top_k else None, [] if s.logprobs_top_k else None) for s in specs]
        matchers = [xgr.GrammarMatcher(s.grammar) if s.grammar is not None else None for s in specs]
        if not self.rows:
            self.cache, self.mask, self.next_pos, self.logits = cache, attention_mask, next_pos, logits
            self.width = width
        else:
            full = max(self.width, width)
            old, new = full - self.width, full - width
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                merge(mine, theirs, old, new)
            self.mask = torch.cat([_left_pad(self.mask, old, 1), _left_pad(attention_mask, new, 1)])
            self.next_pos = torch.cat([self.next_pos, next_pos])
            self.logits = torch.cat([self.logits, logits])
            self.width = full
        self.rows += list(zip(specs, outs, matchers))
        return outs

    def _constrain(self, scores: torch.Tensor) -> None:
        matchers = [m for _, _, m in self.rows]
        grammars = [s.grammar for s, _, m in self.rows if m is not None]
        if not grammars:
            return
        n = len(matchers)
        if self._bitmask is None or self._bitmask.shape[0] < n:
            self._bitmask = xgr.allocate_token_bitmask(n, grammars[0].tokenizer_info.vocab_size)
        if len(grammars) < n:
            xgr.reset_token_bitmask(self._bitmask)  # free rows: every token allowed
        for i, matcher in enumerate(matchers):
            if matcher is not None:
                matcher.fill_next_token_bitmask(self._bitmask, i)
        xgr.apply_token_bitmask_inplace(scores, self._bitmask[:n].to(scores.device))

    @torch.inference_mode()
    def step(self) -> list[Decoded]:
        """One token for every row; returns the outputs of the rows that left the batch with it."""
        scores = self.logits.float()
        # The grammar masks before the n-gram block, so the block never bans the only token the grammar allows;
        # log-probs are taken after both: the distribution the row actually decoded from.
        self._constrain(scores)
        for i, (spec, out, _) in enumerate(self.rows):
            if spec.no_repeat_ngram:
                block_ngrams(scores[i : i + 1], [out.tokens], spec.no_repeat_ngram)
        chosen = (scores.argmax(dim=-1) if self.temperature <= 0
                  else sample(scores, self.temperature, self.top_p, self.generator))
        top_k = max(spec.logprobs_top_k for spec, _, _ in self.rows)
        if top_k:
            logp = scores.log_softmax(dim=-1)
            top = logp.topk(top_k, dim=-1)
            indices, values = top.indices.tolist(), top.values.tolist()
            chosen_lp = logp.gather(-1, chosen[:, None]).squeeze(-1).tolist()
        keep, left = [], []
        for i, ((spec, out, matcher), tok) in enumerate(zip(self.rows, chosen.tolist())):
            if spec.cancelled is not None and spec.cancelled():
                out.cancelled = True
            elif tok in self.stop_ids:
                out.finished = True
            else:
                out.tokens.append(tok)
                if spec.logprobs_top_k:  # tokens the grammar forbade (log-prob -inf) are left out
                    k = spec.logprobs_top_k
                    out.top_logprobs.append([(t, lp) for t, lp in zip(indices[i][:k], values[i][:k])
                                             if lp > float("-inf")])
                    out.token_logprobs.append(chosen_lp[i])
                if matcher is not None:
                    matcher.accept_token(tok)
                if spec.on_tokens is not None:
                    spec.on_tokens(out)
                if matcher is not None and matcher.is_terminated():  # the grammar took a stop token of its own
                    out.finished = True
                elif spec.stop_check is not None and spec.stop_check(out.tokens):
                    out.finished = True
                elif len(out.tokens) < spec.max_new_tokens:
                    keep.append(i)
                    continue
            left.append(out)
        if not keep:
            self.rows, self.cache, self.mask, self.next_pos, self.logits, self.width = [], None, None, None, None, 0
            return left
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=chosen.device)
            self.cache.batch_select_indices(index)
            self.mask, self.next_pos, chosen = self.mask[index], self.next_pos[index], chosen[index]
            self.rows = [self.rows[i] for i in keep]
            if self.trim:
                self._trim()
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        if self.route is not None:
            self.route([spec for spec, _, _ in self.rows])
        self.logits = self.model(input_ids=chosen[:, None], attention_mask=self.mask, position_ids=self.next_pos,
                                 past_key_values=self.cache, use_cache=True,
                                 cache_position=torch.tensor([self.width], device=chosen.device),
                                 logits_to_keep=1).logits[:, -1, :]
        self.width += 1
        self.next_pos = self.next_pos + 1
        return left

    def _trim(self) -> None:
        first = int(self.mask.any(dim=0).int().argmax())  # the first KV column some row still attends to
        if first == 0:
            return
        for layer in self.cache.layers:
            drop_front(layer, first)
        self.mask = self.mask[:, first:]
        self.width -= first


def decode_rows(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, specs: list[RowSpec], *, cache,
                cached_len: int, stop_ids: set[int], temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> list[Decoded]:
    """Decode one batch to its end, each row as its spec says; `cache` holds the KV of the first `cached_len`
    positions (or is None)."""
    if all(spec.max_new_tokens < 1 for spec in specs):
        return [Decoded([], False, [] if s.logprobs_top_k else None, [] if s.logprobs_top_k else None) for s in specs]
    batch = RunningBatch(model, stop_ids, temperature=temperature, top_p=top_p, generator=generator)
    outs = batch.add(input_ids, attention_mask, specs, cache=cache, cached_len=cached_len)
    while batch.rows:
        batch.step()
    return outs


def greedy_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, cache, cached_len: int,
                  max_new_tokens: int, stop_ids: set[int], grammars: list | None = None,
                  no_repeat_ngram: int = 0, logprobs_top_k: int = 0, temperature: float = 0.0,
                  top_p: float = 1.0, generator: torch.Generator | None = None,
                  stop_check=None, cancelled=None) -> list[Decoded]:
    """`decode_rows` with one setting for every row; `stop_check(row, tokens)` ends a row early (stop strings),
    `cancelled(row)` drops a row whose caller has gone, with its KV cache, at the next step."""
    specs = [RowSpec(max_new_tokens, grammars[row] if grammars else None, no_repeat_ngram, logprobs_top_k,
                     (lambda tokens, row=row: stop_check(row, tokens)) if stop_check is not None else None,
                     (lambda row=row: cancelled(row)) if cancelled is not None else None)
             for row in range(input_ids.shape[0])]
    return decode_rows(model, input_ids, attention_mask, specs, cache=cache, cached_len=cached_len,
                       stop_ids=stop_ids, temperature=temperature, top_p=top_p, generator=generator)
