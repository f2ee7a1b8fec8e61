"""API keys: stored hashed beside the index, mapped to a user with access groups.

A key is 32 random bytes (URL-safe base64 behind the prefix `erk_`), so its SHA-256 is a safe thing to
store: unlike passwords, nothing guessable is hashed, so a slow salted hash would add nothing. The file is
replaced atomically on every change and re-read by a running server when it changes, so `keys revoke`
takes effect at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from expertrag.errors import ExpertRAGError, InputError
from expertrag.fileio import atomic_write_json

KEYS_FILE = "keys.json"
FORMAT = 1
PREFIX = "erk_"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Principal:
    """Who a key belongs to. `admin` may ingest, delete, manage keys and see every passage."""

    name: str
    groups: tuple[str, ...]
    admin: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise InputError(f"{what} {value!r} must be 1-64 characters of letters, digits, '_', '.' or '-'")
    return value


class KeyStore:
    """The keys of one service. `lookup` is what the server calls per request (a stat and a dict look-up)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._by_hash: dict[str, Principal] = {}

    # ---- reading -------------------------------------------------------------------------------
    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExpertRAGError(f"{self.path}: not a readable keys file ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("keys"), list):
            raise ExpertRAGError(f"{self.path}: not a keys file of format {FORMAT}")
        for i, k in enumerate(data["keys"]):
            if not (isinstance(k, dict) and isinstance(k.get("name"), str) and isinstance(k.get("sha256"), str)
                    and isinstance(k.get("groups"), list) and all(isinstance(g, str) for g in k["groups"])):
                raise ExpertRAGError(f"{self.path}: keys[{i}] is malformed")
        return data["keys"]

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp == self._stamp:
            return
        self._by_hash = {
            k["sha256"]: Principal(k["name"], tuple(k["groups"]), bool(k.get("admin", False)))
            for k in self._read() if not k.get("revoked_at")
        }
        self._stamp = stamp

    def lookup(self, key: str | None) -> Principal | None:
        """The principal of an active key, or None (no key, unknown key, revoked key)."""
        if not key:
            return None
        self._refresh()
        return self._by_hash.get(hash_key(key))

    def list(self) -> list[dict]:
        """Every key's record without its hash (revoked ones included, marked)."""
        return [{"name": k["name"], "groups": list(k["groups"]), "admin": bool(k.get("admin", False)),
                 "created_at": k.get("created_at"), "revoked_at": k.get("revoked_at")} for k in self._read()]

    # ---- writing (read-modify-write under a lock, so two CLI calls never lose each other's key) ---
    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[dict]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            keys = self._read()
            yield keys
            atomic_write_json(self.path, {"format": FORMAT, "keys": keys})
            os.chmod(self.path, 0o600)  # hashes only, but nobody else needs to read them
        finally:
            os.close(fd)
        self._stamp = None

    def add(self, name: str, groups: list[str], *, admin: bool = False) -> str:
        """Create a key; returns it in clear, the only time it exists outside the caller's hands."""
        check_name(name, "key name")
        groups = sorted({check_name(g, "group") for g in groups})
        key = PREFIX + secrets.token_urlsafe(32)
        with self._locked() as keys:
            if any(k["name"] == name and not k.get("revoked_at") for k in keys):
                raise InputError(f"a key named {name!r} already exists; revoke it first or pick another name")
            keys.append({"name": name, "sha256": hash_key(key), "groups": groups, "admin": admin,
                         "created_at": datetime.now(UTC).isoformat(timespec="seconds"), "revoked_at": None})
        return key

    def revoke(self, name: str) -> None:
        with self._locked() as keys:
            active = [k for k in keys if k["name"] == name and not k.get("revoked_at")]
            if not active:
                raise InputError(f"no active key named {name!r}")
            for k in active:
                k["revoked_at"] = datetime.now(UTC).isoformat(timespec="seconds")


def keys_path(index_dir: str | Path, keys_file: str | None = None) -> Path:
    return Path(keys_file) if keys_file else Path(index_dir) / KEYS_FILE
