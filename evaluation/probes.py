"""Memory and size probes for the process that runs one system.

Peak RSS is read from `/proc/self/status` (VmHWM, the high-water mark of this process image). `getrusage`'s
`ru_maxrss` is recorded too, but on Linux it is inherited across fork/vfork + exec: a child started by a
parent that had reached 600 MB reports at least 600 MB (measured here), so it cannot tell apart systems started
from the same parent. Each system runs in its own process (see `runner`), so VmHWM is that system's own peak.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path

MiB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def ru_maxrss_mb() -> float:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / MiB if sys.platform == "darwin" else value / 1024  # bytes on macOS, KiB on Linux


def peak_rss_mb() -> float:
    """This process image's peak resident set size (VmHWM), falling back to ru_maxrss off Linux."""
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else ru_maxrss_mb()


def current_rss_mb() -> float:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def cuda_peaks_mb() -> dict[str, float] | None:
    """Peak CUDA memory allocated / reserved by torch in this process, or None without a GPU."""
    if "torch" not in sys.modules:
        return None
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return {"allocated": torch.cuda.max_memory_allocated() / MiB, "reserved": torch.cuda.max_memory_reserved() / MiB}


def parameter_counts(model) -> dict[str, int]:
    """Parameters of the base model and of every attached peft adapter (whatever the adapters are named:
    peft keys each adapter's tensors by its name, the last or a middle component of the parameter name)."""
    names = tuple(getattr(model, "peft_config", {}) or ())
    base = adapters = 0
    for name, param in model.named_parameters():
        parts = name.split(".")
        if names and any(a in parts for a in names):
            adapters += param.numel()
        else:
            base += param.numel()
    return {"base": base, "adapters": adapters}


def folder_bytes(folder: str | Path) -> int:
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def process_info() -> dict:
    return {"pid": os.getpid(), "ppid": os.getppid(), "python": platform.python_version(),
            "platform": platform.platform()}


def snapshot(label: str) -> dict:
    """RSS now and so far, under a label (e.g. after imports, after the model loaded, at the end)."""
    return {"label": label, "rss_mb": current_rss_mb(), "peak_rss_mb": peak_rss_mb(), "ru_maxrss_mb": ru_maxrss_mb()}
