"""What this machine's CPU offers: its name and its bfloat16 units (AVX512-BF16, AMX).

Both the benches (which print it beside their ratios) and training (which multiplies in bfloat16 only where
such units exist) read it; without them bfloat16 matrix products are emulated and no faster than float32."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=1)
def cpu_model() -> dict:
    """{"cpu": model name, "bf16_units": sorted flags}; empty where /proc/cpuinfo is not there (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    return {"cpu": fields.get("model name", ""), "bf16_units": sorted(flags & BF16_FLAGS)}


def has_bf16_units() -> bool:
    return bool(cpu_model().get("bf16_units"))
