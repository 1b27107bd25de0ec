"""Captured calls are written one Parquet shard per call (atomic, so a killed proxy loses nothing). A team's
traffic makes that tens of thousands of files a day, each listed, read and hashed by every stage after it (one
shard costs ~2 ms to read on 2 cores: 300,000 of them, a month at 10,000 calls a day, ~10 min per read of an
operation's traces). `compact` merges an operation's single-call shards into files of up to `max_rows` rows.

A merged file names its sources in its metadata (name, sha256, rows, in its row order), so nothing downstream
sees a compaction: the traces' fingerprint (the experts' cache key, `improve`'s new rows) is taken over the
shards it holds, a training record lists shard names, and the rows of a merged file are told apart by the shard
each came from. A compaction cut short (merged file written, its shards not all removed) loses nothing and
counts nothing twice: `trace_files` leaves out a shard a merged file holds, and the next compaction removes it.
`improve` leaves them so on purpose (`remove=False`): another flow reading OUT's traces meanwhile (the nightly
pipeline on the same OUT) may have listed them a moment before.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from memlora.data.io import DataError, atomic_path, read_parquet, sha256_file
from memlora.data.schemas import TRACES, with_metadata

COMPACTED_KEY = b"memlora.compacted_from"
CAPTURED_PREFIX = "part-capture-"  # layout.capture_shard_path's names
COMPACTED_PREFIX = "part-capture-compact-"


@dataclass(frozen=True)
class Source:
    name: str
    sha256: str
    rows: int


@dataclass(frozen=True)
class Compaction:
    operation: str
    shards: int  # single-call shards merged (and removed, unless remove=False)
    rows: int
    files: list[str]  # the merged files written
    finished: int = 0  # shards an earlier compaction had merged and left (remove=False, or cut short), removed now


def sources(path: Path) -> list[Source] | None:
    """The shards a merged file holds, in its row order; None for any other trace file."""
    if not path.name.startswith(COMPACTED_PREFIX):
        return None
    try:
        stat = path.stat()
        return list(_sources(path, stat.st_mtime_ns, stat.st_size))
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None


@functools.lru_cache(maxsize=32)
def _sources(path: Path, mtime_ns: int, size: int) -> tuple[Source, ...]:
    """Read once per version of a merged file (every listing of the traces asks again: ~12 ms for one of 10,000
    calls); a file rewritten in place is read anew."""
    try:
        raw = (pq.read_schema(path).metadata or {})[COMPACTED_KEY]
        return tuple(Source(*entry) for entry in json.loads(raw))
    except (KeyError, ValueError, TypeError):
        raise DataError(f"{path}: a compacted trace file without a valid list of its shards (metadata field "
                        f"{COMPACTED_KEY.decode()})") from None


def live(files: list[Path]) -> list[Path]:
    """`files` less the shards a merged file among them holds (left by a compaction cut short)."""
    held = {s.name for f in files for s in sources(f) or ()}
    return [f for f in files if f.name not in held]


def shard_entries(files: list[Path]) -> list[tuple[str, str]]:
    """(name, sha256) of every shard the files hold, a merged file by its sources: the same list before and
    after a compaction."""
    entries = set()
    for f in files:
        held = sources(f)
        entries.update({(s.name, s.sha256) for s in held} if held is not None else {(f.name, sha256_file(f))})
    return sorted(entries)


def shard_names(files: list[Path]) -> list[str]:
    return sorted({s.name for f in files for s in (sources(f) or [Source(f.name, "", 0)])})


def rows_not_from(files: list[Path], names: set[str]) -> pa.Table:
    """The trace rows of `files` whose shard is not in `names` (e.g. the calls an expert was not trained on)."""
    parts = []
    for f in files:
        held = sources(f)
        if held is None:
            if f.name not in names:
                parts.append(read_parquet(f, "traces", TRACES))
            continue
        if all(s.name in names for s in held):
            continue
        table, start = read_parquet(f, "traces", TRACES), 0
        for s in held:
            if s.name not in names:
                parts.append(table.slice(start, s.rows))
            start += s.rows
    return pa.concat_tables(parts) if parts else TRACES.empty_table()


def compact(folder: Path, operation: str, *, min_shards: int = 2, max_rows: int = 50_000,
            remove: bool = True) -> Compaction:
    """Merge the captured single-call shards in `folder` (an operation's traces) once there are `min_shards`.
    `remove: False` leaves the merged shards where they are (every reader skips them) for the next compaction
    to remove: a command that listed them just before still finds each one it opens, so no lock is needed."""
    present = sorted(folder.glob("part-*.parquet"))
    held = {s.name: (s.sha256, merged.name) for merged in present for s in sources(merged) or ()}
    finished = 0
    for f in present:
        if f.name in held:  # merged by an earlier compaction, which left it (remove: False) or was cut short
            digest, merged = held[f.name]
            if sha256_file(f) != digest:
                raise DataError(f"{f}: not the shard {merged} holds under this name (sha256 differs); left as it is")
            f.unlink(missing_ok=True)
            finished += 1
    shards = [f for f in present if f.name.startswith(CAPTURED_PREFIX) and not f.name.startswith(COMPACTED_PREFIX)
              and f.name not in held]
    if len(shards) < min_shards:
        return Compaction(operation, 0, 0, [], finished)
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    written: list[str] = []
    group: list[tuple[Path, str, pa.Table]] = []  # (shard, its sha256, its rows)

    def flush() -> None:
        path = folder / f"{COMPACTED_PREFIX}{stamp}-{len(written):04d}.parquet"
        listed = json.dumps([[f.name, digest, t.num_rows] for f, digest, t in group])
        table = pa.concat_tables([t for _, _, t in group]).cast(with_metadata(TRACES, "traces"))
        table = table.replace_schema_metadata({**table.schema.metadata, COMPACTED_KEY: listed.encode()})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        written.append(path.name)
        for f, _, _ in group if remove else ():  # once the merged file is in place: a crash between leaves both,
            f.unlink(missing_ok=True)             # counted once
        group.clear()

    rows = in_group = 0
    for f in shards:
        group.append((f, sha256_file(f), read_parquet(f, "traces", TRACES)))
        rows += group[-1][2].num_rows
        in_group += group[-1][2].num_rows
        if in_group >= max_rows:
            flush()
            in_group = 0
    if group:
        flush()
    return Compaction(operation, len(shards), rows, written, finished)


def compact_traces(traces: Path, *, min_shards: int = 2, max_rows: int = 50_000,
                   remove: bool = True) -> list[Compaction]:
    """`compact` in every operation's folder under OUT/traces (a client's own operations included)."""
    folders = sorted(p for p in Path(traces).iterdir() if p.is_dir()) if Path(traces).is_dir() else []
    return [compact(folder, folder.name, min_shards=min_shards, max_rows=max_rows, remove=remove)
            for folder in folders]
