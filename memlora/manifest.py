"""OUT/manifest.json: what every artifact is (sha256, rows, schema version) and what made it."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from memlora import __version__
from memlora.data.io import sha256_file, write_json
from memlora.data.schemas import VERSION_KEY
from memlora.layout import MANIFEST, TRACKED



def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe_file(path: Path, root: Path) -> dict:
    entry = {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if path.suffix == ".parquet":
        meta = pq.read_metadata(path)
        entry["rows"] = meta.num_rows
        version = (meta.schema.to_arrow_schema().metadata or {}).get(VERSION_KEY)
        entry["schema_version"] = version.decode() if version else None
    return entry


def artifact_files(root: Path) -> list[Path]:
    files = []
    for folder in TRACKED:
        base = root / folder
        if base.is_dir():
            files += [p for p in sorted(base.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return files


def read_manifest(out: str | Path) -> dict:
    path = Path(out) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def update_manifest(out: str | Path, section: str | None = None, payload: dict | None = None) -> dict:
    """Merge one stage's section (if given) and re-describe every artifact file, then write atomically."""
    root = Path(out)
    manifest = read_manifest(root)
    if section is not None:
        manifest[section] = payload
    manifest.update(
        memlora_version=__version__,
        git_revision=git_revision(),
        updated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        files=[describe_file(p, root) for p in artifact_files(root)],
    )
    write_json(manifest, root / MANIFEST)
    return manifest


class UntrustedArtifact(RuntimeError):
    """A file about to be loaded is not the one the pipeline recorded."""


def check_recorded(out: str | Path, paths: list[Path]) -> None:
    """Stop before loading any of `paths` that OUT/manifest.json does not list with the same sha256."""
    root = Path(out)
    listed = {f["path"]: f["sha256"] for f in read_manifest(root).get("files", [])}
    for path in paths:
        rel = Path(path).resolve().relative_to(root.resolve()).as_posix()
        if rel not in listed:
            raise UntrustedArtifact(f"{path}: not recorded in {root / MANIFEST}; refusing to load a file this "
                                    "pipeline did not write (rerun the stage that makes it)")
        digest = sha256_file(path)
        if digest != listed[rel]:
            raise UntrustedArtifact(f"{path}: sha256 {digest[:16]}… differs from {root / MANIFEST}'s "
                                    f"{listed[rel][:16]}…; refusing to load a changed file")
