"""The experts as they are served, evaluated end to end (`evaluation.served`): `memlora calibrate`'s thresholds
decide, call by call, whether an expert's answer goes out, as `serve-experts` decides it.

`guard` (`serve-experts --guard`, no teacher): an unsure answer that deletes or rewrites a memory is demoted
(`llm.confidence.demoted`), any other unsure answer goes out as written. `teacher` (`serve-experts --fallback`):
an unsure answer is replaced by the teacher's answer to the same request; the teacher runs in the same process
(its memory counts in this system's peak, which a remote teacher's would not). Either way the memory system
builds its store from what was served, so the QA and the DELETEs of the end-to-end phase are what a user of the
served system would get. Each call's row says who answered (`answered_by`); a deferred call's latency is the
expert's and the teacher's together, which the client waits for, except where the operation's thresholds keep
nothing: then, as on the server, the teacher answers without the expert decoding first.

The same rules as the server (`llm.guard.judged`, `made_safe`), read from the same thresholds file: what is
measured here is what is served there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from memlora.config import Config
from memlora.evaluation.calibration import DeferralPolicy
from memlora.llm.backends import build_backend
from memlora.llm.guard import DEMOTED, EXPERT, TEACHER, UNSURE, judged, made_safe
from memlora.memory.llm import GenerationRequest, GenerationResult, LLMBackend

NO_EXPERT = "student"  # answered_by of a call no expert serves, without a teacher (the others: the server's)


class ServedBackend:
    """An `LLMBackend`: the experts, each answer judged on its own tokens' log-probs, and where unsure demoted
    (`teacher=None`) or answered by the teacher."""

    def __init__(self, experts, policy: DeferralPolicy, config: Config, teacher: LLMBackend | None = None):
        self.experts, self.policy, self.deferral, self.teacher = experts, policy, config.deferral, teacher
        self.model_id = experts.model_id + (f" -> {teacher.model_id}" if teacher is not None else " (guard)")
        self.backend_name = experts.backend_name + ("+teacher" if teacher is not None else "+guard")
        self.model = experts.model  # what the probes measure (parameters, device, dtype)
        self.counts: Counter = Counter()

    def __getattr__(self, name):  # switches, quantized, batch_size, ...: the experts' own
        if name == "experts":  # not set yet
            raise AttributeError(name)
        return getattr(self.experts, name)

    def mixes_operations(self) -> bool:
        """Not the experts' own: a call is judged, and maybe sent on, once its whole batch is back."""
        return False

    def _straight(self, request: GenerationRequest) -> bool:
        """The server's `straight_to_teacher`: a teacher, an expert, and thresholds that keep none of its answers."""
        return (self.teacher is not None and request.operation in self.experts.operations
                and self.policy.keeps_nothing(request.operation))

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        straight = [i for i, r in enumerate(requests) if self._straight(r)]
        if straight:
            theirs = dict(zip(straight, self.teacher.generate([replace(requests[i], logprobs_top_k=0)
                                                               for i in straight])))
            others = [i for i in range(len(requests)) if i not in theirs]
            mine = dict(zip(others, self.generate([requests[i] for i in others]) if others else []))
            for i in straight:
                self.counts[f"{TEACHER}_{requests[i].operation}"] += 1
                theirs[i] = replace(theirs[i], extra={**theirs[i].extra, "answered_by": TEACHER})
            return [theirs[i] if i in theirs else mine[i] for i in range(len(requests))]
        # The confidence is read from the chosen tokens' log-probs (greedy: asking for them changes no token)
        asked = [replace(r, logprobs_top_k=max(1, r.logprobs_top_k or 0)) for r in requests]
        results = self.experts.generate(asked)
        answered: list[GenerationResult] = []
        unsure: list[int] = []
        for i, (request, result) in enumerate(zip(requests, results)):
            if request.operation not in self.experts.operations:  # no expert: the bare student, as served
                who = TEACHER if self.teacher is not None else NO_EXPERT
                if self.teacher is not None:
                    unsure.append(i)
            else:
                keep, _, destructive = judged(self.policy, self.deferral, request, result, self.experts.tokenizer)
                if keep:
                    who = EXPERT
                elif self.teacher is not None:
                    who = TEACHER
                    unsure.append(i)
                elif destructive:
                    who, result = DEMOTED, made_safe(result)
                else:
                    who = UNSURE
            self.counts[f"{who}_{request.operation}"] += 1
            answered.append(self._as_asked(request, result, who))
        if unsure:
            theirs = self.teacher.generate([replace(requests[i], logprobs_top_k=0) for i in unsure])
            for i, result in zip(unsure, theirs):
                mine = answered[i]
                answered[i] = replace(result, latency_s=mine.latency_s + result.latency_s,
                                      extra={**result.extra, "answered_by": TEACHER})
        return answered

    @staticmethod
    def _as_asked(request: GenerationRequest, result: GenerationResult, who: str) -> GenerationResult:
        """The result with the log-probs only the judgement needed taken off again."""
        if request.logprobs_top_k:
            return replace(result, extra={**result.extra, "answered_by": who})
        return replace(result, top_logprobs=None, token_logprobs=None, extra={**result.extra, "answered_by": who})


def served_backend(config: Config, experts, policy: DeferralPolicy, with_teacher: bool) -> ServedBackend:
    """The experts under `policy`; `with_teacher`: the configured teacher (no log-probs) takes unsure calls."""
    teacher = build_backend(config.teacher.model_copy(update={"logprobs_top_k": 0})) if with_teacher else None
    return ServedBackend(experts, policy, config, teacher)
