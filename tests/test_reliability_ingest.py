"""Ingestion as properties (issue 10), with hypothesis.

1. Random records (arbitrary unicode including lone surrogates, ids of any JSON type, metadata of
   arbitrary JSON shapes, NaN, deep nesting, non-JSON lines) either read or fail with a clean InputError;
   with --skip-bad they never fail; whatever is read is storable.
2. Random batches built on top of an existing index either build or fail cleanly, and never change
   what the previous build stored (a failed build leaves the index exactly as it was; a good one leaves
   the other documents alone).
3. A stateful test: random sequences of index / update / metadata change / delete / bad build keep the
   store equal to a model of what it should hold, access groups included.

Real bm25s, FAISS, MiniLM and SQLite; nothing mocked. EXPERTRAG_LONG_TESTS=1 runs several times more.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from expertrag.data import IngestReport, iter_documents
from expertrag.data.readers import validate_document
from expertrag.data.types import Document
from expertrag.errors import InputError
from expertrag.retrieval import Filters, Index, build_index
from reliability_helpers import LONG

COUNTS: dict[str, int] = {"read_cases": 0, "read_ok": 0, "read_clean_errors": 0,
                          "build_cases": 0, "build_ok": 0, "build_ok_new_docs": 0, "build_clean_errors": 0,
                          "state_steps": 0}
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# ---- random records ----------------------------------------------------------------------------------

surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udbff\udc00x\ud800"])  # the last: one pair + one lone
wild_text = st.one_of(st.text(max_size=40), st.text(st.characters(codec="utf-8"), max_size=40), surrogates,
                      st.sampled_from(["", "   ", "h#0", "a#b", "\x1b[2J", "line\nbreak", "\u202eevil", "Ω" * 50]))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                      wild_text)
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(wild_text, kids, max_size=4)),
                          max_leaves=12)
metadata = st.one_of(
    st.none(), json_value,
    st.fixed_dictionaries({}, optional={
        "groups": st.one_of(st.lists(st.sampled_from(["hr", "eng", "", "x y"]), max_size=3), json_value),
        "Groups": st.lists(st.sampled_from(["hr", "eng"]), max_size=2),
        "group": st.sampled_from(["hr", "eng"]),
        "domain": st.one_of(st.sampled_from(["ops", "people"]), json_value),
        "source": wild_text,
        "extra": json_value,
    }),
)
record = st.fixed_dictionaries({}, optional={
    "id": st.one_of(wild_text, st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2)),
    "title": st.one_of(wild_text, st.integers()),
    "contents": st.one_of(wild_text, st.text(st.sampled_from("abc de.\n"), min_size=1, max_size=300),
                          st.integers()),
    "text": wild_text,
    "metadata": metadata,
})
plausible = st.fixed_dictionaries({  # mostly good records, with one odd part at a time
    "id": st.one_of(st.from_regex(r"[A-Za-z0-9_:./ -]{1,12}", fullmatch=True), st.integers(0, 10**6), wild_text),
    "contents": st.one_of(st.text(min_size=1, max_size=200), st.text(st.sampled_from("abc de.\n"), min_size=1,
                                                                      max_size=600)),
}, optional={"title": st.text(max_size=20), "metadata": metadata})
raw_line = st.one_of(
    plausible.map(lambda r: json.dumps(r)),
    plausible.map(lambda r: json.dumps(r, ensure_ascii=False)),
    record.map(lambda r: json.dumps(r)),  # ensure_ascii: surrogates survive as \\ud800 escapes
    st.sampled_from(['{"id": "n", "contents": "x", "metadata": {"v": NaN}}', '{"id": "i", "contents": Infinity}',
                     "[1, 2]", '"just a string"', "{not json", "{}",
                     '{"id": "d", "contents": "x", "metadata": ' + "[" * 3000 + "]" * 3000 + "}",
                     '{"id": "e", "contents": "x", "metadata": {"a": ' + "[" * 40 + "]" * 40 + "}}"]),
)


def _write(path: Path, lines: list[str]) -> Path:
    # surrogatepass: a raw lone surrogate becomes the invalid UTF-8 bytes a broken exporter would write
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", errors="surrogatepass")
    return path


@settings(max_examples=1500 if LONG else 300, **SETTINGS)
@given(lines=st.lists(raw_line, min_size=1, max_size=6))
def test_random_records_read_or_fail_cleanly(tmp_path_factory, lines):
    path = _write(tmp_path_factory.mktemp("rec") / "c.jsonl", lines)
    COUNTS["read_cases"] += 1
    try:
        docs = list(iter_documents(path))
        COUNTS["read_ok"] += 1
    except InputError as e:
        COUNTS["read_clean_errors"] += 1
        assert e.path == str(path) and str(path) in str(e)  # located at the file
        docs = None
    report = IngestReport()
    skipped_docs = list(iter_documents(path, skip_bad=True, report=report))  # never raises
    assert report.documents_read == len(skipped_docs)
    if docs is not None:
        assert [d.id for d in docs] == [d.id for d in skipped_docs] and report.skipped == 0
    for d in skipped_docs:  # whatever is read can be stored and printed
        validate_document(d)
        json.dumps(d.metadata, allow_nan=False).encode("utf-8")
        assert "#" not in d.id


# ---- random batches on top of an existing index ---------------------------------------------------

BASE = [Document(f"b{i}", f"Base {i}", f"Base document {i} about kelp, tides and comets.",
                 {"groups": ["hr"]} if i % 2 else {}) for i in range(6)]


def snapshot(index_dir: Path) -> tuple[int, list[tuple]]:
    idx = Index(index_dir)  # verifies the manifest's checksums and the store
    try:
        rows = idx.store.conn.execute(
            "SELECT id, doc_id, title, contents, start, end, groups, metadata FROM passages WHERE added_gen <= ? "
            "AND (retired_gen IS NULL OR retired_gen > ?) ORDER BY id", (idx.generation, idx.generation)).fetchall()
        return idx.generation, rows
    finally:
        idx.close()


@pytest.fixture(scope="module")
def base_index(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "index"
    build_index(out, BASE, progress=False)
    return out, snapshot(out)


@settings(max_examples=150 if LONG else 30, **SETTINGS)
@given(lines=st.lists(raw_line, min_size=1, max_size=4), skip_bad=st.booleans())
def test_a_build_never_changes_what_the_previous_build_stored(base_index, tmp_path_factory, lines, skip_bad):
    base, (gen0, rows0) = base_index
    work = tmp_path_factory.mktemp("b")
    out = work / "index"
    shutil.copytree(base, out)
    corpus = _write(work / "c.jsonl", lines)
    COUNTS["build_cases"] += 1
    try:
        report = build_index(out, iter_documents(corpus, skip_bad=skip_bad), progress=False)
    except InputError:
        COUNTS["build_clean_errors"] += 1
        assert snapshot(out) == (gen0, rows0)  # nothing changed
        return
    COUNTS["build_ok"] += 1
    gen, rows = snapshot(out)
    assert gen == gen0 + 1 and report.passages == len(rows)
    new_docs = {d.id: d for d in iter_documents(corpus, skip_bad=True)}
    COUNTS["build_ok_new_docs"] += bool(new_docs)
    kept = [r for r in rows0 if r[1] not in new_docs]
    assert kept == [r for r in rows if r[1] not in new_docs]  # other documents untouched
    for r in rows:
        if r[1] in new_docs:
            d = new_docs[r[1]]
            assert json.loads(r[6]) == (d.metadata.get("groups") or [])
            assert r[3] == d.contents[r[4]:r[5]] and r[2] == d.title


# ---- a stateful model of the store ------------------------------------------------------------------

IDS = ["alpha", "beta", "gamma", "delta"]
TEXTS = ["Kelp forests grow in cold water.", "Tides follow the Moon.", "Comets shed gas near the Sun.",
         " ".join(f"Glacier sentence {i} about moraines and ice." for i in range(90))]  # several passages
METAS = [{}, {"groups": ["hr"]}, {"groups": ["eng", "hr"]}, {"domain": "ops"}, {"groups": ["eng"], "domain": "ops"},
         {"tag": "x"}]


class StoreMachine(RuleBasedStateMachine):
    """Model: doc id -> (title, contents, metadata). The index must always hold exactly that."""

    def __init__(self):
        super().__init__()
        self.model: dict[str, tuple[str, str, dict]] = {}

    @initialize()
    def fresh(self):
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="expertrag-state-"))
        self.out = self.dir / "index"

    def _build(self, docs=(), delete=()):
        COUNTS["state_steps"] += 1
        return build_index(self.out, list(docs), delete_ids=list(delete), progress=False)

    @rule(doc=st.sampled_from(IDS), text=st.sampled_from(TEXTS), meta=st.sampled_from(METAS))
    def index_or_update(self, doc, text, meta):
        self._build([Document(doc, doc.title(), text, dict(meta))])
        self.model[doc] = (doc.title(), text, dict(meta))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), meta=st.sampled_from(METAS))
    def change_metadata_only(self, data, meta):
        doc = data.draw(st.sampled_from(sorted(self.model)))
        title, text, _ = self.model[doc]
        report = self._build([Document(doc, title, text, dict(meta))])
        assert report.embedded == 0  # same text: cached vectors reused
        self.model[doc] = (title, text, dict(meta))

    @rule(doc=st.sampled_from(IDS + ["missing"]))
    def delete(self, doc):
        if not self.out.exists():
            return
        report = self._build(delete=[doc])
        assert (doc in report.missing_deletes) == (doc not in self.model)
        self.model.pop(doc, None)

    @rule(doc=st.sampled_from(IDS), bad=st.sampled_from(["x#1", "\ud800", "nan"]))
    def bad_build_changes_nothing(self, doc, bad):
        before = snapshot(self.out) if (self.out / "manifest.json").exists() else None
        docs = [Document(doc, "T", "A good document that must not be stored.", {})]
        if bad == "x#1":
            docs.append(Document("x#1", "T", "bad id", {}))
        elif bad == "nan":
            docs.append(Document("n", "T", "bad value", {"v": float("nan")}))
        else:
            docs.append(Document("s", "T", "bad \ud800 text", {}))
        with pytest.raises(InputError):
            self._build(docs)
        if before is not None:
            assert snapshot(self.out) == before

    @invariant()
    def store_equals_model(self):
        if not (self.out / "manifest.json").exists():
            return
        _, rows = snapshot(self.out)
        by_doc: dict[str, list] = {}
        for r in rows:
            by_doc.setdefault(r[1], []).append(r)
        assert set(by_doc) == set(self.model)
        for doc, (title, text, meta) in self.model.items():
            passages = by_doc[doc]
            assert len({r[0] for r in passages}) == len(passages)  # unique passage ids
            for r in passages:
                assert r[2] == title and r[3] == text[r[4]:r[5]]
                assert json.loads(r[6]) == (meta.get("groups") or [])
                stored = json.loads(r[7])
                assert {k: stored.get(k) for k in meta} == meta
            assert (len(passages) > 1) == (len(text) > 1000)
        # and access follows the model at once
        idx = Index(self.out)
        try:
            hits = idx.search("kelp tides comets glacier moraines", 20, "bm25", Filters(groups=("eng",)))
            for h in hits:
                groups = self.model[h.metadata["doc_id"]][2].get("groups") or []
                assert not groups or "eng" in groups
        finally:
            idx.close()

    def teardown(self):
        shutil.rmtree(getattr(self, "dir", "/nonexistent"), ignore_errors=True)


StoreMachine.TestCase.settings = settings(max_examples=25 if LONG else 6, stateful_step_count=15 if LONG else 10,
                                          **SETTINGS)
test_store_follows_a_model = StoreMachine.TestCase


def test_ingest_case_counts():
    print(f"ingestion properties: {COUNTS}")
    if COUNTS["read_cases"] == 0:
        pytest.skip("the property tests did not run in this session (run the whole file)")
    assert COUNTS["read_ok"] > 0 and COUNTS["read_clean_errors"] > 0
    assert COUNTS["build_ok_new_docs"] > 0 and COUNTS["build_clean_errors"] > 0
