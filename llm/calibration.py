"""What int8 smoothing is calibrated on: the inputs a model will serve, not generic text (the memory prompts'
outlier channels are the ones that must survive rounding)."""

from __future__ import annotations

import torch

from memlora.memory.prompts import templates as teacher_templates


def calibration_ids(tokenizer) -> list[torch.Tensor]:
    """Each operation's teacher prompt with its few-shot examples (instructions, conversation text, JSON
    answers), chat-formatted, as token ids."""
    texts = [tokenizer.apply_chat_template(t.messages(t.shots[0][0]), tokenize=False, add_generation_prompt=True)
             for t in teacher_templates().values()]
    return [torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
