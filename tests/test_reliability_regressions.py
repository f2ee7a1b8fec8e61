"""Issue 10: each hole the hostile-input probe found, as a test that failed on the old code.

Must-fix: (1) metadata-only changes, (2) fail-open access default, (3) passage-id collisions,
(4) corrupt cached embeddings, (5) tracebacks. Should-fix items follow.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest

from expertrag.data import IngestReport, iter_documents
from expertrag.data.types import Document
from expertrag.errors import IndexFormatError, InputError
from expertrag.model.backend import Capabilities, Generation
from expertrag.retrieval import Filters, Index, build_index
from expertrag.retrieval.embedder import Embedder, passage_text
from reliability_helpers import assert_one_line_error, cli, run_unprivileged

TEXT = "Quarterly salary bands for the platform team are reviewed every spring."


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_index(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel") / "index"
    build_index(out, [
        Document("pub", "Public note", "The cafeteria opens at eight and serves soup on Fridays."),
        Document("hr", "Salaries", TEXT, {"groups": ["hr"]}),
        Document("eng", "Deploys", "Deploys of the platform happen on Tuesdays after review.", {"groups": ["eng"]}),
    ], progress=False)
    return out


# ---- (1) a metadata-only change is a change -------------------------------------------------------

def test_metadata_only_change_is_a_change_and_new_groups_apply_at_once(tmp_path):
    out = tmp_path / "idx"
    build_index(out, [Document("a", "Salaries", TEXT, {})], progress=False)
    idx = Index(out)
    assert idx.search("salary bands", 3, "bm25", Filters(groups=("eng",)))[0].id == "a"  # public so far
    idx.close()

    report = build_index(out, [Document("a", "Salaries", TEXT, {"groups": ["hr"]})], progress=False)
    assert report.counts["changed"] == 1 and report.counts["unchanged"] == 0
    assert report.embedded == 0  # same text: the cached vector is reused
    idx = Index(out)
    (stored,) = idx.store.get(list(idx.store.allowed_rowids(idx.generation, all_groups=True))).values()
    assert stored.groups == ["hr"] and stored.metadata["groups"] == ["hr"]
    for mode in ("bm25", "dense", "hybrid"):
        assert idx.search("salary bands", 3, mode, Filters(groups=("eng",))) == []
        assert idx.search("salary bands", 3, mode, Filters(groups=("hr",)))[0].id == "a"
    idx.close()

    # any metadata, not only access fields; and unchanged really means unchanged
    report = build_index(out, [Document("a", "Salaries", TEXT, {"groups": ["hr"], "domain": "people"})],
                         progress=False)
    assert report.counts["changed"] == 1
    report = build_index(out, [Document("a", "Salaries", TEXT, {"domain": "people", "groups": ["hr"]})],
                         progress=False)
    assert report.counts == {"added": 0, "changed": 0, "unchanged": 1, "removed": 0}


# ---- (2) no groups = public only; everything needs --all-groups -----------------------------------

@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_no_groups_sees_public_passages_only(small_index, mode):
    idx = Index(small_index)
    for filters in (None, Filters(), Filters(groups=())):
        ids = {h.id for h in idx.search("salary bands platform deploys cafeteria", 10, mode, filters)}
        assert ids <= {"pub"}, ids
    every = {h.id for h in idx.search("salary bands platform deploys cafeteria", 10, mode, Filters(all_groups=True))}
    assert every == {"pub", "hr", "eng"} or mode == "bm25" and {"hr", "eng"} <= every
    with pytest.raises(ValueError):
        Filters(groups=("hr",), all_groups=True)


def test_cli_search_fails_closed_and_all_groups_is_explicit(small_index):
    code, out, err = cli("search", "--index", str(small_index), "--json", "-k", "5", "--mode", "bm25",
                         "salary bands platform")
    assert code == 0 and {h["id"] for h in json.loads(out)} <= {"pub"}
    code, out, err = cli("search", "--index", str(small_index), "--json", "-k", "5", "--mode", "bm25",
                         "--all-groups", "salary bands platform")
    assert code == 0 and {"hr", "eng"} <= {h["id"] for h in json.loads(out)}
    code, out, err = cli("search", "--index", str(small_index), "--group", "hr", "--all-groups", "salary")
    assert_one_line_error(code, err, "--all-groups")


def test_pipeline_answer_without_user_is_public_only(small_index):

    from expertrag.gate.policies import make_policy
    from expertrag.pipeline.answer import User
    from expertrag.pipeline.config import PipelineConfig
    from expertrag.pipeline.rag import ExpertRAG

    class Silent:  # generation is not under test here: retrieval's access filter is
        capabilities = Capabilities(backend="silent", model="none", continuation=False, streaming=False)

        def generate(self, messages, **kw):
            return Generation(text="", token_ids=[], logprobs=[], entropies=[], state=None, prompt_tokens=0,
                              finish_reason="stop")

    rag = ExpertRAG(Index(small_index), Silent(), make_policy("always"),
                    PipelineConfig(k=5, answer_cache_size=0, retrieval_cache_size=0), "always")
    q = "salary bands platform deploys"
    assert {p["id"] for p in rag.answer(q).passages} <= {"pub"}
    assert {p["id"] for p in rag.answer(q, User("u", ("hr",))).passages} <= {"pub", "hr"}
    assert {"hr", "eng"} <= {p["id"] for p in rag.answer(q, User("admin", all_groups=True)).passages}


def test_readme_states_the_access_rule():
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert "--all-groups" in readme and "public passages only" in readme


# ---- (3) passage ids are unique by construction; delete says what it removed ----------------------

def test_document_id_with_the_separator_is_refused(tmp_path):
    long_text = " ".join(f"Sentence {i} about glaciers and moraines." for i in range(120))
    out = tmp_path / "idx"
    with pytest.raises(InputError, match="contains '#'"):
        build_index(out, [Document("h", "H", long_text), Document("h#0", "Other", "Other text.")],
                    progress=False)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "h", "contents": long_text},
                                                {"id": "h#0", "contents": "Other text."}])
    with pytest.raises(InputError) as e:
        list(iter_documents(corpus))
    assert e.value.line == 2 and e.value.field == "id" and "c.jsonl" in str(e.value)
    report = IngestReport()
    assert [d.id for d in iter_documents(corpus, skip_bad=True, report=report)] == ["h"]
    assert report.skipped == 1


def test_delete_reports_exactly_what_it_removed(tmp_path):
    long_text = " ".join(f"Sentence {i} about glaciers and moraines." for i in range(120))
    out = tmp_path / "idx"
    build = build_index(out, [Document("h", "H", long_text), Document("x", "X", "Other text.")], progress=False)
    n_h = build.passages - 1
    assert n_h > 1
    code, stdout, err = cli("delete", "--index", str(out), "h#0")
    assert code == 0 and "deleted h#0: passage" in stdout and "1 passages for 1 ids" in stdout
    code, stdout, err = cli("delete", "--index", str(out), "h")
    assert code == 0 and f"deleted h: {n_h - 1} passages (h#1" in stdout
    idx = Index(out)
    assert idx.store.live_ids(idx.generation) == ["x"]
    code, stdout, err = cli("delete", "--index", str(out), "x", "nope")
    assert_one_line_error(code, err, "'nope'", "nothing was deleted")
    assert Index(out).store.live_ids(Index(out).generation) == ["x"]  # refused as a whole


# ---- (4) cached embeddings are verified, never trusted --------------------------------------------

def test_corrupt_cached_embedding_is_reembedded_not_trusted(tmp_path):
    out = tmp_path / "idx"
    docs = [Document("a", "Aurora", "An aurora is a natural light display in polar skies."),
            Document("b", "Tide", "Tides are the rise and fall of sea levels caused by the Moon.")]
    build_index(out, docs, progress=False)
    con = sqlite3.connect(out / "store.sqlite")
    (h,) = con.execute("SELECT content_hash FROM passages WHERE id='a'").fetchone()
    blob = con.execute("SELECT vector FROM embeddings WHERE content_hash=?", (h,)).fetchone()[0]
    bad = np.frombuffer(blob, dtype=np.float32).copy()[::-1].copy()  # a plausible, wrong unit vector
    con.execute("UPDATE embeddings SET vector=? WHERE content_hash=?", (bad.tobytes(), h))
    con.commit()
    assert con.execute("PRAGMA quick_check").fetchone()[0] == "ok"  # SQLite cannot see it
    con.close()

    report = build_index(out, docs + [Document("c", "Comet", "A comet is an icy body.")], progress=False)
    assert report.reembedded == 1 and report.embedded == 2  # the bad one and the new one
    idx = Index(out)
    rowid = next(r for r, p in idx.store.get(list(range(1, 10))).items() if p.id == "a")
    stored = idx.dense.index.reconstruct(int(rowid))
    fresh = Embedder("all-MiniLM-L6-v2").encode([passage_text("Aurora", docs[0].contents)])[0]
    assert np.allclose(stored, fresh, atol=1e-5) and not np.allclose(stored, bad, atol=1e-3)
    code, stdout, err = cli("index", "--corpus", str(write_jsonl(tmp_path / "c.jsonl", [
        {"id": "a", "title": "Aurora", "contents": docs[0].contents}])), "--out", str(out))
    assert code == 0  # a clean cache reports nothing
    assert "failed verification" not in err


# ---- (5) tracebacks become one-line errors with exit 2 ---------------------------------------------

@pytest.mark.parametrize("skip_bad", [False, True])
def test_deeply_nested_json_is_a_clean_error(tmp_path, skip_bad):
    corpus = tmp_path / "deep.jsonl"
    corpus.write_text('{"id": "a", "contents": "x", "metadata": {"k": ' + "[" * 200_000 + "]" * 200_000
                      + "}}\n", encoding="utf-8")
    args = ["index", "--corpus", str(corpus), "--out", str(tmp_path / "out")] + (["--skip-bad"] if skip_bad else [])
    code, out, err = cli(*args)
    if skip_bad:  # the only record is skipped, so the file holds nothing: a clean error, no traceback
        assert code in (0, 2) and "Traceback" not in err and "nested too deeply" in err
    else:
        assert_one_line_error(code, err, "deep.jsonl:1", "nested too deeply")
    corpus.write_text('{"id": "a", "contents": "x", "metadata": {"k": ' + "[" * 500 + "]" * 500 + "}}\n"
                      '{"id": "b", "contents": "fine"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="nested more than"):
        list(iter_documents(corpus))
    assert [d.id for d in iter_documents(corpus, skip_bad=True)] == ["b"]


@pytest.mark.parametrize("skip_bad", [False, True])
def test_lone_surrogate_is_a_clean_error(tmp_path, skip_bad):
    corpus = tmp_path / "sur.jsonl"
    corpus.write_text('{"id": "a", "contents": "bad \\ud800 text"}\n{"id": "b", "contents": "good text"}\n',
                      encoding="utf-8")
    out = tmp_path / "out"
    args = ["index", "--corpus", str(corpus), "--out", str(out), "--json"] + (["--skip-bad"] if skip_bad else [])
    code, stdout, err = cli(*args)
    if skip_bad:
        assert code == 0 and json.loads(stdout)["passages"] == 1 and "Traceback" not in err
    else:
        assert_one_line_error(code, err, "sur.jsonl:1", "'contents'", "surrogate")
    with pytest.raises(InputError, match="surrogate"):
        build_index(tmp_path / "api", [Document("m", "T", "ok", {"k": ["\udfff"]})], progress=False)


def test_out_naming_a_file_is_a_clean_error(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "contents": "text"}])
    target = tmp_path / "existing.txt"
    target.write_text("not an index")
    code, out, err = cli("index", "--corpus", str(corpus), "--out", str(target))
    assert_one_line_error(code, err, "existing.txt", "--out")
    with pytest.raises(InputError, match="not a directory"):
        build_index(target, [], progress=False)


def test_unreadable_corpus_file_and_directory_are_reported_as_such(tmp_path):
    corpus = write_jsonl(tmp_path / "secret.jsonl", [{"id": "a", "contents": "text"}])
    corpus.chmod(0)
    folder = tmp_path / "locked"
    folder.mkdir()
    write_jsonl(folder / "x.jsonl", [{"id": "b", "contents": "text"}])
    folder.chmod(0)
    try:
        proc = run_unprivileged("index", "--corpus", str(corpus), "--out", str(tmp_path / "o1"))
        assert_one_line_error(proc.returncode, proc.stderr, "secret.jsonl", "cannot read file", "Permission denied")
        proc = run_unprivileged("index", "--corpus", str(folder), "--out", str(tmp_path / "o2"))
        assert_one_line_error(proc.returncode, proc.stderr, "locked", "cannot read directory")
        assert "holds no corpus files" not in proc.stderr
    finally:
        corpus.chmod(0o644)
        folder.chmod(0o755)


def test_self_looping_symlink_is_reported_as_such(tmp_path):
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    code, out, err = cli("index", "--corpus", str(loop), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "loop.jsonl", "symlink loop")
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "gone.jsonl")
    code, out, err = cli("index", "--corpus", str(dangling), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "dangling symlink")


@pytest.mark.parametrize("value", [[], None, "x", {"a": 1}])
def test_manifest_with_bad_files_field_is_a_clean_error(small_index, tmp_path, value):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_index, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["files"] = value
    (copy / "manifest.json").write_text(json.dumps(m))
    code, out, err = cli("search", "--index", str(copy), "anything")
    assert_one_line_error(code, err, "manifest.json", "files")


def test_malformed_json_in_a_passage_row_names_the_file(small_index, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_index, copy)
    con = sqlite3.connect(copy / "store.sqlite")
    con.execute("UPDATE passages SET metadata='{\"broken' WHERE id='pub'")
    con.commit()
    con.close()
    code, out, err = cli("search", "--index", str(copy), "cafeteria soup")
    assert_one_line_error(code, err, "store.sqlite", "'metadata'", "malformed JSON", "pub")
    with pytest.raises(IndexFormatError, match="store.sqlite"):
        Index(copy).search("cafeteria soup", 3, "bm25")


@pytest.mark.parametrize("argv, needle", [
    (["search", "-i", "x", "-k", "abc", "q"], "'-k'"),
    (["search", "-i", "x", "-k", "1.5", "q"], "'-k'"),
    (["search", "--no-such-option", "q"], "--no-such-option"),
    (["search", "q"], "--index"),
    (["index", "--corpus", "c.jsonl"], "--out"),
    (["no-such-command"], "no-such-command"),
    (["bench", "no-such-sub"], "no-such-sub"),
    (["delete", "--index", "x"], "'ids'"),
])
def test_cli_usage_errors_are_one_line_exit_2(argv, needle):
    code, out, err = cli(*argv)
    assert_one_line_error(code, err, needle)


def test_cli_usage_error_in_a_real_process_has_no_traceback():
    proc = run_unprivileged("search", "-k", "abc", "q")  # the console path, as a user runs it
    assert_one_line_error(proc.returncode, proc.stderr, "'-k'")


# ---- should-fix ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("meta", [{"Groups": ["hr"]}, {"group": "hr"}, {"access_groups": ["hr"]}])
def test_misspelt_access_key_warns_and_strict_refuses(tmp_path, meta):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "contents": "text", "metadata": meta}])
    report = IngestReport()
    assert len(list(iter_documents(corpus, report=report))) == 1
    assert report.warned == 1 and "public" in report.warnings[0][2]
    with pytest.raises(InputError, match="strict"):
        list(iter_documents(corpus, strict=True))
    code, out, err = cli("index", "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--strict")
    assert_one_line_error(code, err, "c.jsonl:1", "metadata.")
    code, out, err = cli("index", "--corpus", str(corpus), "--out", str(tmp_path / "o"))
    assert code == 0 and "warning:" in err


def test_csv_groups_cell_naming_no_group_warns(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("id,text,groups\na,text one, ; \nb,text two,hr\n", encoding="utf-8")
    report = IngestReport()
    docs = list(iter_documents(p, report=report))
    assert [d.metadata.get("groups") for d in docs] == [[], ["hr"]]
    assert report.warned == 1 and report.warnings[0][1] == 2
    with pytest.raises(InputError, match="names no group"):
        list(iter_documents(p, strict=True))


def test_read_only_index_directory_is_searchable(small_index, tmp_path):
    import shutil

    copy = tmp_path / "ro"
    shutil.copytree(small_index, copy)
    for p in copy.rglob("*"):
        p.chmod(0o555 if p.is_dir() else 0o444)
    copy.chmod(0o555)
    for leftover in copy.glob("store.sqlite-*"):  # WAL files of the fixture's open readers: a clean copy
        leftover.unlink()
    before = sorted(p.name for p in copy.iterdir())
    try:
        proc = run_unprivileged("search", "--index", str(copy), "--json", "--mode", "bm25", "cafeteria soup")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)[0]["id"] == "pub"
        assert sorted(p.name for p in copy.iterdir()) == before
    finally:
        copy.chmod(0o755)
        for p in copy.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_manifest_has_the_ordinary_file_mode(small_index):
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((small_index / "manifest.json").stat().st_mode) == 0o666 & ~umask


def test_ids_with_newlines_and_escape_sequences_are_printed_escaped(tmp_path):
    out = tmp_path / "idx"
    build_index(out, [Document("evil\n\x1b[2Jid", "Title\x1b[31m", "Red\x1b[0m text\nabout kelp forests.")],
                progress=False)
    code, stdout, err = cli("search", "--index", str(out), "--mode", "bm25", "kelp forests")
    assert code == 0 and "\x1b" not in stdout and "evil\\n\\x1b[2Jid" in stdout
    assert len(stdout.strip().splitlines()) == 2  # the hit line and its text line
    code, stdout, err = cli("delete", "--index", str(out), "evil\n\x1b[2Jid")
    assert code == 0 and "\x1b" not in stdout and "\n\x1b" not in stdout
    code, stdout, err = cli("delete", "--index", str(out), "gone\x1b[2J")
    assert_one_line_error(code, err)
    assert "\x1b" not in err


def test_nan_and_infinity_never_reach_json_output(tmp_path):
    corpus = tmp_path / "nan.jsonl"
    corpus.write_text('{"id": "a", "contents": "text", "metadata": {"score": NaN}}\n'
                      '{"id": "b", "contents": "text two", "metadata": {"score": -Infinity}}\n', encoding="utf-8")
    with pytest.raises(InputError, match="NaN is not valid JSON"):
        list(iter_documents(corpus))
    with pytest.raises(InputError, match="not valid JSON"):
        build_index(tmp_path / "api", [Document("a", "T", "text", {"x": float("inf")})], progress=False)
    # an index written before the check: the output is still strict JSON
    out = tmp_path / "idx"
    build_index(out, [Document("a", "Kelp", "Kelp forests grow in cold water.", {"x": 1.0})], progress=False)
    con = sqlite3.connect(out / "store.sqlite")
    con.execute("UPDATE passages SET metadata='{\"x\": NaN, \"y\": Infinity}'")
    con.commit()
    con.close()
    code, stdout, err = cli("search", "--index", str(out), "--json", "--mode", "bm25", "kelp")
    assert code == 0
    hits = json.loads(stdout, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
    assert hits[0]["metadata"]["x"] is None and hits[0]["metadata"]["y"] is None
