"""The student base model: any causal LM, or a layer-pruned copy of the teacher that keeps its tokenizer.

A pruned student is made once and saved as a safetensors folder (`OUT/student/base/`); later stages and
reruns load that folder, so every stage sees the very same weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from memlora.config import OPERATIONS, Config, PruneConfig
from memlora.data.io import publishing
from memlora.jobs import write_job
from memlora.layout import student_dir, trace_files
from memlora.llm.hf_backend import load_causal_lm
from memlora.models import resolve
from memlora.student.examples import load_traces
from memlora.student.launch import deepspeed_command, run_ranks

MARKER = "memlora_student.json"


@torch.no_grad()
def angular_distances(model, rows: list[list[int]], n: int) -> list[float]:
    """For each start l, the mean angular distance (arccos of the cosine, over pi) between the hidden state
    entering layer l and the one leaving layer l+n-1, over every token of `rows` (Gromov et al. 2024: the block
    that changes the residual stream least is the one to drop). Blocks that would include the last layer are
    not scored: its output goes through the final norm, and it is always kept."""
    n_layers = model.config.num_hidden_layers
    starts = range(0, n_layers - n)  # l + n <= n_layers - 1
    totals = [0.0] * len(starts)
    count = 0
    model.eval()
    for ids in rows:
        # The decoder body alone: the output head's logits (a fifth of the teacher's forward) are not needed.
        hidden = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False).hidden_states
        for i, l in enumerate(starts):
            a, b = hidden[l][0].float(), hidden[l + n][0].float()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
            totals[i] += float((torch.arccos(cos) / torch.pi).sum())
        count += len(ids)
    return [t / max(count, 1) for t in totals]


def probe_rows(out: str | Path, tokenizer, limit: int, max_tokens: int = 512) -> list[list[int]]:
    """Token ids of the teacher's own calls (prompt + output), spread over the operations: what the student
    will read and write."""
    per_op = []
    for op in OPERATIONS:
        rows = load_traces(trace_files(out, op)).to_pylist()
        per_op.append([tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
                       + r["raw_output"] for r in rows])
    from itertools import chain, zip_longest

    texts = [t for t in chain.from_iterable(zip_longest(*per_op)) if t is not None][:limit]  # round robin
    return [tokenizer(t, add_special_tokens=False)["input_ids"][-max_tokens:] for t in texts]


def choose_drop(scores: list[float], n: int) -> list[int]:
    start = min(range(len(scores)), key=scores.__getitem__)
    return list(range(start, start + n))


def keep_layers(n_layers: int, prune: PruneConfig, scores: list[float] | None = None) -> list[int]:
    if prune.drop is not None:
        if not 0 < prune.drop < n_layers - 1:
            raise ValueError(f"student.prune.drop: {prune.drop} layers cannot be dropped from a {n_layers}-layer "
                             "teacher (one layer and the last one stay)")
        if scores is None:
            raise ValueError("student.prune.drop needs angular-distance scores (teacher traces to measure on)")
        dropped = set(choose_drop(scores, prune.drop))
        return [i for i in range(n_layers) if i not in dropped]
    if prune.keep_layers is not None:
        bad = [i for i in prune.keep_layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"student.prune.keep_layers: {bad} out of range for a {n_layers}-layer teacher")
        return sorted(set(prune.keep_layers))
    keep = list(range(0, n_layers, prune.every))
    if keep[-1] != n_layers - 1:
        keep[-1] = n_layers - 1  # the last layer shapes the output distribution the most: always keep it
    return keep


def prune_layers(model, keep: list[int]):
    """Keep only the listed decoder layers, renumbered so the KV cache indexes them right."""
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def shares_teacher_tokenizer(config: Config, tokenizer) -> bool:
    """Whether the teacher's token ids (and so its top-k log-probs) mean the same tokens to the student: always
    for a pruned teacher; for another model, when both tokenizers have the very same vocabulary."""
    if config.student is not None and config.student.prune is not None:
        return True
    try:
        from transformers import AutoTokenizer

        ref = resolve(config.teacher.tokenizer or config.teacher.model)
        teacher = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=config.teacher.trust_remote_code,
                                                **ref.pretrained_kwargs())
    except Exception:  # an HTTP teacher's model name, or a hub the machine cannot reach: assume not
        return False
    return teacher.get_vocab() == tokenizer.get_vocab()


def build_student(config: Config, out: str | Path, on_line: Callable[[str], None] = print) -> Path:
    """Return a folder `from_pretrained` can load: the configured model, or the pruned teacher (made once,
    healed once where `student.heal` says so)."""
    student = config.student
    if student is None:
        raise ValueError("config has no `student` section")
    if student.prune is None:
        return Path(student.model)  # a hub id or folder; loaded as it is
    target = student_dir(out)
    marker = target / MARKER
    recipe = {"teacher": config.teacher.model, "prune": student.prune.model_dump(by_alias=True)}
    if student.heal is not None:
        recipe["heal"] = student.heal.model_dump()
    if marker.is_file() and json.loads(marker.read_text())["recipe"] == recipe:
        return target
    model, tokenizer, _ = load_causal_lm(config.teacher.model, tokenizer_ref=config.teacher.tokenizer,
                                         dtype="float32", device="cpu",
                                         trust_remote_code=config.teacher.trust_remote_code)
    n_layers = model.config.num_hidden_layers
    scores = None
    if student.prune.drop is not None:
        rows = probe_rows(out, tokenizer, student.prune.probe_rows)
        if not rows:
            raise ValueError(f"{Path(out) / 'traces'}: no teacher traces to choose the layers to drop on "
                             "(run `memlora traces` first)")
        scores = angular_distances(model, rows, student.prune.drop)
    keep = keep_layers(n_layers, student.prune, scores)
    prune_layers(model, keep)
    # A GGUF teacher arrives dequantized but still tagged with its quantizer, which refuses to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # A healed student is cut into a work folder first; healing writes the base from it.
    cut = target.parent / ".pruned" if student.heal is not None else target
    with publishing(cut) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"recipe": recipe, "kept_layers": keep, "teacher_layers": n_layers,
                                              "angular_distance_by_start": scores,
                                              "parameters": sum(p.numel() for p in model.parameters())}, indent=2))
    if student.heal is not None:
        del model
        heal(config, out, cut, target, on_line)
        shutil.rmtree(cut, ignore_errors=True)
    return target


def heal(config: Config, out: str | Path, cut: Path, target: Path, on_line: Callable[[str], None]) -> dict:
    """Heal through the same DeepSpeed launcher as the experts, handing the ranks a job file."""
    job = write_job(config, out, "heal", task="heal", base=str(cut.resolve()), target=str(target.resolve()))
    cmd, env = deepspeed_command(config, ["--job", str(job)])
    record = run_ranks(config, cmd, env, "heal", on_line)
    on_line(f"healed student base: teacher-student KL on held-out text {record['kl_before']} -> "
            f"{record['kl_after']} ({record['train_tokens']} tokens, {record['train_time_s']} s)")
    return record
