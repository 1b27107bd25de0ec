"""The client templates of OUT's captured calls (`llm.client_template`), one per operation: mined once from the
recorded calls, kept under OUT/templates/, and then held fixed. A later call that does not match (a new client
release) is counted and kept out of training, not folded into a new template behind the user's back; `memlora
templates --remine` mines a new version on purpose (the earlier ones stay in the file)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from memlora.config import OPERATIONS, Config
from memlora.layout import templates_path, trace_files
from memlora.llm.client_template import (
    ClientTemplate, TemplateError, changing_parts, current, mine, read_versions, store,
)
from memlora.memory.prompts import is_own_prompt
from memlora.student.examples import load_traces

MINE_AT_MOST = 500  # calls a template is mined from (the first ones recorded): the fixed part does not need more


def captured_calls(out: str | Path, operation: str) -> list[list[dict]]:
    """The messages of OUT's recorded calls of `operation` that our own memory system did not make."""
    table = load_traces(trace_files(out, operation))
    return [messages for messages in table.column("messages").to_pylist() if not is_own_prompt(operation, messages)]


def rule_text(config: Config, operation: str) -> str:
    rules = [r.model_dump(exclude_none=True, exclude={"output_schema"}) for r in config.capture.rules
             if r.operation == operation]
    return json.dumps(rules)


def ensure_templates(config: Config, out: str | Path, operations=OPERATIONS, *, remine: bool = False,
                     strict: bool = False, on_line: Callable[[str], None] = print) -> dict[str, ClientTemplate]:
    """The current template of each operation with captured calls, mined where there is none yet (or
    `remine`). An operation whose calls give no template keeps the whole prompt, said loudly (`strict`: the
    TemplateError is raised)."""
    templates = {}
    for op in operations:
        path = templates_path(out, op)
        stored = current(path)
        if stored is not None and not remine:  # held fixed: the traces are read only to mine one
            templates[op] = stored
            continue
        calls = captured_calls(out, op)
        if not calls:
            continue
        try:
            template = mine(op, calls[:MINE_AT_MOST], config.capture.template_min_calls, rule_text(config, op))
        except TemplateError as err:
            if strict:
                raise
            on_line(f"WARNING {err}")
            continue
        if store(path, template):
            on_line(f"{op}: client template {template.fingerprint} mined from {template.calls} calls "
                    f"({template.fixed_lines} fixed lines) -> {path}")
        templates[op] = template
    return templates


def template_for(config: Config, out: str | Path, operation: str) -> ClientTemplate | None:
    """The template an expert of `operation` trains on: only with `student.prompt: minimal`."""
    if config.student is None or config.student.prompt != "minimal":
        return None
    return current(templates_path(out, operation))


@dataclass(frozen=True)
class TemplateReport:
    operation: str
    template: ClientTemplate
    versions: int
    calls: int           # captured calls of the operation in OUT now
    matching: int        # of them, calls the template reduces
    whole_tokens: float  # mean tokens per call: the client's whole prompt
    reduced_tokens: float  # what the expert reads (the instruction line and the changing parts)
    example: str         # the changing parts of the first matching call


def report(config: Config, out: str | Path, tokenizer, instruction: Callable[[str], str]) -> list[TemplateReport]:
    """What `memlora templates` shows: per operation, the template, how many calls it matches, and the tokens a
    call costs whole vs reduced (chat template applied)."""
    reports = []
    for op in OPERATIONS:
        path = templates_path(out, op)
        template = current(path)
        if template is None:
            continue
        calls = captured_calls(out, op)
        whole, reduced, example = [], [], None
        for messages in calls:
            parts = changing_parts(template, messages)
            if parts is None:
                continue
            example = parts if example is None else example
            reduced.append(_tokens(tokenizer, [{"role": "system", "content": instruction(op)},
                                               {"role": "user", "content": parts}]))
            whole.append(_tokens(tokenizer, messages))
        reports.append(TemplateReport(op, template, len(read_versions(path)["versions"]), len(calls), len(whole),
                                      sum(whole) / len(whole) if whole else float("nan"),
                                      sum(reduced) / len(reduced) if reduced else float("nan"), example or ""))
    return reports


def _tokens(tokenizer, messages: list[dict]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


__all__ = ["TemplateError", "captured_calls", "ensure_templates", "report", "template_for"]
