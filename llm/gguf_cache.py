"""A GGUF model converted once into a safetensors folder, then loaded from there.

transformers de-quantizes a GGUF file's weights and rebuilds its tokenizer from the GGUF vocabulary on every
load: 38 s for the bundled teacher on 2 CPU cores (12 s tokenizer, 26 s weights), paid by the traces flow, the
student build and every evaluation process. The converted folder (float32 weights exactly as de-quantized,
the tokenizer as transformers rebuilt it) loads in a few seconds. It is keyed by the GGUF file's sha256, so a
changed file is converted again, and published atomically, so a half-written folder is never read.

Where: `$MEMLORA_CACHE_DIR`, else `$XDG_CACHE_HOME/memlora`, else `~/.cache/memlora` (about 4 bytes per
parameter: 540 MB for the bundled teacher). `MEMLORA_GGUF_CACHE=0` turns it off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from memlora.data.io import publishing, sha256_file
from memlora.models import ModelRef

MARKER = "memlora_gguf.json"


def cache_root() -> Path:
    if os.environ.get("MEMLORA_CACHE_DIR"):
        return Path(os.environ["MEMLORA_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "memlora"


def enabled() -> bool:
    return os.environ.get("MEMLORA_GGUF_CACHE", "1") != "0"


def converted(ref: ModelRef, *, trust_remote_code: bool = False) -> Path:
    """The safetensors folder of `ref`'s GGUF file, converted now if it is not in the cache yet."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(ref.path) / ref.gguf_file
    sha256 = sha256_file(source)
    folder = cache_root() / "gguf" / f"{source.stem}-{sha256[:16]}"
    if _complete(folder, sha256):
        return folder
    kwargs = dict(gguf_file=ref.gguf_file, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(ref.path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32, **kwargs)
    # The weights are plain float32 now; without this transformers refuses to save a GGUF-loaded model.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    try:
        with publishing(folder) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            (staging / MARKER).write_text(json.dumps({"source": str(source), "sha256": sha256}, indent=2) + "\n")
    except OSError:
        if not _complete(folder, sha256):  # another process published it first: use theirs
            raise
    return folder


def _complete(folder: Path, sha256: str) -> bool:
    try:
        return json.loads((folder / MARKER).read_text())["sha256"] == sha256
    except (OSError, ValueError, KeyError):
        return False
