"""Question files: JSONL, one `{"id", "question", "golden_answers", "metadata"}` object a line.

- `question`: required non-empty string.
- `id`: a non-empty string or an integer (turned into its decimal string); when absent it defaults to
  `<file stem>:<line>` (stable as long as the file is not edited above that line). Duplicate ids are
  errors.
- `golden_answers`: optional list of strings (absent or null → `[]`); a bare string is taken as a
  one-answer list. Empty-string answers are dropped (FlashRAG's SKR sample has `[""]`).
- `metadata`: optional object; `domain`/`groups` are checked as for corpora.

Errors are `InputError`s naming file, line and field; with `skip_bad=True` bad lines are skipped and
counted in `report` instead (an empty file then gives `[]`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from expertrag.data.readers import (
    IngestReport,
    _json_type,
    _Problems,
    iter_jsonl_objects,
    record_id,
    record_metadata,
)
from expertrag.data.types import Question
from expertrag.errors import InputError


def _golden_answers(obj: dict[str, Any], path: Path, lineno: int) -> list[str]:
    value = obj.get("golden_answers")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise InputError(f"must be a list of strings, got {_json_type(value)}", path=path, line=lineno,
                         field="golden_answers")
    answers = []
    for a in value:
        if not isinstance(a, str):
            raise InputError(f"must be a list of strings, found {_json_type(a)}", path=path, line=lineno,
                             field="golden_answers")
        if a.strip():
            answers.append(a)
    return answers


def _question_from_json(obj: dict[str, Any], path: Path, lineno: int) -> Question:
    qid = record_id(obj, path, lineno)
    if "question" not in obj:
        raise InputError("missing", path=path, line=lineno, field="question")
    text = obj["question"]
    if not isinstance(text, str):
        raise InputError(f"must be a string, got {_json_type(text)}", path=path, line=lineno, field="question")
    if not text.strip():
        raise InputError("is empty", path=path, line=lineno, field="question")
    return Question(id=qid, question=text, golden_answers=_golden_answers(obj, path, lineno),
                    metadata=record_metadata(obj, path, lineno))


def load_questions(path: str | os.PathLike[str], *, skip_bad: bool = False,
                   report: IngestReport | None = None) -> list[Question]:
    """All questions of a JSONL file, in file order (see the module doc for the format)."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file", path=p)
    if not p.is_file():
        raise InputError("not a regular file (a question file is one JSONL file)", path=p)
    problem = _Problems(skip_bad, report)
    rep = problem.report
    rep.file(str(p))
    out: list[Question] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl_objects(p, problem):
        try:
            q = _question_from_json(obj, p, lineno)
            if q.id in seen:
                raise InputError(f"duplicate id '{q.id}' (first seen at line {seen[q.id]})", path=p,
                                 line=lineno, field="id")
        except InputError as err:
            problem(err)
            continue
        seen[q.id] = lineno
        rep.record_document(str(p))
        out.append(q)
    return out
