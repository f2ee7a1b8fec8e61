"""A compact set of document ids with where each was first seen, for duplicate-id detection at scale.

The corpus reader must report a repeated id with the file and line of its first occurrence, so it remembers
every id it has read. A Python dict of id strings to (file, line) tuples costs ~200 bytes an id: ~200 MB at
1M passages and ~4 GB at 21M, the largest part of a streamed build's memory that still grew with the corpus
(RESULTS.md, "Scale"). This table keeps a 128-bit BLAKE2b digest of each id and one packed int64 location in
flat arrays with open addressing (linear probing, at most half full): 24 bytes a slot, ~48-96 bytes an id.

Two different ids are taken for the same only if their 128-bit digests collide: for n ids the chance is about
n^2 / 2^129 (~1e-25 at 21M), far below the chance of a disk error flipping an id.
"""

from __future__ import annotations

import hashlib
from array import array

# the first digest half is forced odd (below), so 0 marks an empty slot


def _digest(doc_id: str) -> tuple[int, int]:
    d = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    hi = int.from_bytes(d[:8], "little") | 1
    lo = int.from_bytes(d[8:], "little")
    return hi, lo


class IdTable:
    """`add(id, location)` returns the location the id was first added with, or None (and keeps it)."""

    def __init__(self, capacity: int = 1024) -> None:
        size = 1
        while size < 2 * max(capacity, 8):
            size *= 2
        self._alloc(size)
        self._count = 0

    def _alloc(self, size: int) -> None:
        # array.array, not numpy: one element read is ~3x cheaper, and this table is read one id at a time
        self._hi = array("Q", bytes(8 * size))
        self._lo = array("Q", bytes(8 * size))
        self._loc = array("q", bytes(8 * size))
        self._mask = size - 1

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return 8 * 3 * (self._mask + 1)

    def _slot(self, hi: int, lo: int) -> tuple[int, bool]:
        """(slot, found): the slot holding this digest, or the empty slot where it would go."""
        his, los, mask = self._hi, self._lo, self._mask
        i = hi & mask
        while True:
            h = his[i]
            if h == 0:
                return i, False
            if h == hi and los[i] == lo:
                return i, True
            i = (i + 1) & mask

    def add(self, doc_id: str, location: int) -> int | None:
        hi, lo = _digest(doc_id)
        i, found = self._slot(hi, lo)
        if found:
            return self._loc[i]
        if 2 * (self._count + 1) > self._mask + 1:
            self._grow()
            i, _ = self._slot(hi, lo)
        self._hi[i], self._lo[i], self._loc[i] = hi, lo, location
        self._count += 1
        return None

    def _grow(self) -> None:
        old = zip(self._hi, self._lo, self._loc, strict=True)
        self._alloc(2 * (self._mask + 1))
        his, mask = self._hi, self._mask
        for hi, lo, loc in old:  # reinsert: every digest is distinct, so only empty slots are probed for
            if hi == 0:
                continue
            i = hi & mask
            while his[i] != 0:
                i = (i + 1) & mask
            his[i], self._lo[i], self._loc[i] = hi, lo, loc
