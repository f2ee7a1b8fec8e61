"""The openai backend against a real OpenAI-compatible server: this project's `expertrag serve`, started
on a loopback port (policy never: its chat answer is the closed-book generation of the question), and the
server's own `logprobs` / `/v1/models` / unknown-model answers."""

from __future__ import annotations

import logging
import math
import time

import pytest

from expertrag.gate.policies import EntropyPolicy, FlarePolicy, RouterPolicy
from expertrag.gate.requirements import BackendCapabilityError
from expertrag.model.openai_backend import BackendUnavailable, OpenAIGenerator, topk_entropy
from expertrag.model.prompts import closed_book_messages
from expertrag.pipeline.config import PipelineConfig
from expertrag.pipeline.rag import ExpertRAG
from expertrag.retrieval import Index
from serving import Server, add_key, build_index, free_port

pytestmark = pytest.mark.slow

Q = "What is the capital of France?"
CONFIG = {"gate": {"policy": "never"},
          "pipeline": {"answer_cache_size": 0, "retrieval_cache_size": 0, "abstain_below": 0.0, "stop": []}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("oai")
    index = build_index(d)
    key = add_key(index, "client", ["staff"])
    srv = Server(index, CONFIG, d / "server.log")
    srv.key = key
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def gen(server):
    g = OpenAIGenerator(server.url + "/v1", "expertrag", server.key, timeout_s=120, retries=1, top_logprobs=3)
    yield g
    g.close()


def test_server_returns_logprobs_models_and_refuses_unknown_models(server):
    with server.client(server.key) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "expertrag"
        body = {"model": "expertrag", "max_tokens": 5, "logprobs": True, "top_logprobs": 2,
                "messages": [{"role": "user", "content": Q}]}
        r = c.post("/v1/chat/completions", json=body).json()
        content = r["choices"][0]["logprobs"]["content"]
        assert len(content) == r["usage"]["completion_tokens"] == 5 and r["choices"][0]["finish_reason"] == "length"
        assert all(e["logprob"] <= 0 and e["top_logprobs"][0]["logprob"] == e["logprob"] for e in content)
        assert "".join(e["token"] for e in content).strip() == r["choices"][0]["message"]["content"]
        assert c.post("/v1/chat/completions", json={**body, "logprobs": False}).json()["choices"][0]["logprobs"] is None
        bad = c.post("/v1/chat/completions", json={**body, "model": "gpt-9"})
        assert bad.status_code == 404 and "gpt-9" in bad.json()["error"]["message"]


def test_generate_matches_the_native_closed_book_answer(gen, smollm2):
    from expertrag.model.generator import ExpertRAGGenerator

    model, tok = smollm2
    ours = ExpertRAGGenerator(model, tok).generate(closed_book_messages(Q), max_new_tokens=8)
    g = gen.generate(closed_book_messages(Q), max_new_tokens=8)
    assert g.text == ours.text and g.finish_reason == "length" and len(g.logprobs) == 8 == len(g.token_ids)
    assert g.logprobs == pytest.approx(ours.logprobs, abs=1e-3)
    assert g.prompt_tokens == ours.prompt_tokens and g.hidden is None and g.router_stats is None
    # top-3 entropy: a lower bound of the full-distribution entropy, never above it
    assert all(0 <= a <= b + 1e-3 for a, b in zip(g.entropies, ours.entropies, strict=True))
    caps = gen.capabilities
    assert caps.entropy == "top_k" and not caps.hidden_states and not caps.router_stats and not caps.batched


def test_continuation_and_streaming(gen):
    full = gen.generate(closed_book_messages(Q), max_new_tokens=8)
    draft = gen.generate(closed_book_messages(Q), max_new_tokens=3)
    pieces: list[str] = []
    rest = gen.generate(state=draft.state, max_new_tokens=5, on_token=lambda ev: pieces.append(ev.text))
    assert draft.text + rest.text == full.text and draft.logprobs + rest.logprobs == pytest.approx(full.logprobs)
    assert "".join(pieces) == rest.text and len(rest.token_ids) == 5


def test_pipeline_over_http_and_policies_refused_by_capability(gen, server, caplog):
    cfg = PipelineConfig(k=2, max_new_tokens=6, probe_tokens=3, answer_cache_size=0, retrieval_cache_size=0,
                         abstain_below=0.0, stop=[])
    index = Index(server.index)
    rag = ExpertRAG(index, gen, FlarePolicy(theta=0.0), cfg, "flare")  # never retrieves: continues the draft
    events = []
    a = rag.answer(Q, on_event=events.append)
    assert not a.retrieved and a.gate["stage"] == "probe" and len(a.logprobs) == 6 and a.text
    assert "".join(e.data["text"] for e in events if e.kind == "token").strip() == a.generated
    with pytest.raises(BackendCapabilityError, match=r"policy 'router' needs .*backend 'openai'"):
        ExpertRAG(index, gen, RouterPolicy(0.5), cfg, "router")
    with caplog.at_level(logging.WARNING):
        ExpertRAG(index, gen, EntropyPolicy(1.0), cfg, "entropy")
    assert "approximated from the top-k" in caplog.text
    index.close()


def test_clear_errors_for_down_server_unknown_model_and_bad_key(server):
    port = free_port()  # nothing listens there
    t = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"cannot reach http://127.0.0.1:\d+/v1 .* 3 attempts"):
        OpenAIGenerator(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff_s=0.05, timeout_s=2)
    assert time.monotonic() - t >= 0.05 + 0.1  # it backed off between attempts
    with pytest.raises(BackendUnavailable, match="does not serve model 'gpt-9'; it serves: expertrag"):
        OpenAIGenerator(server.url + "/v1", "gpt-9", server.key)
    with pytest.raises(BackendUnavailable, match="rejected the API key"):
        OpenAIGenerator(server.url + "/v1", "expertrag", "erk_wrong")
    with pytest.raises(BackendUnavailable, match=r"timed out after 0.001 s"):
        slow = OpenAIGenerator(server.url + "/v1", "expertrag", server.key, timeout_s=0.001, retries=0, check=False)
        slow.generate(closed_book_messages(Q), max_new_tokens=30)


def test_topk_entropy_is_a_lower_bound():
    assert topk_entropy([math.log(0.5), math.log(0.5)]) == pytest.approx(math.log(2))
    assert topk_entropy([math.log(0.5)]) == pytest.approx(math.log(2))  # the rest mass as one outcome
    assert topk_entropy([0.0]) == 0.0
