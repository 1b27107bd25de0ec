"""Versions of the served experts: what `improve` promotes and `rollback` brings back.

OUT/adapters/<op>/ is what serves (what serve-experts loads and hot-reloads). Every promotion first snapshots the
set it replaces, then installs the new one: OUT/versions/<id>/adapters/<op>/ with a version.json naming each
file's sha256, so an earlier version can come back exactly, and a version whose files changed is refused
(naming the file). Installing replaces each adapter file atomically and rewrites OUT/manifest.json last: the
manifest is what a server's reload keys on, so it never loads half a version.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from memlora.data.io import sha256_file, write_json
from memlora.layout import adapter_dir, version_dir, versions_root
from memlora.manifest import UntrustedArtifact, update_manifest
from memlora.student.experts import ADAPTER_FILES, expert_folders

KEPT_FILES = (*ADAPTER_FILES, "training.json")


def versions(out: str | Path) -> list[str]:
    root = versions_root(out)
    return sorted(p.name for p in root.iterdir() if (p / "version.json").is_file()) if root.is_dir() else []


def snapshot(out: str | Path, note: str) -> str:
    """Copy the served experts into a new version folder (written under a temporary name, then renamed)."""
    folders = expert_folders(out)
    number = len(versions(out)) + 1
    version = f"v{number:04d}-{time.strftime('%Y%m%dT%H%M%S')}"
    final = version_dir(out, version)
    staging = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    files = {}
    for op, folder in folders.items():
        (staging / "adapters" / op).mkdir(parents=True)
        for name in KEPT_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, staging / "adapters" / op / name)
                files[f"adapters/{op}/{name}"] = sha256_file(folder / name)
    write_json({"version": version, "note": note, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "operations": sorted(folders), "files": files}, staging / "version.json")
    os.replace(staging, final)
    return version


def verified_version(out: str | Path, version: str) -> dict[str, Path]:
    """A version's adapter folders, each file checked against its version.json (UntrustedArtifact names it)."""
    folder = version_dir(out, version)
    if not (folder / "version.json").is_file():
        known = ", ".join(versions(out)) or "none"
        raise UntrustedArtifact(f"{folder}: no such version (versions: {known})")
    record = json.loads((folder / "version.json").read_text())
    for rel, digest in record["files"].items():
        path = folder / rel
        if not path.is_file() or sha256_file(path) != digest:
            raise UntrustedArtifact(f"{path}: differs from {folder / 'version.json'}; refusing to install it")
    return {op: folder / "adapters" / op for op in record["operations"]}


def install(out: str | Path, sources: dict[str, Path]) -> None:
    """Serve `sources` (operation -> adapter folder) from OUT/adapters: each file replaced atomically, the
    manifest rewritten last. Operations not named keep their current expert."""
    for op, source in sources.items():
        target = adapter_dir(out, op)
        target.mkdir(parents=True, exist_ok=True)
        for name in KEPT_FILES:
            if (Path(source) / name).is_file():
                tmp = target / f".{name}.installing"
                shutil.copy2(Path(source) / name, tmp)
                os.replace(tmp, target / name)
    update_manifest(out)


def rollback(out: str | Path, version: str) -> list[str]:
    """Serve an earlier version again (the current one is snapshotted first, so a rollback can be undone)."""
    sources = verified_version(out, version)
    snapshot(out, f"before rollback to {version}")
    install(out, sources)
    return sorted(sources)
