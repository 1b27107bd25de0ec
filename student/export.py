"""Export experts as plain LoRA adapters, for servers that only speak multi-LoRA."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file

from memlora.data.io import publishing, write_json
from memlora.layout import export_dir, student_dir
from memlora.llm.hf_backend import load_causal_lm
from memlora.manifest import update_manifest
from memlora.memory.prompts import STUDENT_SYSTEM
from memlora.student.experts import TEMPLATE_FILE, adapter_name, verified_expert_folders
from memlora.student.records import TRAINING_FILE, TrainingRecord


def portable_base(base: str | Path, out: str | Path) -> str:
    """A base inside OUT is recorded relative to OUT (`student/base`), so a copied OUT does not point back at
    this machine's folder; any other base (a hub id, a folder elsewhere) as it was given."""
    try:
        return Path(base).resolve().relative_to(Path(out).resolve()).as_posix()
    except (ValueError, OSError):
        return str(base)


def recorded_base(recorded: str, out: str | Path) -> str:
    """The inverse of portable_base: a relative base that exists under OUT is that folder."""
    path = Path(recorded)
    if not path.is_absolute() and (Path(out) / path / "config.json").is_file():
        return str(Path(out) / path)
    return recorded


def default_base(out: str | Path, experts: dict[str, Path]) -> str:
    """OUT/student/base for a pruned student; otherwise the base the experts were trained on."""
    if (student_dir(out) / "config.json").is_file():
        return str(student_dir(out))
    for folder in experts.values():
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base:
            return recorded_base(base, out)
    raise FileNotFoundError(f"{student_dir(out)}: no student base; give it with --base")


@torch.no_grad()
def delora_as_lora(peft_model, adapter: str) -> tuple[list[str], dict[str, torch.Tensor], int]:
    """DeLoRA's update is B diag(lambda / r / (|a_i| |b_i|)) A, each input column scaled by the base weight's
    norm: a rank-r product, so a rank-r LoRA with B' = B diag(.), A' = A diag(w_norm) and scaling 1 is the very
    same update, written in milliseconds (peft's generic conversion takes an SVD of every delta weight)."""
    from peft.tuners.delora.layer import DeloraLayer

    targets, state, rank = set(), {}, 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, DeloraLayer) or adapter not in module.delora_A:
            continue
        a, b = module.delora_A[adapter].float(), module.delora_B[adapter].float()
        r = module.r[adapter]
        scale = module.delora_lambda[adapter].float() / r / (a.norm(dim=1).clamp(min=1e-4) * b.norm(dim=0).clamp(min=1e-4))
        state[f"{name}.lora_A.weight"] = (a * module.delora_w_norm[adapter].float().unsqueeze(0)).contiguous()
        state[f"{name}.lora_B.weight"] = (b * scale.unsqueeze(0)).contiguous()
        targets.add(name.rsplit(".", 1)[-1])
        rank = r
    return sorted(targets), state, rank


class ExportRefused(ValueError):
    """An expert that cannot be written as a LoRA adapter; the message names it and its method."""


@torch.no_grad()
def ether_as_lora(peft_model, adapter: str) -> tuple[list[str], dict[str, torch.Tensor], int]:
    """ETHER turns W into W (I - 2 u u^T) with u of unit length, so it adds -2 (W u) u^T: a rank-1 product. A rank-1
    LoRA with A = u^T, B = -2 W u and scaling 1 is the same update, exactly (for this base's W)."""
    from peft.tuners.hra.layer import HRALayer

    targets, state = set(), {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, HRALayer) or adapter not in module.hra_u:
            continue
        if module.hra_r[adapter] != 1:
            raise ExportRefused(f"{adapter}: an HRA adapter with r={module.hra_r[adapter]} is not ETHER (r=1); "
                                "it has no closed form here")
        u = module.hra_u[adapter].float()[:, 0]
        u = u / u.norm()
        weight = module.get_base_layer().weight.float()
        state[f"{name}.lora_A.weight"] = u.unsqueeze(0).contiguous()
        state[f"{name}.lora_B.weight"] = (-2.0 * (weight @ u)).unsqueeze(1).contiguous()
        targets.add(name.rsplit(".", 1)[-1])
    return sorted(targets), state, 1


CLOSED_FORMS = {"DELORA": delora_as_lora, "HRA": ether_as_lora}  # peft_type -> its exact rank-r LoRA


# What an exported expert must be sent. A multi-LoRA server passes a client's messages through unchanged, and an
# expert trained on the minimal prompt answers the teacher's worse: the embedded default's update expert, sent
# the teacher's prompt, said DELETE to 5 of 8 calls where the teacher said NONE; sent its own, to 1 (free
# decoding, 2026-12-08).
PROMPT_FILE = "prompt.json"


def expert_prompt(operation: str, folder: Path) -> dict:
    """`prompt.json` of an exported expert: the prompt it was trained to read, as a client must build it."""
    record = folder / TRAINING_FILE
    trained = TrainingRecord.read(record).prompt if record.is_file() else "teacher"
    if trained != "minimal":
        return {"operation": operation, "reads": "teacher", "system": None,
                "how": "send the call as the teacher gets it: the expert was trained on the teacher's own prompt"}
    if (folder / TEMPLATE_FILE).is_file():
        return {"operation": operation, "reads": "reduced", "system": STUDENT_SYSTEM[operation],
                "how": f"a captured client's call cut by {TEMPLATE_FILE} to the lines that change, after this "
                       "system line (what `memlora serve-experts` does); a server that passes the client's "
                       "prompt through unchanged gives the expert a prompt it did not learn"}
    return {"operation": operation, "reads": "minimal", "system": STUDENT_SYSTEM[operation],
            "how": "messages [{role: system, content: <system>}, <the teacher call's last user message>]: the "
                   "teacher's instructions and examples are what the expert learnt; sending them again makes "
                   "its answers worse"}


def export_lora(out: str | Path, base: str | Path | None = None, rank: int | None = None,
                on_line: Callable[[str], None] = lambda line: None) -> dict[str, Path]:
    """Write OUT/export/lora/<op>/ for every trained expert, each a standard LoRA adapter folder.

    A DeLoRA expert at its own rank and an ETHER expert are converted exactly, in closed form (delora_as_lora,
    ether_as_lora); a smaller `rank`, or another adapter type, goes through peft's SVD conversion, which keeps the
    top singular directions, and a type peft cannot convert is refused (ExportRefused, naming it)."""
    experts = verified_expert_folders(out)
    if not experts:
        return {}
    base = str(base or default_base(out, experts))
    started = time.perf_counter()
    model, _, _ = load_causal_lm(base, dtype="float32", device="cpu")  # once, with every expert attached
    peft_model = None
    for op, folder in experts.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name(op),
                                                   use_safetensors=True)
        else:
            peft_model.load_adapter(str(folder), adapter_name=adapter_name(op), use_safetensors=True)
    on_line(f"loaded the base and {len(experts)} experts in {time.perf_counter() - started:.1f} s")
    written = {}
    for op, folder in experts.items():
        began = time.perf_counter()
        settings = json.loads((folder / "adapter_config.json").read_text())
        closed_form = CLOSED_FORMS.get(settings["peft_type"])
        if closed_form is not None and (rank is None or rank >= settings["r"]):
            targets, state, r = closed_form(peft_model, adapter_name(op))
            lora_config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets)
        else:
            from peft.tuners.lora.conversion import convert_to_lora

            try:
                lora_config, state = convert_to_lora(peft_model, rank or settings["r"],
                                                     adapter_name=adapter_name(op))
            except TypeError as err:  # a method peft cannot convert
                raise ExportRefused(f"{folder}: a {settings['peft_type']} expert cannot be written as LoRA ({err})") \
                    from None
        lora_config.base_model_name_or_path = portable_base(base, out)
        lora_config.task_type = "CAUSAL_LM"
        target = export_dir(out, "lora", op)
        with publishing(target) as tmp:
            lora_config.save_pretrained(str(tmp))
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"),
                      metadata={"format": "pt"})
            prompt = expert_prompt(op, folder)
            write_json(prompt, tmp / PROMPT_FILE)
            if (folder / TEMPLATE_FILE).is_file():
                shutil.copy2(folder / TEMPLATE_FILE, tmp / TEMPLATE_FILE)
        on_line(f"{op}: LoRA r={lora_config.r} written in {time.perf_counter() - began:.1f} s -> {target} "
                f"(reads the {prompt['reads']} prompt: {PROMPT_FILE})")
        written[op] = target
    if written:
        update_manifest(out)  # exported adapters are artifacts too: `memlora verify OUT` checks them
    return written
