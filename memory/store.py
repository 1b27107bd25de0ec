"""A persistent memory store: SQLite rows with their embedding, one namespace per conversation.

SQLite is in the standard library, survives a crash with its journal, and a conversation's memories are few
enough (hundreds) that cosine similarity over all of a namespace's vectors in numpy is faster than any index.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS memories (
    namespace TEXT NOT NULL, id TEXT NOT NULL, text TEXT NOT NULL, embedding BLOB NOT NULL,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, PRIMARY KEY (namespace, id));
CREATE TABLE IF NOT EXISTS history (
    namespace TEXT NOT NULL, memory_id TEXT NOT NULL, event TEXT NOT NULL,
    old_text TEXT, new_text TEXT, at TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Memory:
    id: str
    text: str
    created_at: str
    updated_at: str


class MemoryStore:
    def __init__(self, path: str | Path = ":memory:"):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _log(self, ns: str, mid: str, event: str, old: str | None, new: str | None, at: str) -> None:
        self._db.execute("INSERT INTO history VALUES (?,?,?,?,?,?)", (ns, mid, event, old, new, at))

    def add(self, ns: str, text: str, vector: np.ndarray, at: datetime | str) -> str:
        mid, at = uuid.uuid4().hex[:12], str(at)
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO memories VALUES (?,?,?,?,?,?)", (ns, mid, text, _blob(vector), at, at)
            )
            self._log(ns, mid, "ADD", None, text, at)
        return mid

    def update(self, ns: str, mid: str, text: str, vector: np.ndarray, at: datetime | str) -> bool:
        at = str(at)
        with self._lock, self._db:
            row = self._db.execute("SELECT text FROM memories WHERE namespace=? AND id=?", (ns, mid)).fetchone()
            if row is None:
                return False
            self._db.execute(
                "UPDATE memories SET text=?, embedding=?, updated_at=? WHERE namespace=? AND id=?",
                (text, _blob(vector), at, ns, mid),
            )
            self._log(ns, mid, "UPDATE", row[0], text, at)
        return True

    def delete(self, ns: str, mid: str, at: datetime | str = "") -> bool:
        with self._lock, self._db:
            row = self._db.execute("SELECT text FROM memories WHERE namespace=? AND id=?", (ns, mid)).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM memories WHERE namespace=? AND id=?", (ns, mid))
            self._log(ns, mid, "DELETE", row[0], None, str(at))
        return True

    def get(self, ns: str, mid: str) -> Memory | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, text, created_at, updated_at FROM memories WHERE namespace=? AND id=?", (ns, mid)
            ).fetchone()
        return Memory(*row) if row else None

    def all(self, ns: str) -> list[Memory]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, text, created_at, updated_at FROM memories WHERE namespace=? ORDER BY rowid", (ns,)
            ).fetchall()
        return [Memory(*r) for r in rows]

    def history(self, ns: str) -> list[tuple]:
        with self._lock:
            return self._db.execute(
                "SELECT memory_id, event, old_text, new_text, at FROM history WHERE namespace=? ORDER BY rowid", (ns,)
            ).fetchall()

    def search(self, ns: str, vector: np.ndarray, k: int) -> list[tuple[Memory, float]]:
        """The k memories most similar to `vector` by cosine similarity, best first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, text, created_at, updated_at, embedding FROM memories WHERE namespace=? ORDER BY rowid",
                (ns,),
            ).fetchall()
        if not rows:
            return []
        matrix = np.stack([np.frombuffer(r[4], dtype=np.float32) for r in rows])
        query = np.asarray(vector, dtype=np.float32)
        norms = np.linalg.norm(matrix, axis=1) * (np.linalg.norm(query) or 1.0)
        scores = matrix @ query / np.where(norms == 0, 1.0, norms)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(Memory(*rows[i][:4]), float(scores[i])) for i in order]

    def clear(self, ns: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM memories WHERE namespace=?", (ns,))
            self._db.execute("DELETE FROM history WHERE namespace=?", (ns,))


def _blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()
