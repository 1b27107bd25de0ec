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

from memlora.data.io import atomic_path, sha256_file, write_json
from memlora.layout import adapter_dir, deferral_path, version_dir, versions_root
from memlora.manifest import UntrustedArtifact, update_manifest
from memlora.student.experts import ADAPTER_FILES, TEMPLATE_FILE, expert_folders
from memlora.student.records import TRAINING_FILE

KEPT_FILES = (*ADAPTER_FILES, TEMPLATE_FILE, TRAINING_FILE)
THRESHOLDS = deferral_path("").name  # a version's deferral thresholds, where the set had them


def versions(out: str | Path) -> list[str]:
    """OUT's versions, oldest first (by number: v10000 after v9999)."""
    root = versions_root(out)
    found = [p.name for p in root.iterdir() if (p / "version.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda name: (_number(name), name))


def _number(version: str) -> int:
    head = version.removeprefix("v").split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def prune_versions(out: str | Path, keep: int) -> list[str]:
    """Remove all but the `keep` latest versions (the ones rollback can still reach); returns those removed. Each
    loses its version.json first, so one removed halfway (a crash) is no longer listed as a version."""
    found = versions(out)
    gone = found[: max(len(found) - keep, 0)]
    for version in gone:
        (version_dir(out, version) / "version.json").unlink()
        shutil.rmtree(version_dir(out, version))
    return gone


def snapshot(out: str | Path, note: str) -> str:
    """Copy the served experts into a new version folder (written under a temporary name, then renamed)."""
    folders = expert_folders(out)
    number = max((_number(v) for v in versions(out)), default=0) + 1  # earlier ones may have been pruned
    version = f"v{number:04d}-{time.strftime('%Y%m%dT%H%M%S')}"
    final = version_dir(out, version)
    staging = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    files = {}
    try:
        for op, folder in folders.items():
            (staging / "adapters" / op).mkdir(parents=True)
            for name in KEPT_FILES:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, staging / "adapters" / op / name)
                    files[f"adapters/{op}/{name}"] = sha256_file(folder / name)
        if deferral_path(out).is_file():  # the thresholds fitted on this set come back with it
            shutil.copy2(deferral_path(out), staging / THRESHOLDS)
            files[THRESHOLDS] = sha256_file(staging / THRESHOLDS)
        write_json({"version": version, "note": note, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "operations": sorted(folders), "files": files}, staging / "version.json")
    except BaseException:  # a full disk: no half-written version is left to roll back to
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
    """Serve `sources` (operation -> adapter folder) from OUT/adapters, all or nothing: every file is copied beside
    its target first (a full disk fails here, nothing served has changed), then renamed into place (no space
    needed), the replaced files kept until OUT/manifest.json is rewritten; if that fails, they are put back.
    Operations not named keep their current expert."""
    staged, created = [], []
    try:
        for op, source in sources.items():
            target = adapter_dir(out, op)
            if not target.is_dir():
                target.mkdir(parents=True)
                created.append(target)
            for name in KEPT_FILES:
                if (Path(source) / name).is_file():
                    staged.append((target / f".{name}.installing", target / name))
                    shutil.copy2(Path(source) / name, staged[-1][0])
                elif name == TEMPLATE_FILE and (target / name).is_file():
                    staged.append((None, target / name))  # the new expert reads whole prompts: the old template goes
    except BaseException:
        _discard(staged, created)
        raise
    moved = []  # (installed file, the file it replaced, kept under a hidden name; None when there was none)
    try:
        for tmp, final in staged:
            previous = final.with_name(f".{final.name}.previous") if final.exists() else None
            if previous is not None:
                os.replace(final, previous)
            moved.append((final, previous))
            if tmp is not None:
                os.replace(tmp, final)
        update_manifest(out)
    except BaseException:
        for final, previous in reversed(moved):
            if previous is not None:
                os.replace(previous, final)
            else:
                final.unlink(missing_ok=True)
        _discard(staged, created)
        raise
    for _, previous in moved:
        if previous is not None:
            previous.unlink(missing_ok=True)


def _discard(staged: list[tuple[Path, Path]], created: list[Path]) -> None:
    for tmp, _ in staged:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    for folder in created:
        shutil.rmtree(folder, ignore_errors=True)


def rollback(out: str | Path, version: str) -> list[str]:
    """Serve an earlier version again (the current one is snapshotted first, so a rollback can be undone)."""
    sources = verified_version(out, version)
    snapshot(out, f"before rollback to {version}")
    install(out, sources)
    thresholds = version_dir(out, version) / THRESHOLDS
    if thresholds.is_file():  # else the served thresholds no longer match: a server defers until recalibrated
        with atomic_path(deferral_path(out)) as tmp:
            shutil.copy2(thresholds, tmp)
    return sorted(sources)
