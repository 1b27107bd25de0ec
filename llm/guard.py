"""Serving the experts without a teacher behind them (`serve-experts --guard`): the same thresholds `memlora
calibrate` set for deferral decide which answers an expert is sure of, but an unsure answer has nobody to go to.
A destructive update answer (DELETE or UPDATE) below its class's threshold is demoted (`llm.confidence.demoted`:
the memory stays), since a wrong DELETE loses what a user said for good; any other unsure answer goes back as the
expert wrote it, marked as unsure in the response, for the client to weigh.

The response says what happened: `x-memlora-answered-by` is `expert`, `expert-demoted` or `expert-unsure`, and
`x-memlora-confidence` carries the confidence; `/health` counts each per operation. With `--fallback`, the same
demotion applies where the teacher failed for a destructive answer it should have taken.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from memlora.config import DeferralConfig
from memlora.evaluation.calibration import DeferralPolicy
from memlora.llm.confidence import confidence, demoted, is_destructive
from memlora.llm.openai_protocol import ChatRequest
from memlora.memory.llm import GenerationRequest, GenerationResult

ANSWERED_BY = "x-memlora-answered-by"
CONFIDENCE = "x-memlora-confidence"
# Who answered, as the ANSWERED_BY header says it (and `evaluation.served`'s call rows)
EXPERT, DEMOTED, UNSURE, TEACHER = "expert", "expert-demoted", "expert-unsure", "teacher"


def judged(policy: DeferralPolicy, config: DeferralConfig, generation: GenerationRequest, result: GenerationResult,
           tokenizer) -> tuple[bool, float, bool]:
    """(keep the expert's answer, its confidence, whether it is destructive), by the calibrated thresholds."""
    conf = confidence(generation.operation, result.text, result.token_ids or [], result.token_logprobs or [],
                      tokenizer, config.quantile)
    destructive = is_destructive(generation.operation, result.text)
    return policy.keeps(generation.operation, conf, destructive), conf, destructive


def made_safe(result: GenerationResult) -> GenerationResult:
    """The result with its destructive update events demoted; the tokens no longer spell the text, so it carries
    no log-probs."""
    return replace(result, text=demoted(result.text), token_ids=None, top_logprobs=None, token_logprobs=None)


class Guard:
    """What `ServingEngine` calls for an expert's answer where no teacher can take the call (the place of
    `llm.fallback.Fallback`, with the same methods)."""

    has_teacher = False

    def __init__(self, policy: DeferralPolicy, config: DeferralConfig):
        self.policy, self.config = policy, config
        self.counts: Counter = Counter()

    async def answer(self, chat: ChatRequest, generation: GenerationRequest, result: GenerationResult, tokenizer,
                     context, expert_answer, teacher_failed: bool = False) -> tuple[dict, dict]:
        """(the response body, its headers): the expert's answer, its destructive events demoted where it is
        unsure of them; `expert_answer(result)` builds the body (`teacher_failed`: never, there is no teacher)."""
        operation = generation.operation
        keep, conf, destructive = judged(self.policy, self.config, generation, result, tokenizer)
        headers = {CONFIDENCE: f"{conf:.4f}"}
        if keep:
            self.counts[f"kept_{operation}"] += 1
            return expert_answer(result), {**headers, ANSWERED_BY: EXPERT}
        if destructive:
            self.counts[f"demoted_{operation}"] += 1
            return expert_answer(made_safe(result)), {**headers, ANSWERED_BY: DEMOTED}
        self.counts[f"unsure_{operation}"] += 1
        return expert_answer(result), {**headers, ANSWERED_BY: UNSURE}

    def health(self) -> dict:
        return {"guard": True, "counts": dict(self.counts), "stale_thresholds": self.policy.stale}

    async def aclose(self) -> None:
        return None
