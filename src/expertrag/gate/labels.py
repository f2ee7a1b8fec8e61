"""Gate training labels: did this question need retrieval?

Derived from the two branches' correctness (closed-book vs open-book answer):
| closed_correct | open_correct | label       |
| true           | any          | no_retrieve |  the model knew it: retrieval can only cost
| false          | true         | retrieve    |  only the retrieved evidence made it right
| false          | false        | both_wrong  |  neither branch helps (see `target`)

Or from question metadata (existing annotations):
- `needs_retrieval: true|false` (RetrievalQA) -> retrieve | no_retrieve (takes precedence);
- `judgement` (SKR): `ir_better` -> retrieve, `ir_worse` -> no_retrieve, `same` -> no_retrieve: retrieval
  did not change the outcome, so skipping it loses nothing and saves its cost.

Label files are JSONL, one record a line:
`{id, question, label, closed_correct, open_correct, closed_answer, open_answer, metadata, closed_trace}`
(correctness/answers may be null for metadata-derived labels). `closed_trace` (optional) is the closed-book
answer's `{token_ids, logprobs, entropies}`: with greedy decoding its first `probe_tokens` steps are the gate's
probe, so gate training can take probe features from the label file instead of generating again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from expertrag.data.readers import _json_type, iter_jsonl_objects
from expertrag.errors import InputError
from expertrag.fileio import atomic_write_lines

LABELS: tuple[str, ...] = ("retrieve", "no_retrieve", "both_wrong")
JUDGEMENTS: dict[str, str] = {"ir_better": "retrieve", "ir_worse": "no_retrieve", "same": "no_retrieve"}
BothWrongAs = Literal["retrieve", "no_retrieve", "drop"]


def derive_label(closed_correct: bool, open_correct: bool) -> str:
    if closed_correct:
        return "no_retrieve"
    return "retrieve" if open_correct else "both_wrong"


def label_from_metadata(metadata: Mapping[str, Any], *, path: str | os.PathLike[str] | None = None,
                        line: int | None = None) -> str | None:
    """The label an annotated question carries (see the module doc), or None when it has none."""
    nr = metadata.get("needs_retrieval")
    if nr is not None:
        if not isinstance(nr, bool):
            raise InputError(f"must be true or false, got {_json_type(nr)}", path=path, line=line,
                             field="metadata.needs_retrieval")
        return "retrieve" if nr else "no_retrieve"
    j = metadata.get("judgement")
    if j is not None:
        if not isinstance(j, str) or j.strip() not in JUDGEMENTS:
            raise InputError(f"must be one of {', '.join(JUDGEMENTS)}, got {j!r}", path=path, line=line,
                             field="metadata.judgement")
        return JUDGEMENTS[j.strip()]
    return None


def target(label: str, both_wrong_as: BothWrongAs = "no_retrieve") -> int | None:
    """Binary training target: 1 = retrieval needed, 0 = not, None = leave the question out."""
    if label == "retrieve":
        return 1
    if label == "no_retrieve":
        return 0
    if label != "both_wrong":
        raise ValueError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
    if both_wrong_as == "drop":
        return None
    if both_wrong_as not in ("retrieve", "no_retrieve"):
        raise ValueError(f"both_wrong_as must be retrieve, no_retrieve or drop, got {both_wrong_as!r}")
    return 1 if both_wrong_as == "retrieve" else 0


def branch_rewards(label: str) -> tuple[float, float]:
    """(closed_correct, open_correct) stand-ins for a label without measured correctness, used by the
    end-to-end objectives: retrieve -> (0, 1), no_retrieve -> (1, 0), both_wrong -> (0, 0)."""
    return {"retrieve": (0.0, 1.0), "no_retrieve": (1.0, 0.0), "both_wrong": (0.0, 0.0)}[label]


@dataclass
class LabelRecord:
    id: str
    question: str
    label: str
    closed_correct: bool | None = None
    open_correct: bool | None = None
    closed_answer: str | None = None
    open_answer: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    closed_trace: dict[str, list] | None = None  # {token_ids, logprobs, entropies} of the closed-book answer

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["closed_trace"] is None:
            del d["closed_trace"]  # files without traces read exactly as before
        return d


def records_from_metadata(questions: Iterable[Any]) -> list[LabelRecord]:
    """Label records for the questions (expertrag.data.types.Question) whose metadata carries a label."""
    out = []
    for q in questions:
        lab = label_from_metadata(q.metadata)
        if lab is not None:
            out.append(LabelRecord(id=q.id, question=q.question, label=lab, metadata=dict(q.metadata)))
    return out


def write_labels(path: str | os.PathLike[str], records: Iterable[LabelRecord]) -> int:
    """Write records as JSONL, atomically (expertrag.fileio). Returns the count."""
    import json

    lines = [json.dumps(r.to_dict(), ensure_ascii=False) for r in records]
    atomic_write_lines(path, lines)
    return len(lines)


def _opt(obj: Mapping[str, Any], key: str, kind: type, p: Path, line: int) -> Any:
    v = obj.get(key)
    if v is not None and not isinstance(v, kind):
        want = "true or false" if kind is bool else "a string"
        raise InputError(f"must be {want} or null, got {_json_type(v)}", path=p, line=line, field=key)
    return v


def _record(obj: dict[str, Any], p: Path, line: int) -> LabelRecord:
    rid = obj.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid.strip():
        raise InputError("missing or not a non-empty string", path=p, line=line, field="id")
    question = obj.get("question")
    if not isinstance(question, str):
        raise InputError("missing or not a string", path=p, line=line, field="question")
    label = obj.get("label")
    if label not in LABELS:
        raise InputError(f"must be one of {', '.join(LABELS)}, got {label!r}", path=p, line=line, field="label")
    cc = _opt(obj, "closed_correct", bool, p, line)
    oc = _opt(obj, "open_correct", bool, p, line)
    if cc is not None and oc is not None and derive_label(cc, oc) != label:
        raise InputError(f"label '{label}' contradicts closed_correct={cc}, open_correct={oc} "
                         f"(expected '{derive_label(cc, oc)}')", path=p, line=line, field="label")
    meta = obj.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise InputError(f"must be an object, got {_json_type(meta)}", path=p, line=line, field="metadata")
    return LabelRecord(id=rid, question=question, label=label, closed_correct=cc, open_correct=oc,
                       closed_answer=_opt(obj, "closed_answer", str, p, line),
                       open_answer=_opt(obj, "open_answer", str, p, line), metadata=meta,
                       closed_trace=_trace(obj.get("closed_trace"), p, line))


def _trace(v: Any, p: Path, line: int) -> dict[str, list] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise InputError(f"must be an object, got {_json_type(v)}", path=p, line=line, field="closed_trace")
    out: dict[str, list] = {}
    for key, kind in (("token_ids", int), ("logprobs", float), ("entropies", float)):
        xs = v.get(key)
        if not isinstance(xs, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            raise InputError("must be a list of numbers", path=p, line=line, field=f"closed_trace.{key}")
        out[key] = [kind(x) for x in xs]
    if not len(out["token_ids"]) == len(out["logprobs"]) == len(out["entropies"]):
        raise InputError("token_ids, logprobs and entropies differ in length", path=p, line=line,
                         field="closed_trace")
    return out


def read_labels(path: str | os.PathLike[str]) -> list[LabelRecord]:
    """All records of a label file; InputError naming file, line and field for the first bad one."""
    p = Path(path)
    if not p.is_file():
        raise InputError("no such label file", path=p)

    def fail(err: InputError) -> None:
        raise err

    out: list[LabelRecord] = []
    seen: dict[str, int] = {}
    for line, obj in iter_jsonl_objects(p, fail):
        r = _record(obj, p, line)
        if r.id in seen:
            raise InputError(f"duplicate id '{r.id}' (first at line {seen[r.id]})", path=p, line=line, field="id")
        seen[r.id] = line
        out.append(r)
    return out


def split_folds(records: Iterable[LabelRecord], folds: int, seed: int = 0) -> list[list[LabelRecord]]:
    """Deterministic stratified folds: within each label, records are ordered by a seeded hash of their id
    and dealt round-robin, so every fold gets its share of each label (the rare `no_retrieve` above all)
    and a record's fold does not depend on file order. Fold i's complement is the training part for it."""
    import hashlib

    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    out: list[list[LabelRecord]] = [[] for _ in range(folds)]
    by_label: dict[str, list[LabelRecord]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    for label in sorted(by_label):
        ordered = sorted(by_label[label], key=lambda r: hashlib.sha256(f"{seed}:{r.id}".encode()).hexdigest())
        for i, r in enumerate(ordered):
            out[i % folds].append(r)
    return out


def parse_splits(spec: str) -> dict[str, float]:
    """"train=0.6,dev=0.2,test=0.2" -> {"train": 0.6, ...}; the shares must be positive and sum to 1."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, share = part.strip().partition("=")
        name = name.strip()
        if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise InputError(f"expected NAME=SHARE pairs separated by commas, got {part.strip()!r}", field="--splits")
        if name in out:
            raise InputError(f"split {name!r} named twice", field="--splits")
        try:
            out[name] = float(share)
        except ValueError:
            raise InputError(f"share of {name!r} is not a number: {share!r}", field="--splits") from None
        if not 0 < out[name] <= 1:
            raise InputError(f"share of {name!r} must be in (0, 1], got {out[name]}", field="--splits")
    if len(out) < 2:
        raise InputError("name at least two splits", field="--splits")
    if abs(sum(out.values()) - 1) > 1e-6:
        raise InputError(f"the shares sum to {sum(out.values()):g}, not 1", field="--splits")
    return out


def split_position(rid: str, seed: int = 0) -> float:
    """A question's fixed position in [0, 1): a seeded hash of its id alone."""
    import hashlib

    return int(hashlib.sha256(f"split:{seed}:{rid}".encode()).hexdigest()[:15], 16) / 16 ** 15


def split_fixed(records: Iterable[LabelRecord], shares: Mapping[str, float], seed: int = 0
                ) -> dict[str, list[LabelRecord]]:
    """Named splits (e.g. train/dev/test) in which each question's split depends only on its id and the
    seed: a label file that grows, or is reordered, never moves a question to another split, so a gate
    tuned on dev never sees a question that was once in test.

    Stratification "as far as that allows": an exact per-label deal (as `split_folds` does) would reshuffle
    when questions are added. The hash position is uniform and independent of the label, so every label
    lands in each split in proportion to the shares in expectation (binomial deviation, reported by the
    command); that is the most a per-id rule can promise."""
    names = list(shares)
    bounds = []
    acc = 0.0
    for n in names:
        acc += shares[n]
        bounds.append(acc)
    out: dict[str, list[LabelRecord]] = {n: [] for n in names}
    for r in records:
        u = split_position(r.id, seed)
        i = next((j for j, b in enumerate(bounds) if u < b), len(names) - 1)
        out[names[i]].append(r)
    return out
