"""The expert registry: INDEX/experts.json, one record per named expert, written atomically.

An expert is a domain partition of the index (passages whose `metadata.domain` is the expert's) plus how to
answer from it: a system prompt, retrieval settings (k, mode), the access groups allowed to use it, and
flags for the parts built elsewhere (`sensitive`: route through the policy expert; `adapter`: a LoRA
folder relative to the registry's directory; `gate`: its own retrieval gate, experts/gates.py).

The file carries a `version` counter that every change increments. A running pipeline keeps a
`RegistrySnapshot` (immutable) and asks `ExpertRegistry.snapshot()` for the current one before each
question: that costs one `stat` unless the file changed, so hot add/retire needs no restart, and a
question that started on one snapshot finishes on it.

The "general" expert (no domain: the whole index the caller may see) always exists: implicitly when the
file does not name it, or as an explicit record that sets its prompt or k. It cannot be retired, so a
question always has somewhere to go.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from expertrag.errors import InputError
from expertrag.fileio import atomic_write_json

EXPERTS_FILE = "experts.json"
FORMAT = "expertrag-experts/1"
GENERAL = "general"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ExpertRecord(BaseModel):
    """One expert. `version` counts this expert's own changes (re-adding a retired name bumps it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    version: int = Field(1, ge=1)
    description: str = ""
    domain: str | None = Field(None, description="metadata.domain of its passages; None = general (all)")
    system_prompt: str = ""
    k: int | None = Field(None, gt=0, le=100, description="passages retrieved (None = pipeline.k)")
    mode: Literal["bm25", "dense", "hybrid"] | None = Field(None, description="None = pipeline.search_mode")
    groups: tuple[str, ...] = Field((), description="access groups allowed to use it; empty = everyone")
    sensitive: bool = False
    adapter: str | None = Field(None, description="LoRA adapter folder, relative to the registry's directory")
    gate: str | None = Field(None, description="its retrieval gate: a policy name (always, never, adaptive, ...), "
                                               "a trained gate folder relative to the registry's directory, or "
                                               "POLICY:FOLDER; None = the pipeline's policy")
    status: Literal["active", "retired"] = "active"
    created: str = Field(default_factory=now_iso)
    retired: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
        return v

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty (leave it out for the general expert)")
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not g.strip() for g in v):
            raise ValueError("empty group name")
        return tuple(dict.fromkeys(v))

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, v: str | None) -> str | None:
        # relative, inside the registry's directory: an index folder moved elsewhere keeps its adapters
        if v is not None and (os.path.isabs(v) or ".." in Path(v).parts or not v.strip()):
            raise ValueError("must be a folder path relative to the registry's directory, without '..'")
        return v

    @field_validator("gate")
    @classmethod
    def _gate(cls, v: str | None) -> str | None:
        # only the form here: whether the name is a policy or the folder holds a gate is checked where the
        # gate is loaded (experts/gates.py), which knows the policies and the registry's directory
        if v is None:
            return v
        folder = v.split(":", 1)[1] if ":" in v else v
        if not v.strip() or not folder.strip() or os.path.isabs(folder) or ".." in Path(folder).parts:
            raise ValueError("must be a gate policy name, a folder relative to the registry's directory "
                             "(without '..') or POLICY:FOLDER")
        return v

    @property
    def active(self) -> bool:
        return self.status == "active"

    def allows(self, groups: Sequence[str], all_groups: bool = False) -> bool:
        """May a caller with these access groups use this expert? Empty `groups` = everyone."""
        return all_groups or not self.groups or bool(set(self.groups) & set(groups))

    def to_json(self) -> dict[str, Any]:
        d = self.model_dump()
        d["groups"] = list(self.groups)
        return d


def general_record() -> ExpertRecord:
    """The implicit general expert: the whole index the caller may see, the pipeline's own settings."""
    return ExpertRecord(name=GENERAL, domain=None, description="everything without a better expert",
                        created="1970-01-01T00:00:00+00:00")


@dataclass(frozen=True)
class RegistrySnapshot:
    """The registry as one question sees it. `experts`: every record (retired ones too), by name."""

    version: int
    experts: tuple[ExpertRecord, ...]
    path: Path | None = None

    @property
    def active(self) -> tuple[ExpertRecord, ...]:
        """Active experts, the general one always among them (last)."""
        act = [e for e in self.experts if e.active and e.name != GENERAL]
        gen = next((e for e in self.experts if e.name == GENERAL), None) or general_record()
        return (*act, gen)

    @property
    def domain_experts(self) -> tuple[ExpertRecord, ...]:
        """Active experts that own a domain: routing is only worth running when there is one."""
        return tuple(e for e in self.active if e.domain is not None)

    def get(self, name: str) -> ExpertRecord | None:
        if name == GENERAL:
            return next((e for e in self.experts if e.name == GENERAL), None) or general_record()
        return next((e for e in self.experts if e.name == name), None)

    def general(self) -> ExpertRecord:
        return self.active[-1]


EMPTY = RegistrySnapshot(version=0, experts=())


def parse_registry(text: str, path: Path) -> RegistrySnapshot:
    """Parse and validate the registry file; every error names the file and the field."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e.msg} at line {e.lineno})", path=path) from None
    if not isinstance(obj, dict):
        raise InputError("must be a JSON object", path=path)
    if obj.get("format") != FORMAT:
        raise InputError(f"expected {FORMAT!r}, got {obj.get('format')!r}", path=path, field="format")
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise InputError("must be a non-negative integer", path=path, field="version")
    rows = obj.get("experts")
    if not isinstance(rows, list):
        raise InputError("must be a list", path=path, field="experts")
    records: list[ExpertRecord] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        try:
            rec = ExpertRecord.model_validate(row)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise InputError(err["msg"], path=path, field=f"experts[{i}]{'.' + loc if loc else ''}") from None
        if rec.name in seen:
            raise InputError(f"duplicate expert name {rec.name!r}", path=path, field=f"experts[{i}].name")
        if rec.name == GENERAL and rec.domain is not None:
            raise InputError("the general expert has no domain", path=path, field=f"experts[{i}].domain")
        seen.add(rec.name)
        records.append(rec)
    return RegistrySnapshot(version=version, experts=tuple(records), path=path)


class ExpertRegistry:
    """INDEX/experts.json. Readers call `snapshot()`; writers (`add`, `retire`) read-modify-write under an
    advisory lock, so two `expert add` commands at once never lose one another's record."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.path = self.dir / EXPERTS_FILE
        self._cached: RegistrySnapshot | None = None
        self._signature: tuple | None = None

    def exists(self) -> bool:
        return self.path.exists()

    def _stat_signature(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        # atomic writes replace the file, so the inode changes even within one mtime tick
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def snapshot(self) -> RegistrySnapshot:
        """The current registry, re-read only when the file changed since the last call."""
        sig = self._stat_signature()
        if sig is not None and sig == self._signature and self._cached is not None:
            return self._cached
        self._cached, self._signature = self._read(), sig
        return self._cached

    def _read(self) -> RegistrySnapshot:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return RegistrySnapshot(version=0, experts=(), path=self.path)
        except UnicodeDecodeError:
            raise InputError("not UTF-8 text", path=self.path) from None
        return parse_registry(text, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[RegistrySnapshot]:
        if not self.dir.is_dir():
            raise InputError("no such index directory", path=self.dir)
        with open(self.dir / f".{EXPERTS_FILE}.lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield self._read()
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write(self, version: int, records: Sequence[ExpertRecord]) -> RegistrySnapshot:
        atomic_write_json(self.path, {"format": FORMAT, "version": version,
                                      "experts": [r.to_json() for r in records]})
        self._cached, self._signature = None, None
        return self.snapshot()

    def add(self, records: Sequence[ExpertRecord], *, replace: bool = False) -> RegistrySnapshot:
        """Register experts in one write. A name already active is an error unless `replace` (then it gets
        a new version); a retired name comes back active with the next version."""
        with self._locked() as snap:
            by_name = {r.name: r for r in snap.experts}
            for rec in records:
                old = by_name.get(rec.name)
                if rec.name == GENERAL and rec.domain is not None:
                    raise InputError("the general expert has no domain; give another name", field="name")
                if old is not None and old.active and not replace:
                    raise InputError(f"expert {rec.name!r} exists (version {old.version}); retire it first "
                                     "or use --replace", field="name")
                version = old.version + 1 if old is not None else 1
                by_name[rec.name] = rec.model_copy(update={"version": version, "status": "active",
                                                           "retired": None})
            return self._write(snap.version + 1, list(by_name.values()))

    def retire(self, name: str) -> RegistrySnapshot:
        """Mark an expert retired (kept in the file, for the record and for re-adding it later)."""
        if name == GENERAL:
            raise InputError("the general expert cannot be retired: a question always needs an expert",
                             field="name")
        with self._locked() as snap:
            rec = snap.get(name)
            if rec is None:
                raise InputError(f"no expert named {name!r}", path=self.path, field="name")
            if not rec.active:
                raise InputError(f"expert {name!r} is already retired (since {rec.retired})", field="name")
            retired = rec.model_copy(update={"status": "retired", "retired": now_iso()})
            return self._write(snap.version + 1, [retired if r.name == name else r for r in snap.experts])
