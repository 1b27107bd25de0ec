"""Export experts as plain LoRA adapters (peft's conversion), for servers that only speak multi-LoRA."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel
from peft.tuners.lora.conversion import convert_to_lora
from safetensors.torch import save_file

from memlora.config import OPERATIONS
from memlora.student.experts import adapter_dir, is_complete_adapter
from memlora.teacher.hf_backend import load_causal_lm


def export_lora(out: str | Path, base: str | Path, rank: int | None = None) -> dict[str, Path]:
    """Write OUT/export/lora/<op>/ for every trained expert; DeLoRA's update has rank r, so rank r is exact."""
    written = {}
    for op in OPERATIONS:
        source = adapter_dir(out, op)
        if not is_complete_adapter(source):
            continue
        model, _, _ = load_causal_lm(str(base), dtype="float32", device="cpu")
        peft_model = PeftModel.from_pretrained(model, str(source), use_safetensors=True)
        r = rank or json.loads((source / "adapter_config.json").read_text())["r"]
        lora_config, state_dict = convert_to_lora(peft_model, r)
        target = Path(out) / "export" / "lora" / op
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{op}.", dir=target.parent))
        try:
            lora_config.base_model_name_or_path = str(base)
            lora_config.save_pretrained(str(tmp))
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "adapter_model.safetensors"))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        written[op] = target
    return written
