"""Question files: the format, defaults, and bad input located by line and field."""

from __future__ import annotations

import json

import pytest

from expertrag.data import IngestReport, Question, load_questions
from expertrag.errors import InputError


def write(tmp_path, rows, name="qs.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return p


def test_questions_full_and_defaults(tmp_path):
    p = write(tmp_path, [
        {"id": "q1", "question": "Who wrote Hamlet?", "golden_answers": ["Shakespeare", "W. Shakespeare"],
         "metadata": {"source": "demo", "domain": "arts"}},
        {"question": "No id or answers?"},
        "",
        {"id": 42, "question": "Int id, single answer", "golden_answers": "yes", "metadata": None},
        {"id": "q4", "question": "Empty answer dropped", "golden_answers": [""]},
    ])
    qs = load_questions(p)
    assert qs[0] == Question("q1", "Who wrote Hamlet?")
    assert qs[0].golden_answers == ["Shakespeare", "W. Shakespeare"]
    assert qs[0].metadata == {"source": "demo", "domain": "arts"}
    assert (qs[1].id, qs[1].golden_answers, qs[1].metadata) == ("qs:2", [], {})
    assert (qs[2].id, qs[2].golden_answers) == ("42", ["yes"])
    assert qs[3].golden_answers == []


@pytest.mark.parametrize("row, field, match", [
    ("{bad json", None, "malformed JSON"),
    ({"id": "x"}, "question", "missing"),
    ({"id": "x", "question": "  "}, "question", "empty"),
    ({"id": "x", "question": 1}, "question", "must be a string"),
    ({"id": "x", "question": "q", "golden_answers": {"a": 1}}, "golden_answers", "list of strings"),
    ({"id": "x", "question": "q", "golden_answers": ["a", 1]}, "golden_answers", "found a number"),
    ({"id": "x", "question": "q", "metadata": "m"}, "metadata", "must be an object"),
    ({"id": 1.5, "question": "q"}, "id", "must be a string"),
    ({"id": "first", "question": "again"}, "id", "duplicate id 'first' (first seen at line 1)"),
])
def test_bad_question_lines(tmp_path, row, field, match):
    p = write(tmp_path, [{"id": "first", "question": "ok?"}, row])
    with pytest.raises(InputError) as info:
        load_questions(p)
    err = info.value
    assert (err.path, err.line, err.field) == (str(p), 2, field)
    assert str(err).startswith(f"{p}:2") and match in str(err)


def test_skip_bad_questions_and_non_utf8(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_bytes(b'{"id": "a", "question": "fine?"}\n'
                  b'{"id": "b", "question": "caf\xe9?"}\n'
                  b'{"id": "a", "question": "dup?"}\n'
                  b'{"id": "c", "question": "also fine?"}\n')
    with pytest.raises(InputError, match=r"q\.jsonl:2: not valid UTF-8"):
        load_questions(p)
    report = IngestReport()
    assert [q.id for q in load_questions(p, skip_bad=True, report=report)] == ["a", "c"]
    assert report.skipped == 2 and report.documents_read == 2
    assert [line for _, line, _ in report.problems] == [2, 3]


def test_missing_and_empty_question_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_questions(tmp_path / "none.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(InputError, match="empty file"):
        load_questions(empty)
    assert load_questions(empty, skip_bad=True) == []
