"""Atomic file writes and checked reads: a crash never leaves a half file that looks whole."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from memlora.data.schemas import ADDED_COLUMNS, KIND_KEY, SCHEMA_VERSION, VERSION_KEY, with_metadata


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the record and the field."""


class WriteError(OSError):
    """A write that failed (disk full, permissions); the message names the file, and the previous version of
    it is untouched."""

    @classmethod
    def of(cls, err: OSError, message: str) -> "WriteError":
        return cls(err.errno, message) if err.errno is not None else cls(message)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask is process-wide, so reading it later would race threads


def swap_in(staging: str | Path, final: str | Path) -> Path:
    """Put a complete staging folder (a hidden sibling of `final`) in `final`'s place, with renames only: a
    reader sees the old folder or the new one, each whole, never a partial one. Files are synced and given
    normal modes first. Used for every folder we publish: student bases, experts, exports, releases."""
    staging, final = Path(staging), Path(final)
    old = final.parent / f".old-{final.name}"
    try:
        shareable(staging)
        for path in staging.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
    except OSError as err:
        raise WriteError.of(err, f"{final}: not written ({err}); the previous version, if any, is unchanged") from err
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def publishing(final: str | Path) -> Iterator[Path]:
    """Yield an empty hidden staging folder next to `final`; when the block succeeds it replaces `final`
    (swap_in), when it fails it is removed and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{final.name}.", dir=final.parent))
    try:
        yield staging
        swap_in(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def shareable(folder: str | Path) -> Path:
    """Give a folder made with mkdtemp (0700) and its files the modes a normal write would have (0755 / 0644
    under the usual umask), so a server running as another user can read a published model or adapter."""
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)
    return folder


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from other readers
        os.replace(tmp_path, path)
    except WriteError:
        raise
    except OSError as err:
        raise WriteError.of(err, f"{path}: not written ({err}); the previous version, if any, is unchanged") from err
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def write_parquet(table: pa.Table, path: str | Path, kind: str, metadata: dict[bytes, bytes] | None = None) -> Path:
    """`metadata`: keys of the writer's own beside the schema version and kind (a trace shard's trace key)."""
    schema = with_metadata(table.schema, kind)
    table = table.cast(schema.with_metadata({**schema.metadata, **(metadata or {})}))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_json(obj, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def read_parquet(path: str | Path, kind: str, schema: pa.Schema) -> pa.Table:
    """Read one of our Parquet files, refusing another kind, another schema version or missing columns."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    meta = table.schema.metadata or {}
    version = meta.get(VERSION_KEY, b"<none>").decode()
    if version != SCHEMA_VERSION:
        raise DataError(f"{path}: schema version {version!r}, expected {SCHEMA_VERSION!r} (field memlora.schema_version)")
    found_kind = meta.get(KIND_KEY, b"").decode()
    if found_kind and found_kind != kind:
        raise DataError(f"{path}: holds {found_kind!r} rows, expected {kind!r}")
    for name in ADDED_COLUMNS.get(kind, ()):
        if name not in table.column_names and name in schema.names:
            table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise DataError(f"{path}: columns do not match the {kind} schema ({err})") from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
