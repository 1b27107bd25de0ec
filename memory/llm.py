"""The one interface the memory system needs from a language model: a batch of chat requests in, texts out.

Teacher backends (local transformers, OpenAI-compatible HTTP) and the student with its experts all implement
it, so the same memory code runs with any of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol


@dataclass(frozen=True)
class GenerationRequest:
    operation: str
    messages: list[dict]
    max_new_tokens: int
    schema: dict | None = None  # JSON schema the output must follow when decoding is constrained
    no_repeat_ngram: int | None = None  # see OperationConfig.no_repeat_ngram
    # What a served request (OpenAI API) may ask beyond the memory system's greedy calls; the defaults are
    # those calls' own settings, so nothing changes for them.
    logprobs_top_k: int | None = None  # None: the backend's own setting
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the output ends before the first of these strings
    # Set by a server when the client that asked has gone: the row leaves its batch at the next decode step.
    cancel: threading.Event | None = field(default=None, compare=False, repr=False)
    # Set by a server streaming the answer: called from the decoding thread after each decode step that added a
    # token, with the row's output so far (llm.decoding.Decoded, still growing: copy what is kept; return at once).
    on_tokens: Callable[[object], None] | None = field(default=None, compare=False, repr=False)

    def batch_key(self) -> tuple:
        """Requests with the same key decode in one batch (one cap, one decoding mode)."""
        return (self.operation, self.max_new_tokens, self.constrained, self.no_repeat_ngram or 0,
                self.logprobs_top_k, self.temperature, self.top_p, self.seed)

    @property
    def constrained(self) -> bool:
        return self.schema is not None

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    batch_size: int
    constrained: bool
    finish_reason: str = "stop"  # "stop", "length", or "cancelled" (the client left; nobody reads it)
    token_ids: list[int] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    token_logprobs: list[float] | None = None  # the log-prob of each emitted token (with top_logprobs)
    extra: dict = field(default_factory=dict)


def cancelled_result(request: GenerationRequest) -> GenerationResult:
    """The answer to a call whose caller left before it was decoded: nobody reads it."""
    return GenerationResult(text="", prompt_tokens=0, completion_tokens=0, latency_s=0.0, batch_size=0,
                            constrained=request.constrained, finish_reason="cancelled")


class LLMBackend(Protocol):
    model_id: str
    backend_name: str

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]: ...


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """The text before the first stop string (the OpenAI API leaves the stop sequence out)."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text
