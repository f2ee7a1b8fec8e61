"""The service over real HTTP: `expertrag serve` on a free loopback port with the real SmolLM2 and MiniLM,
driven by httpx, the official `openai` client and an SSE parser."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from serving import DOCS, Server, add_key, build_index, cli, sse_events

pytestmark = pytest.mark.slow

CONFIG = {"gate": {"policy": "always"}, "pipeline": {"max_new_tokens": 8},
          "serve": {"max_tokens_cap": 16, "max_body_bytes": 20000, "rate_limit_per_minute": 6000,
                    "rate_limit_burst": 1000}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    index = build_index(d)
    keys = {"admin": add_key(index, "admin", admin=True, via_cli=True), "staff": add_key(index, "ann", ["staff"], via_cli=True),
            "guest": add_key(index, "eve", ["guests"]), "hr": add_key(index, "hal", ["hr"])}
    srv = Server(index, CONFIG, d / "server.log")
    srv.keys = keys
    yield srv
    assert srv.stop() == 0


def test_every_v1_route_needs_a_valid_key(server):
    with server.client() as c:
        for method, path, body in [("POST", "/v1/answer", {"question": "hi"}), ("POST", "/v1/search", {"query": "x"}),
                                   ("GET", "/v1/documents/paris", None), ("POST", "/v1/chat/completions",
                                                                         {"messages": [{"role": "user", "content": "x"}]})]:
            r = c.request(method, path, json=body)
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", path
    with server.client("erk_not-a-key") as c:
        assert c.post("/v1/search", json={"query": "x"}).status_code == 401
    with server.client() as c:  # the open routes
        assert c.get("/healthz").json() == {"status": "ok"} and c.get("/readyz").json()["ready"] is True
        assert "ExpertRAG" in c.get("/").text


def test_a_revoked_key_is_refused_from_the_next_request(server):
    key = add_key(server.index, "temp", ["staff"], via_cli=True)
    with server.client(key) as c:
        assert c.post("/v1/search", json={"query": "Paris"}).status_code == 200
        cli("keys", "revoke", "temp", "--index", str(server.index))
        assert c.post("/v1/search", json={"query": "Paris"}).status_code == 401


def test_answer_json(server):
    with server.client(server.keys["guest"]) as c:
        a = c.post("/v1/answer", json={"question": "Who founded the Zorblatt Institute?"}).json()
    assert a["retrieved"] and a["gate"] == {"decision": "retrieve", "score": 1.0, "stage": "fixed", "policy": "always"}
    assert a["passages"][0]["id"] == "zorbl" and a["tokens"]["generated"] <= 8
    assert {c["id"] for c in a["citations"]} <= {p["id"] for p in a["passages"]}
    t = a["timings"]
    assert sum(t[k] for k in ("gate_ms", "probe_ms", "retrieval_ms", "generation_ms", "other_ms")) == \
        pytest.approx(t["total_ms"])


def test_answer_stream_is_decision_passages_tokens_answer(server):
    with server.client(server.keys["guest"]) as c, \
            c.stream("POST", "/v1/answer", json={"question": "What is the capital of France?", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["decision", "passages"] and kinds[-1] == "answer" and "token" in kinds
    assert set(kinds[2:-1]) == {"token"}
    final = events[-1][1]
    streamed = "".join(d["text"] for k, d in events if k == "token").strip()
    assert final["text"] == streamed or final["abstained"]
    assert [p["id"] for p in events[1][1]["passages"]] == [p["id"] for p in final["passages"]]


def test_openai_client_unchanged(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys["guest"], max_retries=0)
    done = client.chat.completions.create(model="expertrag", max_tokens=6,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content
    extra = done.model_extra["expertrag"]
    assert extra["gate"]["decision"] == "retrieve" and extra["text"] == done.choices[0].message.content
    stream = client.chat.completions.create(model="expertrag", max_tokens=6, stream=True,
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    # "length" when the answer used all of max_tokens (OpenAI's meaning; the openai backend continues then)
    used = chunks[-1].model_extra["expertrag"]["tokens"]["generated"]
    assert chunks[-1].choices[0].finish_reason == ("length" if used >= 6 else "stop") and text.strip()
    assert chunks[-1].model_extra["expertrag"]["passages"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="erk_wrong", max_retries=0).chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}])


def test_access_groups_on_every_path(server):
    q = "What is Project Falcon's launch code word?"
    with server.client(server.keys["guest"]) as guest, server.client(server.keys["staff"]) as staff:
        for mode in ("bm25", "dense", "hybrid"):
            assert "falcon" not in {h["id"] for h in guest.post("/v1/search", json={"query": q, "mode": mode}).json()["hits"]}
            assert staff.post("/v1/search", json={"query": q, "mode": mode, "k": 1}).json()["hits"][0]["id"] == "falcon"
        assert guest.get("/v1/documents/falcon").status_code == 404  # not 403: its existence is not told
        assert guest.get("/v1/documents/no-such-doc").status_code == 404
        assert staff.get("/v1/documents/falcon").json()["passages"][0]["id"] == "falcon"
        # the same question answered for staff first must not reach the guest through the caches
        s = staff.post("/v1/answer", json={"question": q}).json()
        assert "falcon" in {p["id"] for p in s["passages"]}
        g = guest.post("/v1/answer", json={"question": q}).json()
        assert "falcon" not in {p["id"] for p in g["passages"]} | {c["id"] for c in g["citations"]}
        assert "BLUEBIRD" not in g["text"]
        with guest.stream("POST", "/v1/answer", json={"question": q, "stream": True}) as r:
            ids = {p["id"] for k, d in sse_events(r) if k in ("passages", "answer") for p in d["passages"]}
        assert "falcon" not in ids


@pytest.mark.parametrize("body, status, field", [
    ({"question": ""}, 400, "question"),
    ({"question": 42}, 422, "question"),
    ({}, 422, "question"),
    ({"question": "hi", "k": "abc"}, 422, "k"),
    ({"question": "hi", "k": 0}, 400, "k"),
    ({"question": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"question": "hi", "policy": "no-such-policy"}, 400, "policy"),
    ({"question": "hi", "colour": "blue"}, 422, "colour"),
])
def test_bad_answer_requests_name_the_field(server, body, status, field):
    with server.client(server.keys["guest"]) as c:
        r = c.post("/v1/answer", json=body)
    assert r.status_code == status and r.json()["error"]["field"] == field, r.text


def test_malformed_and_oversized_bodies(server):
    with server.client(server.keys["guest"]) as c:
        r = c.post("/v1/answer", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and "error" in r.json()
        r = c.post("/v1/search", json={"query": "x" * 30000})
        assert r.status_code == 413


def test_documents_are_admin_only_validated_and_live(server):
    new = {"id": "kiwi", "title": "Kiwi", "contents": "The kiwi is a flightless bird endemic to New Zealand."}
    with server.client(server.keys["staff"]) as staff:
        assert staff.post("/v1/documents", json={"documents": [new]}).status_code == 403
        assert staff.delete("/v1/documents/paris").status_code == 403
    with server.client(server.keys["admin"]) as admin:
        bad = admin.post("/v1/documents", json={"documents": [new, {"id": "x", "contents": "   "}]})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "documents[1].contents"
        bad = admin.post("/v1/documents", json={"documents": [{**new, "metadata": {"groups": "hr"}}]})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "documents[0].metadata.groups"
        assert admin.get("/v1/documents/kiwi").status_code == 404  # nothing of a refused request was stored
        r = admin.post("/v1/documents", json={"documents": [new]})
        assert r.status_code == 200 and r.json()["counts"]["added"] == 1
        assert admin.post("/v1/search", json={"query": "flightless bird New Zealand", "k": 1}).json()["hits"][0]["id"] == "kiwi"
        a = admin.post("/v1/answer", json={"question": "Where does the kiwi bird live?", "k": 1}).json()
        assert a["passages"][0]["id"] == "kiwi"  # the model thread answers from the new generation
        assert admin.delete("/v1/documents/kiwi").status_code == 200
        assert admin.get("/v1/documents/kiwi").status_code == 404
        assert admin.delete("/v1/documents/kiwi").status_code == 404
        every = {h["id"] for h in admin.post("/v1/search", json={"query": "the", "k": 20, "mode": "dense"}).json()["hits"]}
        assert {d["id"] for d in DOCS} <= every  # the original documents are all still there


def test_queries_never_see_a_half_built_generation(server):
    """Documents arrive in batches of 4 while searches run: every search sees a whole number of batches."""
    stop, counts, errors = threading.Event(), [], []

    def query():
        with server.client(server.keys["admin"]) as c:
            while not stop.is_set():
                r = c.post("/v1/search", json={"query": "quokkaberry", "k": 20, "mode": "bm25"})
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                counts.append(len(r.json()["hits"]))

    t = threading.Thread(target=query)
    t.start()
    try:
        with server.client(server.keys["admin"]) as admin:
            for b in range(3):
                docs = [{"id": f"qb-{b}-{i}", "contents": f"The quokkaberry note {b}.{i} is about tea number {i}."}
                        for i in range(4)]
                assert admin.post("/v1/documents", json={"documents": docs}).status_code == 200
    finally:
        stop.set()
        t.join(60)
    assert not errors and counts and all(n % 4 == 0 for n in counts), counts
    assert counts[-1] == 12 or max(counts) <= 12


def test_metrics_after_answers(server):
    with server.client(server.keys["guest"]) as c:
        c.post("/v1/answer", json={"question": "Who founded the Zorblatt Institute?"})
        text = c.get("/metrics").text
        stats = c.get("/v1/stats").json()
    for name in ("expertrag_requests_total", "expertrag_request_seconds_bucket", "expertrag_gate_decisions_total",
                 "expertrag_answer_seconds_bucket", "expertrag_cache_total", "expertrag_generated_tokens_total",
                 "expertrag_queue_depth", "expertrag_batch_size_bucket", "expertrag_probes_total"):
        assert name in text, name
    assert 'expertrag_gate_decisions_total{decision="retrieve",policy="always",stage="fixed"}' in text
    assert stats["answers"] >= 1 and stats["retrieval_rate"] == 1.0 and stats["stage_shares"] == {"fixed": 1.0}


def test_concurrent_answers_are_batched(server):
    qs = ["What is the capital of France?", "Who founded the Zorblatt Institute?", "Where is Mount Everest?",
          "What is Paris on?"]
    results = [None] * len(qs)

    def ask(i):
        with server.client(server.keys["guest"]) as c:
            results[i] = c.post("/v1/answer", json={"question": qs[i] + " (batch)"}).status_code

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(qs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == [200] * len(qs)
    text = httpx.get(server.url + "/metrics").text
    sizes = {line.split("le=")[1].split("}")[0].strip('"'): float(line.rsplit(" ", 1)[1])
             for line in text.splitlines() if line.startswith("expertrag_batch_size_bucket")}
    assert sizes["1.0"] < sizes["+Inf"]  # at least one batch held more than one answer


def test_a_client_that_disconnects_cancels_its_generation(server):
    def cancelled() -> float:
        for line in httpx.get(server.url + "/metrics").text.splitlines():
            if line.startswith("expertrag_cancelled_total "):
                return float(line.split()[1])
        return 0.0

    before = cancelled()
    with server.client(server.keys["guest"]) as c, c.stream(
            "POST", "/v1/answer", json={"question": "List the planets of the Solar System, with a fact about each.",
                                         "policy": "never", "max_tokens": 16, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("event: token"):
                break  # leave after the first token
    deadline = time.monotonic() + 60
    while cancelled() <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cancelled() == before + 1
