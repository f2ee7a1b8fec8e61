"""LRU caches for retrieval results and answers, optionally persisted to a SQLite file.

Keys are built from the normalised query plus whatever else changes the value (index version, policy,
k, user groups), so a rebuilt index or another policy never serves a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import OrderedDict
from pathlib import Path
from typing import Any

from expertrag.answers import normalize_answer


def cache_key(query: str, *parts: Any) -> str:
    payload = json.dumps([normalize_answer(query), *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class LRUCache:
    """In-memory LRU of JSON-serialisable values; with `path`, entries also go to (and come from) disk."""

    def __init__(self, capacity: int = 1024, path: str | Path | None = None, namespace: str = "default"):
        self.capacity = capacity
        self.namespace = namespace
        self._data: OrderedDict[str, Any] = OrderedDict()
        self.hits = self.misses = 0
        self._db = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS cache (ns TEXT, key TEXT, value TEXT, PRIMARY KEY (ns, key))")

    def get(self, key: str) -> Any | None:
        if key in self._data:
            self._data.move_to_end(key)
            self.hits += 1
            return self._data[key]
        if self._db is not None:
            row = self._db.execute("SELECT value FROM cache WHERE ns = ? AND key = ?", (self.namespace, key)).fetchone()
            if row is not None:
                value = json.loads(row[0])
                self._put_memory(key, value)
                self.hits += 1
                return value
        self.misses += 1
        return None

    def put(self, key: str, value: Any) -> None:
        self._put_memory(key, value)
        if self._db is not None:
            self._db.execute("INSERT OR REPLACE INTO cache VALUES (?, ?, ?)",
                             (self.namespace, key, json.dumps(value, default=str)))

    def _put_memory(self, key: str, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()
        if self._db is not None:
            self._db.execute("DELETE FROM cache WHERE ns = ?", (self.namespace,))
