"""Access control through the service, as a property: random documents with random groups, random keys
with random groups, random queries through search, answer (JSON and streamed), chat and document fetch,
with the answer and retrieval caches on. Zero passages from a group the key lacks, ever.

Counts are printed (pytest -s) and reported in RESULTS.md."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import Server, add_key, build_index, sse_events

pytestmark = pytest.mark.slow

GROUPS = ["a", "b", "c", "d"]
WORDS = ("river castle engine orchid copper falcon meadow lantern harbor glacier violin saffron comet "
         "tundra marble beacon willow quartz canyon ember").split()
N_DOCS, N_KEYS = 40, 8
SEARCHES = 300
COUNTS = {"cases": 0, "passages_checked": 0}


def _corpus(rng: random.Random) -> list[dict]:
    docs = []
    for i in range(N_DOCS):
        groups = [] if rng.random() < 0.3 else rng.sample(GROUPS, rng.randint(1, 2))
        words = " ".join(rng.choices(WORDS, k=12))
        docs.append({"id": f"doc{i}", "title": f"Note {i}", "contents": f"Note {i} tells of {words}.",
                     **({"metadata": {"groups": groups}} if groups else {})})
    return docs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    rng = random.Random(7)
    d = tmp_path_factory.mktemp("acl")
    docs = _corpus(rng)
    index = build_index(d, docs)
    groups_of_doc = {doc["id"]: set(doc.get("metadata", {}).get("groups", [])) for doc in docs}
    keys = []
    for k in range(N_KEYS):
        groups = rng.sample(GROUPS, rng.randint(0, 2))
        keys.append((add_key(index, f"user{k}", groups), set(groups)))
    srv = Server(index, {"gate": {"policy": "always"}, "pipeline": {"max_new_tokens": 4},
                         "serve": {"rate_limit_per_minute": 0}}, d / "server.log")
    yield srv, keys, groups_of_doc
    assert srv.stop() == 0
    print(f"\nservice ACL property: {COUNTS['cases']} cases, {COUNTS['passages_checked']} passages checked, 0 leaks")


def _allowed(groups_of_doc: dict[str, set], user_groups: set, passage_id: str) -> bool:
    doc = passage_id.split("#")[0]
    g = groups_of_doc[doc]
    return not g or bool(g & user_groups)


def _check(world, key_groups: set, ids: list[str]) -> None:
    _, _, groups_of_doc = world
    for pid in ids:
        assert _allowed(groups_of_doc, key_groups, pid), f"{pid} leaked to a key with groups {key_groups}"
    COUNTS["passages_checked"] += len(ids)
    COUNTS["cases"] += 1


queries = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)


@settings(max_examples=SEARCHES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.integers(0, N_KEYS - 1), query=queries, mode=st.sampled_from(["bm25", "dense", "hybrid"]),
       k=st.integers(1, 20))
def test_search_never_leaks(world, key, query, mode, k):
    srv, keys, _ = world
    secret, groups = keys[key]
    with srv.client(secret) as c:
        r = c.post("/v1/search", json={"query": query, "mode": mode, "k": k})
    assert r.status_code == 200
    _check(world, groups, [h["id"] for h in r.json()["hits"]])


def test_document_fetch_never_leaks(world):
    srv, keys, groups_of_doc = world
    for secret, groups in keys:
        with srv.client(secret) as c:
            for doc_id in groups_of_doc:
                r = c.get(f"/v1/documents/{doc_id}")
                if _allowed(groups_of_doc, groups, doc_id):
                    assert r.status_code == 200
                    _check(world, groups, [p["id"] for p in r.json()["passages"]])
                else:
                    assert r.status_code == 404  # not even its existence
                    COUNTS["cases"] += 1


def test_answers_chat_and_streams_never_leak_through_the_caches(world):
    """Every key asks the same questions, so the answer and retrieval caches hold entries computed for
    other groups; none may be served across groups."""
    srv, keys, _ = world
    rng = random.Random(11)
    questions = [" ".join(rng.sample(WORDS, 3)) + "?" for _ in range(3)]
    for qi, q in enumerate(questions):
        for secret, groups in keys:
            with srv.client(secret) as c:
                if qi == 0:
                    a = c.post("/v1/answer", json={"question": q}).json()
                    ids = [p["id"] for p in a["passages"]] + [x["id"] for x in a["citations"]]
                elif qi == 1:
                    with c.stream("POST", "/v1/answer", json={"question": q, "stream": True}) as r:
                        events = sse_events(r)
                    ids = [p["id"] for kind, d in events if kind in ("passages", "answer") for p in d["passages"]]
                    ids += [x["id"] for kind, d in events if kind == "answer" for x in d["citations"]]
                else:
                    body = c.post("/v1/chat/completions", json={
                        "model": "expertrag", "messages": [{"role": "user", "content": q}]}).json()
                    extra = body["expertrag"]
                    ids = [p["id"] for p in extra["passages"]] + [x["id"] for x in extra["citations"]]
                _check(world, groups, ids)
