"""Export experts as plain LoRA adapters (peft's conversion), for servers that only speak multi-LoRA."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel
from peft.tuners.lora.conversion import convert_to_lora
from safetensors.torch import save_file

from memlora.student.build import student_dir
from memlora.student.experts import adapter_name, verified_expert_folders
from memlora.teacher.hf_backend import load_causal_lm


def default_base(out: str | Path, experts: dict[str, Path]) -> str:
    """OUT/student/base for a pruned student; otherwise the base the experts were trained on."""
    if (student_dir(out) / "config.json").is_file():
        return str(student_dir(out))
    for folder in experts.values():
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base:
            return base
    raise FileNotFoundError(f"{student_dir(out)}: no student base; give it with --base")


def export_lora(out: str | Path, base: str | Path | None = None, rank: int | None = None) -> dict[str, Path]:
    """Write OUT/export/lora/<op>/ for every trained expert, each a standard LoRA adapter folder.

    DeLoRA's update B diag(.) A has rank r, so a rank-r LoRA (the default: the expert's own r) reproduces it up
    to float error; a smaller `rank` keeps the top singular directions (peft's SVD conversion)."""
    experts = verified_expert_folders(out)
    if not experts:
        return {}
    base = str(base or default_base(out, experts))
    model, _, _ = load_causal_lm(base, dtype="float32", device="cpu")  # once, with every expert attached
    peft_model = None
    for op, folder in experts.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name(op),
                                                   use_safetensors=True)
        else:
            peft_model.load_adapter(str(folder), adapter_name=adapter_name(op), use_safetensors=True)
    written = {}
    for op, folder in experts.items():
        r = rank or json.loads((folder / "adapter_config.json").read_text())["r"]
        lora_config, state_dict = convert_to_lora(peft_model, r, adapter_name=adapter_name(op))
        lora_config.base_model_name_or_path = base
        lora_config.task_type = "CAUSAL_LM"
        target = Path(out) / "export" / "lora" / op
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{op}.", dir=target.parent))
        old = target.parent / f".old-{op}"
        try:
            lora_config.save_pretrained(str(tmp))
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "adapter_model.safetensors"),
                      metadata={"format": "pt"})
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                target.rename(old)
            tmp.rename(target)  # rename only: a reader sees the old adapter or the new one, whole
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        written[op] = target
    return written
