"""The policy expert's audit log: append-only JSON lines, one entry per flagged query, fsynced per entry.

An entry never holds personal data: the query appears only redacted (personal data replaced by its
placeholders) and as a keyed hash (HMAC-SHA256) of the original text. The key is a random secret in a file
beside the log (`<log>.key`, mode 0600): whoever holds it can check whether a given query was asked, while
the log alone cannot be brute-forced back to the phone number or email it was computed from (a plain hash of
a 10-digit number could).

Appending is not an atomic replace (fileio.atomic_path would rewrite the whole log per entry): each entry
is one `write` of one line on an O_APPEND descriptor, then fsync, so a crash loses at most the entry being
written and never interleaves two entries.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from expertrag.errors import ExpertRAGError
from expertrag.fileio import atomic_write_bytes, fsync_dir


class AuditLog:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.key_path = self.path.with_name(self.path.name + ".key")
        self._lock = threading.Lock()
        self._key: bytes | None = None

    def _secret(self) -> bytes:
        if self._key is None:
            if not self.key_path.exists():
                self.key_path.parent.mkdir(parents=True, exist_ok=True)
                old = os.umask(0o077)  # the key is the one thing that must stay private
                try:
                    atomic_write_bytes(self.key_path, secrets.token_hex(32).encode())
                finally:
                    os.umask(old)
            try:
                self._key = bytes.fromhex(self.key_path.read_text().strip())
            except ValueError:
                raise ExpertRAGError(f"{self.key_path}: audit key file is not hex; restore it or remove the "
                                     "log and its key together") from None
        return self._key

    def query_hash(self, text: str) -> str:
        return "hmac-sha256:" + hmac.new(self._secret(), text.encode("utf-8"), hashlib.sha256).hexdigest()

    def append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps({"time": time.time(), **entry}, ensure_ascii=False, allow_nan=False,
                           sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            new = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if new:
                fsync_dir(self.path.parent)

    def read(self) -> list[dict[str, Any]]:
        """Every entry, oldest first (a torn last line from a crash is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for raw in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
        return out
