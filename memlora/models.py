"""Resolve the model references a config may hold, so that a package-bundled model works offline.

A reference is a hub id or a local folder, a local `.gguf` file, or `pkg:<package>[/<file>]`: a model
shipped inside an installed Python package. The package is located, never imported, because some such
packages import things their `--no-deps` install does not bring.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

# Offline by default: a bundled model must never wait on a hub that cannot be reached. Every entry point
# (the CLI, `make serve`'s worker, the evaluation processes, the benches) sets these, unless the user did.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def go_offline() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


class ModelRefError(ValueError):
    pass


@dataclass(frozen=True)
class ModelRef:
    """Where `from_pretrained` should look: a folder or hub id, plus a GGUF file name inside it if any."""

    path: str
    gguf_file: str | None = None
    ref: str | None = None  # the reference as configured

    @property
    def model_id(self) -> str:
        """What rows and reports record: a packaged model by its `pkg:` reference (the same on every machine,
        as the release card names it), anything else by where it was loaded from."""
        if self.ref and self.ref.startswith("pkg:"):
            return self.ref
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path

    def pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelRefError(f"model package {name!r} is not installed (see the Makefile's setup step)")
    return Path(list(spec.submodule_search_locations)[0])


def resolve(ref: str) -> ModelRef:
    if ref.startswith("pkg:"):
        package, _, inner = ref[4:].partition("/")
        folder = package_dir(package)
        target = folder / inner if inner else folder
        if not target.exists():
            raise ModelRefError(f"{ref}: {target} does not exist")
        if target.is_dir():
            return ModelRef(str(_model_folder(target)), ref=ref)
        return ModelRef(str(target.parent), target.name if target.suffix == ".gguf" else None, ref=ref)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelRefError(f"{ref}: GGUF file not found")
        return ModelRef(str(path.parent.resolve()), path.name)
    if path.is_dir():
        return ModelRef(str(path.resolve()))
    if ref.startswith((".", "/", "~")):
        raise ModelRefError(f"{ref}: local model folder not found")
    return ModelRef(ref)  # a hub id; loading it needs the hub or its cache


def _model_folder(folder: Path) -> Path:
    """A package may keep its model one level down (e.g. `<package>/model/`)."""
    if (folder / "config.json").exists() or (folder / "modules.json").exists():
        return folder
    candidates = [p.parent for p in folder.glob("*/config.json")] + [p.parent for p in folder.glob("*/modules.json")]
    if not candidates:
        raise ModelRefError(f"{folder}: no model folder (config.json or modules.json) found in it")
    return sorted(set(candidates))[0]
