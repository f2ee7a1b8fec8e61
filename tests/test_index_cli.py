"""The index/search/delete commands end to end, bad input, and builds killed with SIGKILL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from expertrag.retrieval import Index

ROWS = [
    {"id": "d1", "title": "Aurora", "contents": "An aurora is a natural light display in polar skies."},
    {"id": "d2", "title": "Tide", "contents": "Tides are the rise and fall of sea levels caused by the Moon."},
    {"id": "d3", "title": "Comet", "contents": "A comet is an icy body that releases gas when passing the Sun."},
]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "expertrag", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}")
    return proc


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    corpus = write_jsonl(tmp / "corpus.jsonl", ROWS)
    notes = tmp / "notes"
    notes.mkdir()
    (notes / "kelp.md").write_text("# Kelp\n\nKelp forests grow in cold, nutrient-rich coastal water.\n")
    out = tmp / "index"
    proc = run_cli("index", "--corpus", str(corpus), str(notes), "--out", str(out), "--json")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return tmp, out, report


def test_index_and_search_json(built):
    tmp, out, report = built
    assert report["passages"] == 4 and report["generation"] == 1 and report["embedded"] == 4
    hits = json.loads(run_cli("search", "--index", str(out), "--json", "-k", "2", "light display polar").stdout)
    assert len(hits) == 2 and hits[0]["id"] == "d1"
    assert set(hits[0]) == {"id", "title", "contents", "score", "metadata"}
    text = run_cli("search", "--index", str(out), "--mode", "bm25", "kelp forests").stdout
    assert "Kelp" in text and "1." in text


def test_search_queries_file(built):
    tmp, out, _ = built
    qfile = write_jsonl(tmp / "q.jsonl", [{"id": "q1", "question": "what causes tides?", "golden_answers": ["Moon"]},
                                           {"id": "q2", "question": "icy body near the Sun"}])
    lines = run_cli("search", "--index", str(out), "--queries", str(qfile), "-k", "1").stdout.strip().splitlines()
    got = [json.loads(line) for line in lines]
    assert [g["id"] for g in got] == ["q1", "q2"]
    assert got[0]["hits"][0]["id"] == "d2" and got[1]["hits"][0]["id"] == "d3"


def test_bad_input_is_reported_with_file_and_line_and_nothing_is_lost(built):
    tmp, out, _ = built
    bad = tmp / "bad.jsonl"
    bad.write_bytes(b'{"id": "n1", "contents": "Fine line about glaciers."}\n{"id": "n2", "contents": \n'
                    b'{"id": "n3"}\n{"id": "n4", "contents": "caf\xe9 bytes"}\n')
    proc = run_cli("index", "--corpus", str(bad), "--out", str(out), check=False)
    assert proc.returncode == 2
    assert f"{bad}:2" in proc.stderr and "Traceback" not in proc.stderr
    assert len(Index(out)) == 4  # the committed index is untouched

    proc = run_cli("index", "--corpus", str(bad), "--out", str(out), "--skip-bad", "--json")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ingest"]["skipped"] == 3 and report["counts"]["added"] == 1
    assert {p[1] for p in report["ingest"]["problems"]} == {2, 3, 4}
    assert len(Index(out)) == 5


def test_cli_errors_are_one_line(tmp_path):
    proc = run_cli("search", "--index", str(tmp_path / "none"), "query", check=False)
    assert proc.returncode == 2 and "index directory not found" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_cli("index", "--corpus", str(empty), "--out", str(tmp_path / "i"), check=False)
    assert proc.returncode == 2 and str(empty) in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("index", "--corpus", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "i"), check=False)
    assert proc.returncode == 2 and "missing.jsonl" in proc.stderr


def test_delete_command(built, tmp_path):
    import shutil

    _, out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    run_cli("delete", "--index", str(copy), "d3")
    assert "d3" not in Index(copy).store.live_ids(Index(copy).generation)
    proc = run_cli("delete", "--index", str(copy), "nope", check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr


KILLER = textwrap.dedent("""
    import os, signal, sys
    from expertrag.data.types import Document
    from expertrag.retrieval import builder

    out, point = sys.argv[1], sys.argv[2]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "bm25":
        builder.write_bm25 = die
    elif point == "manifest":
        builder.write_manifest = die
    elif point == "embed":
        real = builder.Embedder.encode
        calls = []
        def encode_then_die(self, texts, **kw):
            calls.append(1)
            if len(calls) > 1:
                die()
            return real(self, texts, **kw)
        builder.Embedder.encode = encode_then_die
        builder.EMBED_COMMIT_ROWS = 2
    docs = [Document(id=f"new{i}", title="New", contents=f"Fresh passage number {i} about volcanoes.")
            for i in range(5)]
    docs.append(Document(id="d1", title="Aurora", contents="Auroras were rewritten in this build."))
    builder.build_index(out, docs, progress=False)
""")


@pytest.mark.parametrize("point", ["embed", "bm25", "manifest"])
def test_killed_build_leaves_previous_index_usable_and_rerun_completes(built, tmp_path, point):
    import shutil

    _, out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = Index(copy)
    n_before, ids_before = len(before), before.store.live_ids(before.generation)
    before.close()

    proc = subprocess.run([sys.executable, "-c", KILLER, str(copy), point], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == -9, proc.stderr  # really killed

    after = Index(copy)  # verifies checksums and the store
    assert len(after) == n_before and after.store.live_ids(after.generation) == ids_before
    assert after.search("light display polar skies", 1, "hybrid")[0].contents.startswith("An aurora")
    assert not any(h.id.startswith("new") for h in after.search("fresh passage volcanoes", 5, "hybrid"))
    after.close()

    # rerun without the kill: completes, no duplicates, and the rewritten passage replaced the old one
    proc = subprocess.run([sys.executable, "-c", KILLER, str(copy), "none"], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    final = Index(copy)
    ids = final.store.live_ids(final.generation)
    assert len(ids) == len(set(ids)) == n_before + 5
    assert final.search("Auroras were rewritten", 1, "bm25")[0].contents.startswith("Auroras were rewritten")
    leftovers = [p.name for p in copy.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_recall_command(built):
    tmp, out, _ = built
    qfile = write_jsonl(tmp / "rq.jsonl", [
        {"id": "a", "question": "what pulls the tides?", "golden_answers": ["the Moon"],
         "metadata": {"gold_passage_ids": ["d2"]}},
        {"id": "b", "question": "icy body passing the sun", "golden_answers": ["gas"],
         "metadata": {"gold_passage_ids": ["d3", "d1"]}},  # d1 is not about comets: at most half found at 1
        {"id": "c", "question": "no gold here"},
    ])
    proc = run_cli("recall", "--index", str(out), "--dataset", str(qfile), "--k", "1,3", "--modes", "bm25,hybrid",
                   "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["questions"] == 2 and result["skipped_without_answers"] == 1
    assert result["modes"]["hybrid"]["recall@3"] == 1.0
    assert 0.0 <= result["modes"]["bm25"]["recall@1"] <= result["modes"]["bm25"]["recall@3"]
    # gold-passage recall: the share of each question's gold records among its top k, matched by doc id
    assert result["questions_with_gold_passages"] == 2
    assert result["modes"]["hybrid"]["gold_recall@3"] == 1.0  # all 3 passages of the index are in the top 3
    assert result["modes"]["hybrid"]["gold_recall@1"] <= 0.75  # question b can have at most one of its two
    bad = run_cli("recall", "--index", str(out), "--dataset", str(qfile), "--modes", "fuzzy", check=False)
    assert bad.returncode == 2 and "unknown mode" in bad.stderr
