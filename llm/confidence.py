"""How sure an expert is of an answer, read from the log-probs of the tokens it chose (which the decoder already
has): the ground for deferring an unsure answer to the teacher.

A low quantile of the chosen tokens' log-probs, not their mean (Gupta et al., ICLR 2024, "Language Model
Cascades: token-level uncertainty and beyond"): one unsure token in a confident answer is what marks it. For an
update the whole answer misleads (measured on the embedded default: AUROC 0.18 in distribution, pointing the
wrong way): most of it is memory text copied with certainty, and its wrong DELETEs are among its most confident
answers. There only the tokens of the decisions, the `"event"` values, are read.
"""

from __future__ import annotations

import json
import math
import re
from typing import Sequence

EVENT_VALUE = re.compile(r'"event"\s*:\s*"([^"]*)"')
DESTRUCTIVE = frozenset({"DELETE", "UPDATE"})  # a wrong one loses a memory; a wrong NONE or ADD loses less


def low_quantile(logprobs: Sequence[float], q: float = 0.1) -> float:
    """The q-quantile (nearest rank, from the least likely) of the chosen tokens' log-probs; -inf for none."""
    values = sorted(lp for lp in logprobs if not math.isnan(lp))
    if not values:
        return -math.inf
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def char_offsets(tokenizer, token_ids: Sequence[int]) -> list[int]:
    """Where each token starts in the decoded text (decoding prefixes, so multi-byte characters split over
    tokens land right); the last entry is the text's length."""
    offsets = [0]
    for i in range(1, len(token_ids) + 1):
        offsets.append(len(tokenizer.decode(list(token_ids[:i]), skip_special_tokens=True)))
    return offsets


def event_token_indices(tokenizer, token_ids: Sequence[int]) -> list[int]:
    """The tokens that write an update answer's `"event"` values (ADD, UPDATE, DELETE, NONE)."""
    offsets = char_offsets(tokenizer, token_ids)
    text = tokenizer.decode(list(token_ids), skip_special_tokens=True)
    spans = [m.span(1) for m in EVENT_VALUE.finditer(text)]
    return [i for i in range(len(token_ids))
            if any(offsets[i] < end and offsets[i + 1] > start for start, end in spans)]


def answer_events(text: str) -> list[str]:
    """The events an update answer decides, in order ([] for an answer that is not one)."""
    try:
        entries = json.loads(text).get("memory", [])
    except (ValueError, AttributeError):
        return [m.group(1) for m in EVENT_VALUE.finditer(text)]
    return [str(e.get("event", "")) for e in entries if isinstance(e, dict)]


def confidence(operation: str, text: str, token_ids: Sequence[int], token_logprobs: Sequence[float], tokenizer,
               q: float = 0.1) -> float:
    """The answer's confidence: the low quantile of its decision tokens' log-probs for an update (of all its
    tokens where it names no event), of all its tokens otherwise."""
    if operation == "update":
        chosen = event_token_indices(tokenizer, token_ids)
        if chosen:
            return low_quantile([token_logprobs[i] for i in chosen], q)
    return low_quantile(token_logprobs, q)


def demoted(text: str) -> str:
    """An update answer with its destructive events made safe (`serve-experts --guard`): a DELETE becomes NONE
    (the memory stays), an UPDATE becomes an ADD of its new text (the old memory stays beside it). Nothing a user
    told the system is lost; a wrong demotion misses an update, which costs less than a wrong DELETE. An answer
    that is not a JSON object with a `memory` list comes back as it was (no system can apply it either)."""
    try:
        value = json.loads(text)
        entries = value["memory"]
    except (ValueError, TypeError, KeyError):
        return text
    if not isinstance(entries, list):
        return text
    safe = []
    for entry in entries:
        if isinstance(entry, dict) and entry.get("event") == "DELETE":
            entry = {**entry, "event": "NONE"}
        elif isinstance(entry, dict) and entry.get("event") == "UPDATE":
            entry = {k: v for k, v in entry.items() if k != "old_memory"} | {"event": "ADD"}
        safe.append(entry)
    return json.dumps({**value, "memory": safe}, ensure_ascii=False)


def is_destructive(operation: str, text: str) -> bool:
    """An update answer that deletes or rewrites a memory: kept only where such answers' own precision on the
    validation calls clears the budget."""
    return operation == "update" and any(event in DESTRUCTIVE for event in answer_events(text))
