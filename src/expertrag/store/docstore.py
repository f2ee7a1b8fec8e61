"""The passage store: one SQLite file holding passages, their metadata, access groups and embeddings.

Versioning is what makes builds safe to kill. Every row carries the generation that added it
(`added_gen`) and, once replaced or deleted, the generation that retired it (`retired_gen`). A reader
pinned to generation G sees exactly the rows with `added_gen <= G` and `retired_gen` NULL or > G, so a
build that writes generation G+1 row by row is invisible until the manifest says G+1 (the commit point).
A rerun after a kill first rolls back whatever generation was left uncommitted.

Embeddings are cached by (content_hash, model): a rerun, or re-adding a passage whose text is
unchanged, never pays for the embedder twice.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from expertrag.data.types import Passage
from expertrag.errors import IndexFormatError

STORE_FORMAT = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS passages (
    rowid        INTEGER PRIMARY KEY,
    id           TEXT NOT NULL,
    doc_id       TEXT NOT NULL,
    title        TEXT NOT NULL,
    contents     TEXT NOT NULL,
    start        INTEGER NOT NULL,
    end          INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    domain       TEXT,
    groups       TEXT NOT NULL DEFAULT '[]',
    metadata     TEXT NOT NULL DEFAULT '{}',
    added_gen    INTEGER NOT NULL,
    retired_gen  INTEGER
);
CREATE INDEX IF NOT EXISTS passages_id ON passages(id);
CREATE INDEX IF NOT EXISTS passages_doc ON passages(doc_id);
CREATE INDEX IF NOT EXISTS passages_hash ON passages(content_hash);
CREATE TABLE IF NOT EXISTS passage_groups (
    rowid INTEGER NOT NULL,
    grp   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS passage_groups_grp ON passage_groups(grp);
CREATE TABLE IF NOT EXISTS embeddings (
    content_hash TEXT NOT NULL,
    model        TEXT NOT NULL,
    vector       BLOB NOT NULL,
    PRIMARY KEY (content_hash, model)
);
"""


def _live(table: str = "") -> str:
    """SQL condition for rows visible at generation `:gen` (optionally qualified by a table alias)."""
    t = f"{table}." if table else ""
    return f"{t}added_gen <= :gen AND ({t}retired_gen IS NULL OR {t}retired_gen > :gen)"


@dataclass(frozen=True)
class StoredPassage:
    rowid: int
    id: str
    doc_id: str
    title: str
    contents: str
    start: int
    end: int
    content_hash: str
    domain: str | None
    groups: list[str]
    metadata: dict[str, Any]


@dataclass
class UpsertCounts:
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(added=self.added, changed=self.changed, unchanged=self.unchanged, removed=self.removed)


class DocStore:
    """SQLite passage store. Open with `DocStore(path)`; all writes happen inside transactions."""

    def __init__(self, path: str | Path, *, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise IndexFormatError(f"{self.path}: passage store not found")
        try:
            self.conn = sqlite3.connect(str(self.path), isolation_level=None)  # explicit BEGIN/COMMIT
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            if create:
                self.conn.executescript(_SCHEMA)
                self.conn.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(STORE_FORMAT),)
                )
            row = self.conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        except sqlite3.DatabaseError as e:
            raise IndexFormatError(f"{self.path}: not a readable passage store ({e})") from None
        if row is None or int(row[0]) != STORE_FORMAT:
            raise IndexFormatError(
                f"{self.path}: passage store format {row[0] if row else 'missing'}, expected {STORE_FORMAT}"
            )

    def close(self) -> None:
        self.conn.close()

    def check(self) -> None:
        """Full integrity check; raises IndexFormatError naming the file on damage."""
        try:
            result = self.conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise IndexFormatError(f"{self.path}: damaged passage store ({e})") from None
        if result != "ok":
            raise IndexFormatError(f"{self.path}: damaged passage store ({result})")

    # ---- writing -------------------------------------------------------------------------------
    def rollback_uncommitted(self, committed_gen: int) -> int:
        """Forget the traces of a build that never reached its commit point. Returns rows dropped."""
        with self._tx():
            cur = self.conn.execute("SELECT rowid FROM passages WHERE added_gen > ?", (committed_gen,))
            stale = [r[0] for r in cur.fetchall()]
            self.conn.executemany("DELETE FROM passage_groups WHERE rowid = ?", [(r,) for r in stale])
            self.conn.execute("DELETE FROM passages WHERE added_gen > ?", (committed_gen,))
            self.conn.execute(
                "UPDATE passages SET retired_gen = NULL WHERE retired_gen > ?", (committed_gen,)
            )
        return len(stale)

    def upsert_document(self, doc_id: str, passages: Sequence[Passage], gen: int,
                        counts: UpsertCounts) -> None:
        """Make `passages` the live passages of `doc_id` at generation `gen`.

        Unchanged passages (same id and content hash) keep their rows; changed ones get a new row
        and the old row is retired; passages of the document that are no longer produced are retired.
        The caller groups calls into transactions with `transaction()`.
        """
        live = {
            pid: (rowid, h)
            for rowid, pid, h in self.conn.execute(
                f"SELECT rowid, id, content_hash FROM passages WHERE doc_id = :doc AND {_live()}",
                {"doc": doc_id, "gen": gen},
            )
        }
        wanted = set()
        for p in passages:
            wanted.add(p.id)
            old = live.get(p.id)
            if old is not None and old[1] == p.content_hash:
                counts.unchanged += 1
                continue
            if old is not None:
                self._retire(old[0], gen)
                counts.changed += 1
            else:
                counts.added += 1
            self._insert(p, gen)
        for pid, (rowid, _) in live.items():
            if pid not in wanted:
                self._retire(rowid, gen)
                counts.removed += 1

    def delete_ids(self, ids: Iterable[str], gen: int) -> list[str]:
        """Retire the live passages with these ids, or whole documents with these doc ids.

        Returns the ids that matched nothing."""
        missing = []
        for pid in ids:
            rows = self.conn.execute(
                f"SELECT rowid FROM passages WHERE (id = :id OR doc_id = :id) AND {_live()}",
                {"id": pid, "gen": gen},
            ).fetchall()
            if not rows:
                missing.append(pid)
            for (rowid,) in rows:
                self._retire(rowid, gen)
        return missing

    def purge_retired(self, committed_gen: int) -> int:
        """Drop rows that no committed or future generation can see any more."""
        with self._tx():
            cur = self.conn.execute(
                "SELECT rowid FROM passages WHERE retired_gen IS NOT NULL AND retired_gen <= ?",
                (committed_gen,),
            )
            dead = [r[0] for r in cur.fetchall()]
            self.conn.executemany("DELETE FROM passage_groups WHERE rowid = ?", [(r,) for r in dead])
            self.conn.executemany("DELETE FROM passages WHERE rowid = ?", [(r,) for r in dead])
        return len(dead)

    def _insert(self, p: Passage, gen: int) -> None:
        meta = dict(p.metadata)
        domain = meta.get("domain")
        groups = meta.get("groups") or []
        cur = self.conn.execute(
            "INSERT INTO passages (id, doc_id, title, contents, start, end, content_hash, domain, groups,"
            " metadata, added_gen) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (p.id, p.doc_id, p.title, p.contents, p.start, p.end, p.content_hash,
             domain, json.dumps(groups), json.dumps(meta, ensure_ascii=False, default=str), gen),
        )
        self.conn.executemany(
            "INSERT INTO passage_groups (rowid, grp) VALUES (?, ?)", [(cur.lastrowid, g) for g in groups]
        )

    def _retire(self, rowid: int, gen: int) -> None:
        self.conn.execute("UPDATE passages SET retired_gen = ? WHERE rowid = ?", (gen, rowid))

    def transaction(self):
        return self._tx()

    def _tx(self):
        conn = self.conn

        class _Tx:
            def __enter__(self):
                conn.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, exc, tb):
                conn.execute("ROLLBACK" if exc_type else "COMMIT")
                return False

        return _Tx()

    # ---- embeddings ------------------------------------------------------------------------------
    def hashes_missing_embeddings(self, gen: int, model: str) -> list[str]:
        rows = self.conn.execute(
            f"SELECT DISTINCT p.content_hash FROM passages p WHERE {_live('p')} AND NOT EXISTS "
            "(SELECT 1 FROM embeddings e WHERE e.content_hash = p.content_hash AND e.model = :model)"
            " ORDER BY p.rowid",
            {"gen": gen, "model": model},
        ).fetchall()
        return [r[0] for r in rows]

    def texts_for_hashes(self, hashes: Sequence[str]) -> list[tuple[str, str]]:
        """(title, contents) for each content hash, in order."""
        marks = ",".join("?" * len(hashes))
        found = dict(
            (h, (t, c)) for h, t, c in self.conn.execute(
                f"SELECT content_hash, title, contents FROM passages WHERE content_hash IN ({marks})",
                list(hashes),
            )
        )
        return [found[h] for h in hashes]

    def put_embeddings(self, hashes: Sequence[str], vectors: np.ndarray, model: str) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._tx():
            self.conn.executemany(
                "INSERT OR REPLACE INTO embeddings (content_hash, model, vector) VALUES (?,?,?)",
                [(h, model, vectors[i].tobytes()) for i, h in enumerate(hashes)],
            )

    def iter_live_vectors(self, gen: int, model: str, dim: int, batch: int = 4096
                          ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rowids int64 [n], vectors float32 [n, dim]) in batches: bounded memory while indexing."""
        cur = self.conn.execute(
            f"SELECT p.rowid, e.vector FROM passages p JOIN embeddings e "
            f"ON e.content_hash = p.content_hash AND e.model = :model WHERE {_live('p')} ORDER BY p.rowid",
            {"gen": gen, "model": model},
        )
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            yield ids, vecs

    # ---- reading -------------------------------------------------------------------------------
    def count_live(self, gen: int) -> int:
        return self.conn.execute(f"SELECT COUNT(*) FROM passages WHERE {_live()}", {"gen": gen}).fetchone()[0]

    def iter_live_texts(self, gen: int, batch: int = 4096) -> Iterator[list[tuple[int, str, str]]]:
        """Batches of (rowid, title, contents) of the live passages, by rowid."""
        cur = self.conn.execute(
            f"SELECT rowid, title, contents FROM passages WHERE {_live()} ORDER BY rowid", {"gen": gen}
        )
        while rows := cur.fetchmany(batch):
            yield rows

    def get(self, rowids: Sequence[int]) -> dict[int, StoredPassage]:
        if not rowids:
            return {}
        marks = ",".join("?" * len(rowids))
        rows = self.conn.execute(
            "SELECT rowid, id, doc_id, title, contents, start, end, content_hash, domain, groups, metadata"
            f" FROM passages WHERE rowid IN ({marks})",
            [int(r) for r in rowids],
        ).fetchall()
        return {
            r[0]: StoredPassage(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                                json.loads(r[9]), json.loads(r[10]))
            for r in rows
        }

    def allowed_rowids(self, gen: int, *, domains: Sequence[str] | None = None,
                       groups: Sequence[str] | None = None) -> np.ndarray:
        """Rowids visible at `gen` that pass the filters.

        domains: keep passages whose domain is one of these. groups: the user's access groups; a
        passage with no groups is public, otherwise the user needs one of its groups. None = no filter.
        """
        sql = f"SELECT rowid FROM passages WHERE {_live()}"
        params: dict[str, Any] = {"gen": gen}
        if domains is not None:
            keys = [f"d{i}" for i in range(len(domains))]
            sql += f" AND domain IN ({','.join(':' + k for k in keys)})" if keys else " AND 0"
            params.update(zip(keys, domains, strict=True))
        if groups is not None:
            keys = [f"g{i}" for i in range(len(groups))]
            cond = "groups = '[]'"
            if keys:
                cond += (f" OR rowid IN (SELECT rowid FROM passage_groups WHERE grp IN "
                         f"({','.join(':' + k for k in keys)}))")
            sql += f" AND ({cond})"
            params.update(zip(keys, groups, strict=True))
        return np.fromiter((r[0] for r in self.conn.execute(sql, params)), dtype=np.int64)

    def live_ids(self, gen: int) -> list[str]:
        return [r[0] for r in self.conn.execute(
            f"SELECT id FROM passages WHERE {_live()} ORDER BY rowid", {"gen": gen})]

    def document_rowids(self, doc_id: str, gen: int) -> list[int]:
        """Rowids of a document's passages visible at `gen`, in document order."""
        return [r[0] for r in self.conn.execute(
            f"SELECT rowid FROM passages WHERE doc_id = :doc AND {_live()} ORDER BY start, rowid",
            {"doc": doc_id, "gen": gen})]
