"""Memory and size probes for the process that runs one system.

Peak RSS is read from `/proc/self/status` (VmHWM, the high-water mark of this process image). `getrusage`'s
`ru_maxrss` is recorded too, but on Linux it is inherited across fork/vfork + exec: a child started by a
parent that had reached 600 MB reports at least 600 MB (measured here), so it cannot tell apart systems started
from the same parent. Each system runs in its own process (see `evaluation/process.py`), so VmHWM is that
system's own peak.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from memlora.data.io import write_json

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


def restart_peak() -> bool:
    """Start VmHWM again from the current RSS (Linux 4.0+, /proc/self/clear_refs), so that a phase's own peak
    can be read; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


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
    peft keys each adapter's tensors by its name, the last or a middle component of the parameter name), an
    expert folded beside its layer (`llm.quantize.BesideLinear`) counted by its pair."""
    names = tuple(getattr(model, "peft_config", {}) or ())
    base = 0
    adapters = sum(getattr(module, "pair_numel", 0) for module in model.modules())
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


class Probe(BaseModel):
    """What one evaluation process recorded about itself (OUT/eval/systems/<system>/probe.json): which model,
    where, how big, how long and how much memory. The judge's also has `model`, `asked` and `rows`; fields
    this class does not name are kept as they are."""

    model_config = ConfigDict(extra="allow")

    system: str
    pid: int
    ppid: int | None = None
    model_id: str | None = None
    backend: str | None = None
    device: str | None = None
    dtype: str | None = None
    parameters: dict | None = None        # base / adapters parameter counts
    adapters: dict = {}                   # operation -> {bytes, tensors, ...} of each expert loaded
    adapter_switches: int | None = None
    experts_design: str | None = None     # merged / beside, folded / beside (run_system.expert_design)
    batching: str | None = None           # running (calls join between decode steps) / merged
    load_s: float | None = None
    after_load: dict | None = None        # memory snapshot once the model is loaded
    baseline: dict | None = None          # memory snapshot after importing the runtime
    timings: dict = {}
    calls: dict = {}                      # phase -> calls made
    questions: int | None = None
    conversations: list[str] = []
    peak_rss_mb: float | None = None      # VmHWM: this process's own peak
    peak_rss_e2e_mb: float | None = None  # the end-to-end phase's own peak, from the loaded model, heap trimmed
    ru_maxrss_mb: float | None = None     # inherited across fork/exec on Linux: for reference only
    cuda_peak_mb: dict | None = None
    wall_s: float | None = None
    cache_key: str | None = None          # the inputs it measured (evaluation/cache.py)
    kept: bool = False                    # not run now: an earlier run's, same cache key (never written)

    @classmethod
    def read(cls, path: str | Path) -> "Probe":
        return cls.model_validate_json(Path(path).read_text())

    def write(self, path: str | Path) -> Path:
        return write_json(self.model_dump(mode="json", exclude={"kept"}), path)

