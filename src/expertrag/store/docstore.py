"""The passage store: one SQLite file holding passages, their metadata, access groups and embeddings.

Versioning is what makes builds safe to kill. Every row carries the generation that added it
(`added_gen`) and, once replaced or deleted, the generation that retired it (`retired_gen`). A reader
pinned to generation G sees exactly the rows with `added_gen <= G` and `retired_gen` NULL or > G, so a
build that writes generation G+1 row by row is invisible until the manifest says G+1 (the commit point).
A rerun after a kill first rolls back whatever generation was left uncommitted.

Embeddings are cached by (content_hash, model): a rerun, or re-adding a passage whose text is
unchanged, never pays for the embedder twice. Each cached vector carries a checksum over (content hash,
model, vector bytes); a build verifies every vector it reuses and re-embeds any that fail, so a damaged
cache entry never reaches FAISS.

A passage row is unchanged only when its text (content hash), offsets and metadata (groups, domain and
everything else) all match: a metadata-only change retires the old row like a text change does, so a
change of access groups takes effect in the generation that carries it.

Readers (`DocStore(path)`) open the file read-only and never write (not even the WAL switch); in a
directory they cannot write to, the file is opened as immutable.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import urllib.parse
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
    checksum     TEXT,
    PRIMARY KEY (content_hash, model)
);
"""


def vector_checksum(content_hash: str, model: str, blob: bytes) -> str:
    """Ties a cached vector to the text and model it was computed for: any change of a byte shows."""
    h = hashlib.blake2b(digest_size=16)
    h.update(content_hash.encode())
    h.update(b"\0")
    h.update(model.encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    h.update(blob)
    return h.hexdigest()


def canonical_metadata(meta: dict[str, Any]) -> str:
    """The stored form of passage metadata, and what tells a metadata change."""
    return json.dumps(meta, ensure_ascii=False, default=str, sort_keys=True)


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
        """create=True: the writer (creates the file and schema when absent). Otherwise a read-only reader."""
        self.path = Path(path)
        self.readonly = not create
        if not create and not self.path.exists():
            raise IndexFormatError(f"{self.path}: passage store not found")
        try:
            if create:
                self.conn = sqlite3.connect(str(self.path), isolation_level=None)  # explicit BEGIN/COMMIT
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
                self.conn.executescript(_SCHEMA)
                columns = {r[1] for r in self.conn.execute("PRAGMA table_info(embeddings)")}
                if "checksum" not in columns:  # a store written before checksums: its vectors get re-embedded
                    self.conn.execute("ALTER TABLE embeddings ADD COLUMN checksum TEXT")
                self.conn.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(STORE_FORMAT),)
                )
            else:
                self.conn = self._open_readonly()
            row = self.conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        except sqlite3.DatabaseError as e:
            raise IndexFormatError(f"{self.path}: not a readable passage store ({e})") from None
        if row is None or int(row[0]) != STORE_FORMAT:
            raise IndexFormatError(
                f"{self.path}: passage store format {row[0] if row else 'missing'}, expected {STORE_FORMAT}"
            )

    def _open_readonly(self) -> sqlite3.Connection:
        uri = "file:" + urllib.parse.quote(str(self.path.resolve()))
        conn = sqlite3.connect(uri + "?mode=ro", uri=True, isolation_level=None)
        try:
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            return conn
        except sqlite3.OperationalError:
            conn.close()
            if os.access(self.path.parent, os.W_OK) and os.access(self.path, os.W_OK):
                raise
        # A read-only directory: SQLite cannot create the WAL index beside the file. Nobody can write
        # here either, so reading the file as immutable is safe, unless a write-ahead log still holds
        # committed pages (a writer that died before its checkpoint): immutable would not see them.
        wal = Path(str(self.path) + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise IndexFormatError(
                f"{self.path}: the directory is read-only but {wal.name} still holds committed changes; "
                "run `expertrag index` or `delete` on it once with write access, or search a copy")
        return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, isolation_level=None)

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
            pid: (rowid, (h, start, end, self._canonical_stored(meta, rowid)))
            for rowid, pid, h, start, end, meta in self.conn.execute(
                "SELECT rowid, id, content_hash, start, end, metadata FROM passages "
                f"WHERE doc_id = :doc AND {_live()}",
                {"doc": doc_id, "gen": gen},
            )
        }
        wanted = set()
        for p in passages:
            wanted.add(p.id)
            old = live.get(p.id)
            if old is not None and old[1] == (p.content_hash, p.start, p.end, canonical_metadata(p.metadata)):
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

    def _canonical_stored(self, text: str, rowid: int) -> str:
        try:
            return canonical_metadata(json.loads(text))
        except (json.JSONDecodeError, TypeError):
            return "\0unreadable"  # never equal to a real value: the row is rewritten

    def delete_ids(self, ids: Iterable[str], gen: int) -> dict[str, list[tuple[str, str]]]:
        """Retire the live passages with these ids, or whole documents with these doc ids.

        Returns, for each id in order, the (passage id, doc id) pairs it removed; [] = it matched nothing
        (or only passages an earlier id of the same call already removed)."""
        removed: dict[str, list[tuple[str, str]]] = {}
        for pid in ids:
            rows = self.conn.execute(
                f"SELECT rowid, id, doc_id FROM passages WHERE (id = :id OR doc_id = :id) AND {_live()} "
                "ORDER BY rowid",
                {"id": pid, "gen": gen},
            ).fetchall()
            removed.setdefault(pid, [])
            for rowid, passage_id, doc in rows:
                self._retire(rowid, gen)
                removed[pid].append((passage_id, doc))
        return removed

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
             domain, json.dumps(groups), canonical_metadata(meta), gen),
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

    def count_missing_embeddings(self, gen: int, model: str) -> int:
        """How many distinct texts of generation `gen` have no cached vector for `model`."""
        return self.conn.execute(
            f"SELECT COUNT(DISTINCT p.content_hash) FROM passages p WHERE {_live('p')} AND NOT EXISTS "
            "(SELECT 1 FROM embeddings e WHERE e.content_hash = p.content_hash AND e.model = :model)",
            {"gen": gen, "model": model},
        ).fetchone()[0]

    def missing_embeddings_page(self, gen: int, model: str, after: int, limit: int
                                ) -> list[tuple[int, str, str, str]]:
        """(rowid, content hash, title, contents) of up to `limit` live rows after rowid `after` whose text
        has no cached vector, by rowid: the embed step pages through these instead of holding every hash."""
        return self.conn.execute(
            f"SELECT p.rowid, p.content_hash, p.title, p.contents FROM passages p WHERE {_live('p')} "
            "AND p.rowid > :after AND NOT EXISTS (SELECT 1 FROM embeddings e WHERE "
            "e.content_hash = p.content_hash AND e.model = :model) ORDER BY p.rowid LIMIT :limit",
            {"gen": gen, "model": model, "after": after, "limit": limit},
        ).fetchall()

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
        rows = []
        for i, h in enumerate(hashes):
            blob = vectors[i].tobytes()
            rows.append((h, model, blob, vector_checksum(h, model, blob)))
        with self._tx():
            self.conn.executemany(
                "INSERT OR REPLACE INTO embeddings (content_hash, model, vector, checksum) VALUES (?,?,?,?)",
                rows,
            )

    def bad_embeddings(self, gen: int, model: str, dim: int | None) -> list[str]:
        """Content hashes of live passages whose cached vector fails its checksum, has the wrong size,
        holds a non-finite value, or has no checksum (written before checksums): not to be trusted."""
        cur = self.conn.execute(
            "SELECT e.content_hash, e.vector, e.checksum FROM embeddings e WHERE e.model = :model AND "
            f"EXISTS (SELECT 1 FROM passages p WHERE p.content_hash = e.content_hash AND {_live('p')})",
            {"gen": gen, "model": model},
        )
        bad = []
        while rows := cur.fetchmany(4096):
            for h, blob, checksum in rows:
                if not isinstance(blob, bytes) or checksum != vector_checksum(h, model, blob):
                    bad.append(h)
                elif dim is not None and len(blob) != 4 * dim:
                    bad.append(h)
                elif not np.isfinite(np.frombuffer(blob, dtype=np.float32)).all():
                    bad.append(h)
        return bad

    def drop_embeddings(self, hashes: Sequence[str], model: str) -> None:
        with self._tx():
            self.conn.executemany("DELETE FROM embeddings WHERE content_hash = ? AND model = ?",
                                  [(h, model) for h in hashes])

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

    def sample_live_vectors(self, gen: int, model: str, dim: int, n: int) -> np.ndarray:
        """About `n` live vectors spread evenly over the corpus (every k-th rowid), for training IVF/PQ:
        the first rows of a corpus read in file order are its first documents, not a sample of it.
        Only the chosen rows' vectors are read."""
        total = self.count_live(gen)
        step = max(1, -(-total // max(n, 1)))
        cur = self.conn.execute(
            f"SELECT e.vector FROM passages p JOIN embeddings e ON e.content_hash = p.content_hash "
            f"AND e.model = :model WHERE {_live('p')} AND p.rowid % :step = 0 ORDER BY p.rowid LIMIT :n",
            {"gen": gen, "model": model, "step": step, "n": n},
        )
        blob = b"".join(r[0] for r in cur)
        return np.frombuffer(blob, dtype=np.float32).reshape(-1, dim)

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
        return {r[0]: StoredPassage(*r[:9], self._json_field(r, 9, "groups", list),
                                    self._json_field(r, 10, "metadata", dict)) for r in rows}

    def _json_field(self, row: Sequence[Any], i: int, name: str, kind: type) -> Any:
        try:
            value = json.loads(row[i])
        except (json.JSONDecodeError, TypeError, RecursionError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
            raise IndexFormatError(f"{self.path}: passage row {row[0]} (id {row[1]!r}): column '{name}' holds "
                                   f"malformed JSON ({why}); rebuild the index") from None
        if not isinstance(value, kind):
            raise IndexFormatError(f"{self.path}: passage row {row[0]} (id {row[1]!r}): column '{name}' holds "
                                   f"{type(value).__name__}, expected {kind.__name__}; rebuild the index")
        return value

    def has_restricted(self, gen: int) -> bool:
        """Whether any passage visible at `gen` carries access groups."""
        return self.conn.execute(
            f"SELECT 1 FROM passages WHERE {_live()} AND groups != '[]' LIMIT 1", {"gen": gen}
        ).fetchone() is not None

    def allowed_rowids(self, gen: int, *, domains: Sequence[str] | None = None,
                       groups: Sequence[str] | None = None, all_groups: bool = False) -> np.ndarray:
        """Rowids visible at `gen` that pass the filters.

        domains: keep passages whose domain is one of these (None = any). groups: the user's access
        groups; a passage with no groups is public, otherwise the user needs one of its groups. No groups
        (None or empty) = public passages only. all_groups=True (administrators) = no access filter.
        """
        if all_groups and groups:
            raise ValueError("allowed_rowids: groups and all_groups=True exclude each other")
        groups = None if all_groups else tuple(groups or ())
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

    def domain_counts(self, gen: int) -> dict[str | None, int]:
        """Live passages per `metadata.domain` (None: passages without one)."""
        return {r[0]: r[1] for r in self.conn.execute(
            f"SELECT domain, COUNT(*) FROM passages WHERE {_live()} GROUP BY domain ORDER BY domain",
            {"gen": gen})}

    def live_domains(self, gen: int) -> tuple[np.ndarray, list[str | None]]:
        """(rowids int64, their domains) of the live passages, by rowid: a router maps hits to domains
        with it without a store lookup per hit."""
        rows = self.conn.execute(f"SELECT rowid, domain FROM passages WHERE {_live()} ORDER BY rowid",
                                 {"gen": gen}).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)), [r[1] for r in rows]

    def live_ids(self, gen: int) -> list[str]:
        return [r[0] for r in self.conn.execute(
            f"SELECT id FROM passages WHERE {_live()} ORDER BY rowid", {"gen": gen})]

    def document_rowids(self, doc_id: str, gen: int) -> list[int]:
        """Rowids of a document's passages visible at `gen`, in document order."""
        return [r[0] for r in self.conn.execute(
            f"SELECT rowid FROM passages WHERE doc_id = :doc AND {_live()} ORDER BY start, rowid",
            {"doc": doc_id, "gen": gen})]
