"""The service under pressure and faults: rate limit, a full queue, SIGTERM draining, kill -9 mid-ingest."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from serving import DOCS, Server, add_key, build_index

pytestmark = pytest.mark.slow

CONFIG = {"gate": {"policy": "never"}, "pipeline": {"max_new_tokens": 8, "answer_cache_size": 0},
          "serve": {"rate_limit_per_minute": 6, "rate_limit_burst": 2, "queue_size": 1, "batch_max": 1,
                    "drain_timeout_s": 60}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("limits")
    index = build_index(d)
    keys = {n: add_key(index, n, admin=(n == "admin")) for n in ("rl", "q0", "q1", "q2", "q3", "q4", "d0", "d1",
                                                                   "admin")}
    return d, index, keys


def test_rate_limit_answers_429_with_retry_after(setup):
    d, index, keys = setup
    srv = Server(index, CONFIG, d / "rate.log")
    try:
        with srv.client(keys["rl"]) as c:
            codes = [c.post("/v1/search", json={"query": "Paris"}) for _ in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert int(codes[2].headers["retry-after"]) >= 1 and codes[2].json()["error"]["type"] == "rate_limited"
        with srv.client(keys["q0"]) as other:  # the limit is per key
            assert other.post("/v1/search", json={"query": "Paris"}).status_code == 200

        # a full queue answers 503 at once instead of piling up
        codes, started = [None] * 5, time.perf_counter()

        def ask(i):
            with srv.client(keys[f"q{i}"]) as c:
                codes[i] = (c.post("/v1/answer", json={"question": f"Tell me about Paris, part {i}.",
                                                       "max_tokens": 16}).status_code, time.perf_counter() - started)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(300)
        rejected = [s for s, _ in codes if s == 503]
        assert rejected and 200 in {s for s, _ in codes} and {s for s, _ in codes} <= {200, 503}
        slowest_ok = max(t for s, t in codes if s == 200)
        assert all(t < slowest_ok for s, t in codes if s == 503)  # refused before the answers finished

        # SIGTERM: the in-flight request finishes, new requests get 503, then exit 0. The in-flight one
        # uploads its body slowly, so it is surely still running when the signal comes.
        result = {}

        def slow_body():
            yield b'{"query": '
            time.sleep(2.5)
            yield b'"Paris", "k": 1}'

        def long_request():
            with srv.client(keys["admin"]) as c:
                result["r"] = c.post("/v1/search", content=slow_body(), headers={"content-type": "application/json"})
        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(1.0)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with srv.client(keys["d1"]) as c:
            late = c.post("/v1/search", json={"query": "Paris"})
        t.join(300)
        assert late.status_code == 503 and late.json()["error"]["type"] == "unavailable"
        assert result["r"].status_code == 200 and result["r"].json()["hits"][0]["id"] == "paris"
        assert srv.proc.wait(120) == 0
    finally:
        srv.stop(signal.SIGKILL)


def test_kill_9_mid_ingest_keeps_every_committed_document(setup):
    d, index, keys = setup
    srv = Server(index, {**CONFIG, "serve": {**CONFIG["serve"], "rate_limit_per_minute": 6000,
                                             "rate_limit_burst": 1000}}, d / "kill.log")
    committed = [{"id": "first", "contents": "The first committed note mentions a teal heron."}]
    big = [{"id": f"bulk-{i}", "contents": f"Bulk note {i} about a teal heron and item {i * 7}."} for i in range(1000)]
    try:
        with srv.client(keys["admin"]) as c:
            assert c.post("/v1/documents", json={"documents": committed}).status_code == 200

            answered = []

            def ingest():
                try:
                    c2 = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {keys['admin']}"},
                                      timeout=300)
                    answered.append(c2.post("/v1/documents", json={"documents": big}).status_code)
                except httpx.HTTPError:
                    pass  # the server is killed under it
            t = threading.Thread(target=ingest)
            t.start()
            time.sleep(3.0)  # embedding 1000 passages takes far longer than this
            srv.proc.kill()
            srv.proc.wait(30)
            t.join(60)
            assert not answered  # the kill came mid-ingest
    finally:
        srv.stop(signal.SIGKILL)
    srv = Server(index, {**CONFIG, "serve": {**CONFIG["serve"], "rate_limit_per_minute": 6000,
                                             "rate_limit_burst": 1000}}, d / "restart.log")
    try:
        with srv.client(keys["admin"]) as c:
            assert c.get("/v1/documents/first").status_code == 200
            for doc in DOCS:
                assert c.get(f"/v1/documents/{doc['id']}").status_code == 200
            manifest = json.loads((index / "manifest.json").read_text())
            # the bulk build never reached its commit point: the index is the previous generation, whole
            hits = c.post("/v1/search", json={"query": "teal heron bulk note", "k": 20, "mode": "bm25"}).json()["hits"]
            ids = [h["id"] for h in hits]
            assert len(ids) == len(set(ids))
            before = len(DOCS) + 1  # the fixture and "first"
            assert manifest["documents"] == before
            assert manifest["passages"] == manifest["documents"]
            # and the interrupted write can simply be sent again
            r = c.post("/v1/documents", json={"documents": big[:20]})
            assert r.status_code == 200
    finally:
        assert srv.stop() == 0
