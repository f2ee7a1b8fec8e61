"""schemathesis against the running service's /openapi.json: no generated input may produce a 5xx.

Each operation gets property-based requests generated from its schema (valid and invalid bodies, path
parameters), sent with an admin key so ingest and delete are exercised too, on an index of its own."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from serving import Server, add_key, build_index

schemathesis = pytest.importorskip("schemathesis")

pytestmark = pytest.mark.slow

RESULTS = {"cases": 0, "by_status": {}}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    d = tmp_path_factory.mktemp("schema")
    index = build_index(d)
    admin = add_key(index, "admin", admin=True)
    srv = Server(index, {"gate": {"policy": "always"}, "pipeline": {"max_new_tokens": 4},
                         "serve": {"max_tokens_cap": 4, "rate_limit_per_minute": 0, "max_documents": 5}},
                 d / "server.log")
    srv.admin = admin
    yield srv
    assert srv.stop() == 0
    print(f"\nschemathesis: {RESULTS['cases']} requests, by status {dict(sorted(RESULTS['by_status'].items()))}")


def test_no_server_errors(api):
    """Positive and negative cases for every operation (schemathesis' strategies, driven by hypothesis
    directly: its pytest plugin does not load under this pytest)."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(api.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/answer", "POST /v1/chat/completions", "POST /v1/search",
                                               "GET /v1/documents/{doc_id}", "POST /v1/documents",
                                               "DELETE /v1/documents/{doc_id}", "GET /healthz", "GET /metrics"}
    for op in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @settings(max_examples=20, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(base_url=api.url, headers={"Authorization": f"Bearer {api.admin}"},
                                     timeout=120)
                RESULTS["cases"] += 1
                RESULTS["by_status"][response.status_code] = RESULTS["by_status"].get(response.status_code, 0) + 1
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}\n"
                    f"{case.as_curl_command()}")
            try:
                run()
            except Unsatisfiable:
                if mode is schemathesis.GenerationMode.POSITIVE:
                    raise
                # an operation with no parameters and no body has no invalid input to make
    assert RESULTS["cases"] >= 100
