"""Greedy decoding of one batch that drops each row from the batch as soon as it is finished.

`model.generate` keeps every row in the batch until the longest one ends: a batch of 16 extraction calls that
average 57 tokens and end at 116 spends half its decode steps on rows that already stopped (measured on the
bundled teacher's traces). On a CPU the cost of a step grows with the rows in it, so this loop evicts a row,
with its KV cache, the step it emits a stop token. The arithmetic per kept row is the one `generate` does:
positions from the attention mask, the same processors in the same order (grammar, then n-gram block), argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import xgrammar as xgr


@dataclass
class Decoded:
    tokens: list[int]          # the completion, stop token excluded
    finished: bool             # ended on a stop token (else: ran to max_new_tokens)
    top_logprobs: list[list[tuple[int, float]]] | None
    token_logprobs: list[float] | None = None  # each emitted token's log-prob (with top_logprobs)
    cancelled: bool = False    # left the batch because nobody waits for it any more


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


@torch.inference_mode()
def greedy_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, cache, cached_len: int,
                  max_new_tokens: int, stop_ids: set[int], grammars: list | None = None,
                  no_repeat_ngram: int = 0, logprobs_top_k: int = 0, temperature: float = 0.0,
                  top_p: float = 1.0, generator: torch.Generator | None = None,
                  stop_check=None, cancelled=None) -> list[Decoded]:
    """Decode every row greedily (or, with a temperature, by sampling); `cache` holds the KV of the first
    `cached_len` positions (or is empty). `stop_check(row, tokens)` ends a row early (stop strings);
    `cancelled(row)` drops a row whose caller has gone, with its KV cache, at the next step."""
    from transformers import DynamicCache

    cache = cache if cache is not None else DynamicCache(config=model.config)
    batch, width = input_ids.shape
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    matchers = [xgr.GrammarMatcher(g) for g in grammars] if grammars else None
    if matchers:
        bitmask = xgr.allocate_token_bitmask(batch, grammars[0].tokenizer_info.vocab_size)
    out = [Decoded([], False, [] if logprobs_top_k else None, [] if logprobs_top_k else None) for _ in range(batch)]
    active = list(range(batch))  # original row of each row still in the batch
    mask = attention_mask
    logits = model(input_ids=input_ids[:, cached_len:], attention_mask=mask, position_ids=positions[:, cached_len:],
                   past_key_values=cache, use_cache=True, cache_position=torch.arange(cached_len, width,
                   device=input_ids.device), logits_to_keep=1).logits[:, -1, :]
    next_pos = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        scores = logits.float()
        if matchers:
            for i, row in enumerate(active):
                matchers[row].fill_next_token_bitmask(bitmask, i)
            xgr.apply_token_bitmask_inplace(scores, bitmask[: len(active)].to(scores.device))
        if no_repeat_ngram:
            block_ngrams(scores, [out[row].tokens for row in active], no_repeat_ngram)
        chosen = scores.argmax(dim=-1) if temperature <= 0 else sample(scores, temperature, top_p, generator)
        if logprobs_top_k:
            logp = scores.log_softmax(dim=-1)
            top = logp.topk(logprobs_top_k, dim=-1)
            indices, values = top.indices.tolist(), top.values.tolist()
            chosen_lp = logp.gather(-1, chosen[:, None]).squeeze(-1).tolist()
        keep = []
        for i, (row, tok) in enumerate(zip(active, chosen.tolist())):
            if cancelled is not None and cancelled(row):
                out[row].cancelled = True
                continue
            if tok in stop_ids:
                out[row].finished = True
                continue
            out[row].tokens.append(tok)
            if logprobs_top_k:  # tokens the grammar forbade (log-prob -inf) are left out
                out[row].top_logprobs.append([(t, lp) for t, lp in zip(indices[i], values[i]) if lp > float("-inf")])
                out[row].token_logprobs.append(chosen_lp[i])
            if matchers:
                matchers[row].accept_token(tok)
                if matchers[row].is_terminated():  # the grammar took a stop token of its own: done
                    out[row].finished = True
                    continue
            if stop_check is not None and stop_check(row, out[row].tokens):
                out[row].finished = True
                continue
            keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(index)
            mask, next_pos, chosen = mask[index], next_pos[index], chosen[index]
            active = [active[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        logits = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                       use_cache=True, cache_position=torch.tensor([width + step], device=input_ids.device),
                       logits_to_keep=1).logits[:, -1, :]
        next_pos = next_pos + 1
    return out
