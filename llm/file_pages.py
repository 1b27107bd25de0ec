"""Give back the pages of weights that were quantized: a model loaded from safetensors reads its float32 weights
from a memory-mapped file, and those pages stay in the process's resident memory (copy-on-write pages too, where
the weights were changed in place) as long as anything else of the file is mapped, freed tensor or not. An int8
student whose float32 weights stayed resident would need more memory than the float32 one (measured: peak RSS
2,401 MiB against 1,970, docs/results.md)."""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import torch

MADV_DONTNEED = 4  # Linux: the range's pages leave the process; a private file mapping reads the file again


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of a file (not anonymous memory, heap or stack)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def release_file_pages(tensors: list[torch.Tensor], live: list[torch.Tensor]) -> int:
    """Drop from this process the pages that lie wholly inside one of `tensors` where that tensor is memory-mapped
    from a file, unless one of `live` (what the model still reads) shares its bytes. The caller never reads
    `tensors` again. Returns the bytes released (0 off Linux, or where nothing is file-backed: memory of its own
    is freed with the tensor)."""
    if not sys.platform.startswith("linux") or not tensors:
        return 0
    mappings = _file_mappings()
    kept = [_span(t) for t in live if t.device.type == "cpu" and t.numel()]
    page = mmap.PAGESIZE
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            continue
        start, end = _span(tensor)
        if not any(lo <= start and end <= hi for lo, hi in mappings):
            continue  # anonymous memory: freed with the tensor, and never to be zeroed under another owner
        if any(lo < end and start < hi for lo, hi in kept):
            continue  # tied: the model still reads these bytes
        first, last = -(-start // page) * page, end // page * page
        if last > first and madvise(first, last - first, MADV_DONTNEED) == 0:
            released += last - first
    return released


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer a model still holds (plain tensors; packed int8 weights are not among them)."""
    return [t.detach() for t in (*model.parameters(), *model.buffers())]


def trim_heap() -> None:
    """Hand the heap's free pages back (glibc's malloc_trim; a no-op elsewhere): building int8 variants frees the
    float32 adapters and merge buffers in small pieces the allocator would otherwise keep (125 MiB on the 26-layer
    student), and a served model replaced by a reload leaves its whole heap behind (~430 MiB, `llm.reload`)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library (musl): nothing to trim with
            pass
