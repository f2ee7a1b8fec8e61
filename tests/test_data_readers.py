"""Corpus readers: every input format, and every kind of bad input located by file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertrag.data import ChunkingConfig, IngestReport, iter_documents
from expertrag.errors import InputError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read(paths, **kw):
    return list(iter_documents(paths, **kw))


def raises_at(paths, *, line: int | None, field: str | None = None, match: str = "", **kw) -> InputError:
    with pytest.raises(InputError) as info:
        read(paths, **kw)
    err = info.value
    assert err.line == line, str(err)
    assert err.field == field, str(err)
    msg = str(err)
    assert msg.startswith(err.path)
    if line is not None:
        assert f":{line}" in msg
    if field is not None:
        assert f"'{field}'" in msg
    assert match in msg
    return err


# ------------------------------------------------------------------------------------------- JSONL


def test_jsonl_full_records(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [
        {"id": "a", "title": "Alpha", "contents": "Alpha is first.",
         "metadata": {"domain": "letters", "groups": ["staff"], "source": "demo"}},
        {"id": "b", "contents": "No title here."},
        {"id": 7, "title": None, "contents": "Integer id.", "metadata": None},
    ])
    docs = read(p)
    assert [d.id for d in docs] == ["a", "b", "7"]
    a = docs[0]
    assert (a.title, a.contents, a.line, a.source) == ("Alpha", "Alpha is first.", 1, str(p))
    assert a.metadata == {"domain": "letters", "groups": ["staff"], "source": "demo"}
    assert docs[1].title == "" and docs[1].metadata == {}
    assert docs[2].line == 3


def test_jsonl_flashrag_title_line_and_text_alias(tmp_path):
    p = write_jsonl(tmp_path / "f.jsonl", [
        {"id": "0", "contents": '"Aaron"\nAaron is a prophet.\nSecond line.'},
        {"id": "1", "contents": '"Quoted" words start this body without a title line.'},
        {"id": "2", "title": "Given", "contents": '"Kept"\nbody'},
        {"id": "3", "text": "BEIR-style text field."},
    ])
    d0, d1, d2, d3 = read(p)
    assert (d0.title, d0.contents) == ("Aaron", "Aaron is a prophet.\nSecond line.")
    assert (d1.title, d1.contents) == ("", '"Quoted" words start this body without a title line.')
    assert (d2.title, d2.contents) == ("Given", '"Kept"\nbody')
    assert d3.contents == "BEIR-style text field."


def test_jsonl_missing_id_defaults_to_stem_and_line_blank_lines_and_bom(tmp_path):
    p = tmp_path / "corpus.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"contents": "one"}\n\n   \n{"contents": "two"}\n')
    assert [(d.id, d.line) for d in read(p)] == [("corpus:1", 1), ("corpus:4", 4)]


@pytest.mark.parametrize("row, field, match", [
    ('{"id": "x", "contents": "ok"', None, "malformed JSON"),
    ('["a", "b"]', None, "expected a JSON object, got an array"),
    ({"id": "x"}, "contents", "missing"),
    ({"id": "x", "contents": "   \n"}, "contents", "empty"),
    ({"id": "x", "text": ""}, "text", "empty"),
    ({"id": "x", "contents": 5}, "contents", "must be a string, got a number"),
    ({"id": "x", "contents": '"T"\n  '}, "contents", "empty"),
    ({"id": ["x"], "contents": "c"}, "id", "must be a string"),
    ({"id": True, "contents": "c"}, "id", "must be a string, got a boolean"),
    ({"id": " ", "contents": "c"}, "id", "empty"),
    ({"id": "x", "title": 3, "contents": "c"}, "title", "must be a string"),
    ({"id": "x", "contents": "c", "metadata": []}, "metadata", "must be an object"),
    ({"id": "x", "contents": "c", "metadata": {"domain": 1}}, "metadata.domain", "must be a string"),
    ({"id": "x", "contents": "c", "metadata": {"groups": "staff"}}, "metadata.groups", "list of strings"),
    ({"id": "x", "contents": "c", "metadata": {"groups": ["a", 2]}}, "metadata.groups", "found 2"),
])
def test_jsonl_bad_record_names_line_and_field(tmp_path, row, field, match):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"id": "ok", "contents": "fine"}, row])
    raises_at(p, line=2, field=field, match=match)


def test_jsonl_non_utf8_line_reported_and_skippable(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"id": "a", "contents": "fine"}\n'
                  + '{"id": "b", "contents": "caf\u00e9"}\n'.encode("latin-1")
                  + b'{"id": "c", "contents": "also fine"}\n')
    raises_at(p, line=2, match="not valid UTF-8 (byte 0xe9")
    report = IngestReport()
    assert [d.id for d in read(p, skip_bad=True, report=report)] == ["a", "c"]
    assert report.skipped == 1 and report.problems[0][1] == 2


def test_empty_files_raise_or_are_skipped(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n", encoding="utf-8")
    good = write_jsonl(tmp_path / "good.jsonl", [{"id": "g", "contents": "x"}])
    for p in (empty, blank):
        raises_at(p, line=None, match="empty file")
    report = IngestReport()
    assert [d.id for d in read([empty, good, blank], skip_bad=True, report=report)] == ["g"]
    assert report.skipped == 2 and report.documents_read == 1
    assert report.per_file[str(empty)].skipped == 1 and report.per_file[str(good)].documents == 1


def test_duplicate_ids_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "contents": "first"}, {"id": "y", "contents": "y"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "z", "contents": "z"}, {"id": "x", "contents": "second"}])
    err = raises_at([a, b], line=2, field="id", match="duplicate id 'x'")
    assert err.path == str(b) and f"first seen at {a}:1" in str(err)
    report = IngestReport()
    docs = read([a, b], skip_bad=True, report=report)
    assert [d.id for d in docs] == ["x", "y", "z"] and docs[0].contents == "first"
    assert report.skipped == 1 and report.per_file[str(b)].skipped == 1


def test_skip_bad_counts_and_caps_examples(tmp_path):
    rows = []
    for i in range(150):
        rows.append({"id": f"ok{i}", "contents": "good"})
        rows.append("{not json")
    p = write_jsonl(tmp_path / "mixed.jsonl", rows)
    report = IngestReport()
    docs = read(p, skip_bad=True, report=report)
    assert len(docs) == 150 and report.documents_read == 150
    assert report.skipped == 150 and len(report.problems) == report.max_problems == 100
    assert report.problems[0] == (str(p), 2, "malformed JSON: Expecting property name enclosed in "
                                               "double quotes (column 2)")
    assert "150 skipped" in report.summary()


def test_reading_is_lazy(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "contents": "a"}, "broken"])
    it = iter_documents(p)
    assert next(it).id == "a"  # the bad second line is only seen when reached
    with pytest.raises(InputError):
        next(it)


# -------------------------------------------------------------------------------------- path errors


def test_missing_path_and_unsupported_extension_always_raise(tmp_path):
    with pytest.raises(InputError, match="no such file or directory") as info:
        read(tmp_path / "nope.jsonl", skip_bad=True)
    assert info.value.path == str(tmp_path / "nope.jsonl")
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(b"%PDF")
    with pytest.raises(InputError, match=r"unsupported file type '\.pdf'"):
        read(pdf, skip_bad=True)
    good = write_jsonl(tmp_path / "g.jsonl", [{"id": "g", "contents": "x"}])
    it = iter_documents([good, tmp_path / "later-missing.txt"])
    with pytest.raises(InputError, match="later-missing"):  # checked before the first document
        next(it)


# ------------------------------------------------------------------------------------ text and dirs


def test_txt_and_md_files(tmp_path):
    md = tmp_path / "guide.md"
    md.write_text("Intro line\n\n```\n# not a heading\n```\n## Install  ##\nSteps.\n", encoding="utf-8")
    setext = tmp_path / "setext.markdown"
    setext.write_text("The Title\n=========\nBody.\n", encoding="utf-8")
    plain = tmp_path / "notes.txt"
    plain.write_text("# plain text is not parsed\nhello\n", encoding="utf-8")
    nohead = tmp_path / "nohead.md"
    nohead.write_text("just text\n", encoding="utf-8")
    docs = {d.id: d for d in read([md, setext, plain, nohead])}
    assert docs["guide"].title == "Install" and docs["guide"].contents == md.read_text(encoding="utf-8")
    assert docs["setext"].title == "The Title"
    assert docs["notes"].title == "notes"
    assert docs["nohead"].title == "nohead"
    assert all(d.line is None and d.source for d in docs.values())


def test_text_file_problems(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    ws = tmp_path / "ws.md"
    ws.write_text("  \n\n", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\nline two\nbad \xff byte\n")
    raises_at(empty, line=None, match="empty file")
    raises_at(ws, line=None, match="only whitespace")
    raises_at(bad, line=3, match="not valid UTF-8 (byte 0xff at byte 5 of the line)")
    report = IngestReport()
    assert read([empty, ws, bad], skip_bad=True, report=report) == []
    assert report.skipped == 3


def test_directory_recursive_sorted_mixed_formats(tmp_path):
    root = tmp_path / "docs"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "z.txt").write_text("zed", encoding="utf-8")
    (root / "a.md").write_text("# A\nalpha", encoding="utf-8")
    (root / "b" / "deep" / "c.txt").write_text("see", encoding="utf-8")
    (root / "b" / "rows.csv").write_text("id,text\nr1,row one\n", encoding="utf-8")
    write_jsonl(root / "b" / "more.jsonl", [{"id": "j1", "contents": "json"}])
    (root / ".hidden" / "secret.txt").write_text("hidden", encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG")
    report = IngestReport()
    docs = read(root, report=report)
    assert [d.id for d in docs] == ["a", "b/deep/c", "j1", "r1", "z"]
    assert report.ignored_files == [str(root / "image.png")]
    # ids are relative to the root given, so they do not depend on where the corpus lives
    assert [d.id for d in read(root / "b" / "deep")] == ["c"]
    assert [d.id for d in read(root)] == [d.id for d in docs]


def test_empty_directory(tmp_path):
    (tmp_path / "d").mkdir()
    raises_at(tmp_path / "d", line=None, match="holds no corpus files")
    assert read(tmp_path / "d", skip_bad=True) == []


# --------------------------------------------------------------------------------------------- CSV


def test_csv_named_columns_and_metadata(tmp_path):
    p = tmp_path / "kb.csv"
    p.write_text('doc,heading,body,domain,groups,empty\n'
                 'k1,First,"Body one, with comma\nand a newline",hr,staff; managers,\n'
                 '\n'
                 'k2,Second,Body two,,,\n', encoding="utf-8")
    cfg = ChunkingConfig(csv_text_column="body", csv_title_column="heading", csv_id_column="doc")
    d1, d2 = read(p, config=cfg)
    assert (d1.id, d1.title, d1.contents, d1.line) == ("k1", "First", "Body one, with comma\nand a newline", 2)
    assert d1.metadata == {"domain": "hr", "groups": ["staff", "managers"]}
    assert (d2.id, d2.line, d2.metadata) == ("k2", 5, {})


def test_csv_default_id_and_title_and_tsv(tmp_path):
    p = tmp_path / "notes.csv"
    p.write_text("text\nfirst\n\nsecond\n", encoding="utf-8")
    assert [(d.id, d.title) for d in read(p)] == [("notes:1", ""), ("notes:2", "")]
    t = tmp_path / "tab.tsv"
    t.write_text("id\ttitle\ttext\nt1\tT\thas, commas\n", encoding="utf-8")
    (d,) = read(t)
    assert (d.id, d.title, d.contents) == ("t1", "T", "has, commas")


def test_csv_problems(tmp_path):
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("id,body\n1,x\n", encoding="utf-8")
    raises_at(nocol, line=1, field="text", match="text column 'text' not in the header (columns: id, body)")
    short = tmp_path / "short.csv"
    short.write_text("id,text\na,one\nb\nc,three\n", encoding="utf-8")
    raises_at(short, line=3, match="row has 1 fields, the header has 2")
    empty_text = tmp_path / "et.csv"
    empty_text.write_text("id,text\na,one\nb,  \n", encoding="utf-8")
    raises_at(empty_text, line=3, field="text", match="empty")
    empty_id = tmp_path / "eid.csv"
    empty_id.write_text("id,text\n,one\n", encoding="utf-8")
    raises_at(empty_id, line=2, field="id", match="empty")
    header_only = tmp_path / "ho.csv"
    header_only.write_text("id,text\n", encoding="utf-8")
    raises_at(header_only, line=None, match="header but no rows")
    nothing = tmp_path / "nothing.csv"
    nothing.write_bytes(b"")
    raises_at(nothing, line=None, match="empty file")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"id,text\na,ok\nb,caf\xe9\nc,fine\n")
    raises_at(latin, line=3, match="not valid UTF-8")
    report = IngestReport()
    docs = read([short, latin], skip_bad=True, report=report)
    assert [d.id for d in docs] == ["a", "c"]
    assert report.skipped == 4  # short.csv row b, latin.csv row b, and latin.csv's a and c (duplicate ids)


def test_csv_multiline_record_with_bad_byte_points_at_the_bad_line(tmp_path):
    p = tmp_path / "ml.csv"
    p.write_bytes(b'id,text\nx,"line one\nline \xff two"\ny,ok\n')
    raises_at(p, line=3, match="not valid UTF-8")
    assert [d.id for d in read(p, skip_bad=True)] == ["y"]
