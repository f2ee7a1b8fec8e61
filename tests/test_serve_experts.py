"""Domain experts and the policy expert over HTTP: `expertrag serve` builds the pipeline as `ask` does, so
its answers carry `routing` (which expert ran, why) and citations name their expert; a retired expert stops
being chosen without a restart; a question with personal data is redacted before anything sees it and is
flagged for review, with the audit log in the index folder."""

from __future__ import annotations

import json

import pytest

from serving import Server, add_key, build_index, cli

pytestmark = pytest.mark.slow

DOCS = [
    {"id": "bond", "title": "Bonds", "contents": "A bond is a fixed-income loan an investor makes to a borrower.",
     "metadata": {"domain": "finance"}},
    {"id": "stock", "title": "Stocks", "contents": "A stock is a share of ownership in a company.",
     "metadata": {"domain": "finance"}},
    {"id": "insulin", "title": "Insulin", "contents": "Insulin is a hormone made by beta cells of the pancreas.",
     "metadata": {"domain": "medicine"}},
    {"id": "asthma", "title": "Asthma", "contents": "Asthma is a long-term inflammatory disease of the airways.",
     "metadata": {"domain": "medicine"}},
]
CONFIG = {"gate": {"policy": "always"}, "pipeline": {"max_new_tokens": 6, "k": 1},
          "policy": {"personal_data": [{"id": "email", "detector": "email", "action": "redact",
                                        "reason": "the question contains an email address"}]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_experts")
    index = build_index(d, DOCS)
    cli("expert", "add", "--index", str(index), "--from-domains")
    srv = Server(index, CONFIG, d / "server.log")
    srv.key = add_key(index, "client")
    yield srv
    assert srv.stop() == 0


def test_answers_carry_routing_and_citations_name_the_expert(server):
    with server.client(server.key) as c:
        a = c.post("/v1/answer", json={"question": "What hormone do beta cells of the pancreas make?"}).json()
        assert a["routing"]["experts"][0]["name"] == "medicine", a["routing"]
        assert a["passages"][0]["id"] == "insulin" and a["needs_review"] is False and a["policy"] == {}
        assert all(cit["expert"] == "medicine" for cit in a["citations"])
        cli("expert", "retire", "medicine", "--index", str(server.index))  # while serving, no restart
        b = c.post("/v1/answer", json={"question": "What hormone do beta cells of the pancreas make?"}).json()
        assert "medicine" not in [e["name"] for e in b["routing"]["experts"]]


def test_personal_data_is_redacted_flagged_and_audited(server):
    with server.client(server.key) as c:
        a = c.post("/v1/answer", json={"question": "What is a bond? Reply to jane.doe@example.com"}).json()
    assert a["needs_review"] is True and a["policy"]["action"] == "redact"
    assert "jane.doe@example.com" not in json.dumps(a) and "[EMAIL]" in a["question"]
    audit = (server.index / "audit.jsonl").read_text()
    assert "jane.doe" not in audit and "[EMAIL]" in audit
