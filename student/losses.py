"""Distillation losses: sequence-level (cross-entropy on the teacher's tokens) and token-level (KL or JSD
against the teacher's stored top-k log-probabilities).

Why top-k is renormalised on both sides: traces keep only the teacher's k most likely tokens per position, so
the teacher's remaining mass is unknown. We renormalise the teacher's k probabilities to sum to one, and take
the student's distribution over the *same* k token ids, renormalised the same way (a softmax over those k
logits). Both are then proper distributions on one support, the divergence is zero exactly when the student
ranks and weighs the teacher's candidates as the teacher does, and the student is not pushed to move mass
around in a tail the teacher told us nothing about. Cross-entropy on the sampled token keeps the full softmax
honest, so the two terms together cover both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def completion_window(labels: torch.Tensor) -> int:
    """How many trailing positions hold every logit the loss reads: from the one before the earliest label on.

    The model then computes its output head (49152 x 576 for SmolLM2) on those positions only, not on the
    prompt's, which the loss never reads."""
    labelled = labels != IGNORE
    rows = labelled.any(dim=1)
    if not rows.any():
        return labels.size(1)
    first = labelled[rows].float().argmax(dim=1).min()
    return int(labels.size(1) - first + 1)


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not IGNORE; with `weights` (aligned with
    `labels`), the weighted mean."""
    flat_logits, flat_labels = logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1)
    if weights is None:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE)
    per_token = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE, reduction="none")
    w = weights[:, 1:].reshape(-1).float() * (flat_labels != IGNORE)
    return (per_token * w).sum() / w.sum().clamp_min(1e-12)


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean divergence over masked positions (weighted by `weights`, (N,), where given).

    student_logits: (N, V) at the positions that predict a completion token; teacher_ids / teacher_logprobs:
    (N, K); mask: (N,) bool, False where the teacher's log-probs are missing.
    """
    if not mask.any():
        return student_logits.new_zeros(())
    t = teacher_logprobs[mask].float()
    valid = torch.isfinite(t)  # fewer than K candidates at a step: the rest are padding at -inf
    neg_inf = torch.finfo(torch.float32).min
    s = student_logits[mask].float().gather(-1, teacher_ids[mask]).masked_fill(~valid, neg_inf)
    t = t.masked_fill(~valid, neg_inf)
    log_q = s - torch.logsumexp(s, dim=-1, keepdim=True)
    log_p = t - torch.logsumexp(t, dim=-1, keepdim=True)
    p, q = log_p.exp() * valid, log_q.exp() * valid
    if kind == "forward_kl":
        terms = p * (log_p - log_q)
    elif kind == "jsd":
        # Generalised JSD as in TRL's GKD: beta weighs the teacher's side of the mixture.
        log_m = torch.log((beta * p + (1 - beta) * q).clamp_min(1e-30))
        terms = beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)
    else:
        raise ValueError(f"unknown kd_loss {kind!r}")
    per_position = torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)
    if weights is None:
        return per_position.mean()
    w = weights[mask].float()
    return (per_position * w).sum() / w.sum().clamp_min(1e-12)


def distillation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_mask: torch.Tensor,
    kd_weight: float,
    kind: str = "forward_kl",
    beta: float = 0.5,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(1 - w) * CE + w * KD; batches with no teacher log-probs at all fall back to CE alone.

    teacher_* tensors are aligned with `labels` (B, T, K): position t holds the teacher's top-k for the
    token at t, which the logits at t - 1 predict. `weights` (B, T), aligned with `labels`, weighs each
    completion token in both terms (the update decision's tokens, `distill.targets.event_weight`).
    """
    ce = shifted_ce(logits, labels, weights)
    mask = teacher_mask[:, 1:].reshape(-1)
    if kd_weight == 0 or not mask.any():
        return ce, {"ce": float(ce.detach()), "kd": 0.0}
    kd = topk_divergence(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        teacher_ids[:, 1:].reshape(-1, teacher_ids.size(-1)),
        teacher_logprobs[:, 1:].reshape(-1, teacher_logprobs.size(-1)),
        mask,
        kind,
        beta,
        weights[:, 1:].reshape(-1) if weights is not None else None,
    )
    return (1 - kd_weight) * ce + kd_weight * kd, {"ce": float(ce.detach()), "kd": float(kd.detach())}
