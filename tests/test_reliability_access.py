"""Access control as a property (issue 10): random users and queries, every search mode and `answer`,
on a real index (real bm25s, FAISS, MiniLM, SQLite; nothing mocked). Zero passages outside the caller's
groups, counted over >= 10,000 cases (a case = one (user, query, mode) search or one `answer`).

The oracle is the generator's own record of each document's groups, not the store: a store that lost
or rewrote groups (the metadata-change leak) fails here too. EXPERTRAG_LONG_TESTS=1 runs 5x more.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertrag.data.types import Document
from expertrag.gate.policies import make_policy
from expertrag.model.backend import Capabilities, Generation
from expertrag.pipeline.answer import User
from expertrag.pipeline.config import PipelineConfig
from expertrag.pipeline.rag import ExpertRAG
from expertrag.retrieval import Filters, Index, build_index
from reliability_helpers import LONG

GROUPS = ["hr", "eng", "legal", "exec", "sales"]
WORDS = ("salary budget deploy server contract lawsuit merger revenue quota laptop holiday policy bonus "
         "incident outage audit invoice roadmap hiring layoff patent secret launch password vacation").split()
QUERIES_PER_EXAMPLE = 24
MODES = ("bm25", "dense", "hybrid")
EXAMPLES = 700 if LONG else 140  # x (24 queries x 3 modes + 1 answer) = 10,220 cases by default
COUNTS = {"search": 0, "answer": 0, "hits": 0, "restricted_hits": 0}


def _corpus(seed: int = 7) -> tuple[list[Document], dict[str, set[str]]]:
    rnd = random.Random(seed)
    docs, groups_of = [], {}
    for i in range(80):
        groups = rnd.sample(GROUPS, rnd.choice([0, 0, 1, 1, 2, 3]))
        n_words = rnd.choice([8, 12, 20, 300])  # some documents are several passages
        text = " ".join(rnd.choice(WORDS) for _ in range(n_words)) + "."
        meta = {"groups": groups} if groups else {}
        if rnd.random() < 0.3:
            meta["domain"] = rnd.choice(["ops", "people"])
        docs.append(Document(f"d{i}", f"Doc {i} {rnd.choice(WORDS)}", text, meta))
        groups_of[f"d{i}"] = set(groups)
    return docs, groups_of


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    docs, groups_of = _corpus()
    out = tmp_path_factory.mktemp("access") / "index"
    build_index(out, docs[:60], progress=False)
    # a second build that changes groups of some documents (metadata only) and adds the rest
    changed = []
    for d in docs[:60:6]:
        g = sorted(set(d.metadata.get("groups", [])) ^ {"exec"})
        meta = dict(d.metadata, groups=g) if g else {k: v for k, v in d.metadata.items() if k != "groups"}
        changed.append(Document(d.id, d.title, d.contents, meta))
        groups_of[d.id] = set(g)
    build_index(out, changed + docs[60:], progress=False)
    index = Index(out)

    class Silent:  # the generator is not under test: what `answer` retrieves is
        capabilities = Capabilities(backend="silent", model="none", continuation=False, streaming=False)

        def generate(self, messages, **kw):
            return Generation(text="", token_ids=[], logprobs=[], entropies=[], state=None, prompt_tokens=0,
                              finish_reason="stop")

    rag = ExpertRAG(index, Silent(), make_policy("always"),
                    PipelineConfig(k=8, answer_cache_size=64, retrieval_cache_size=64), "always")
    yield index, rag, groups_of
    index.close()


def _visible(doc_groups: set[str], user: set[str], admin: bool) -> bool:
    return admin or not doc_groups or bool(doc_groups & user)


users = st.one_of(
    st.tuples(st.sets(st.sampled_from(GROUPS + ["nobody", "HR", ""]), max_size=3).map(
        lambda s: tuple(sorted(g for g in s if g))), st.just(False)),
    st.just(((), True)),  # the administrator
    st.just(((), False)),  # anonymous
)
queries = st.lists(st.lists(st.sampled_from(WORDS + ["Doc", "7", "zzz"]), min_size=1, max_size=5).map(" ".join),
                   min_size=QUERIES_PER_EXAMPLE, max_size=QUERIES_PER_EXAMPLE)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(user=users, qs=queries, k=st.integers(1, 12), domain=st.sampled_from([None, ("ops",), ("people", "ops")]))
def test_no_passage_outside_the_callers_groups(world, user, qs, k, domain):
    index, rag, groups_of = world
    groups, admin = user
    filters = Filters(domains=domain, groups=groups or None, all_groups=admin)
    for mode in MODES:
        for q, hits in zip(qs, index.search_many(qs, k, mode, filters), strict=True):
            COUNTS["search"] += 1
            for h in hits:
                doc = h.metadata["doc_id"]
                COUNTS["hits"] += 1
                COUNTS["restricted_hits"] += bool(groups_of[doc])
                assert _visible(groups_of[doc], set(groups), admin), (q, mode, groups, doc, groups_of[doc])
                assert domain is None or h.metadata.get("domain") in domain
    who = User("u", groups, all_groups=admin) if (groups or admin) else None
    answer = rag.answer(qs[0], user=who)
    COUNTS["answer"] += 1
    for p in answer.passages:
        assert _visible(groups_of[p["metadata"]["doc_id"]], set(groups), admin), (qs[0], groups, p["id"])


def test_access_case_count():
    """Runs after the property (file order): the cases really ran, and restricted passages were seen."""
    total = COUNTS["search"] + COUNTS["answer"]
    print(f"access-control cases: {total} ({COUNTS['search']} searches, {COUNTS['answer']} answers), "
          f"{COUNTS['hits']} hits checked, {COUNTS['restricted_hits']} of them restricted")
    if COUNTS["search"] == 0:
        pytest.skip("the property test did not run in this session (run the whole file)")
    assert total >= 10_000
    assert COUNTS["restricted_hits"] > 0  # the users did see restricted passages they were allowed
