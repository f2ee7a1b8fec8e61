"""`serve --ray` (issue 17): the same HTTP API with the pipeline in Ray Serve replicas.

A local Ray cluster (num_cpus=2, loopback) and Serve's proxy on a free 127.0.0.1 port are started by the
module fixture; two pipeline replicas load the real SmolLM2 and MiniLM (and later one domain expert's
deployment: finance, added at run time; medicine is configured without one, so the pipeline answers it;
one model load fewer than deploying finance from the start and adding it again). Real HTTP (httpx) is checked
against the in-process Service on the same index: same answers, same access control, same routing. Serve
and Ray are shut down after the module. Skipped when Ray Serve is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from expertrag.data.types import Document
from serving import DOCS, free_port, sse_events


def _serve_importable() -> bool:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        return False
    return True


INSTALL = "pip install -e '.[ray]'"
needs_serve = pytest.mark.skipif(not _serve_importable(), reason=f"Ray Serve is not installed ({INSTALL})")
# half a CPU each: 2 pipeline replicas + 1 expert replica on a num_cpus=2 cluster
CONFIG = {"gate": {"policy": "always"}, "pipeline": {"max_new_tokens": 8},
          "serve": {"max_tokens_cap": 16, "rate_limit_per_minute": 6000, "rate_limit_burst": 1000,
                    "ray": {"replicas": 2, "cpus_per_replica": 0.5, "expert_poll_s": 0.5,
                            "experts": {"medicine": {"replicas": 0}}}}}
EXPERT_DOCS = [
    {"id": "bond", "title": "Bonds", "contents": "A bond is a fixed-income loan an investor makes to a borrower.",
     "metadata": {"domain": "finance"}},
    {"id": "stock", "title": "Stocks", "contents": "A stock is a share of ownership in a company.",
     "metadata": {"domain": "finance"}},
    {"id": "insulin", "title": "Insulin", "contents": "Insulin is a hormone made by beta cells of the pancreas.",
     "metadata": {"domain": "medicine"}},
]
COMPARED = ("question", "text", "retrieved", "abstained", "gate", "tokens")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, smollm2_dir):
    if not _serve_importable():
        pytest.skip(f"Ray Serve is not installed ({INSTALL})")
    import os

    import httpx
    import ray
    from ray import serve

    from expertrag.config import ExpertRAGConfig
    from expertrag.experts.registry import ExpertRecord, ExpertRegistry
    from expertrag.retrieval.builder import build_index
    from expertrag.serve.keys import KeyStore, keys_path
    from expertrag.serve.ray_serve import deploy

    tmp = tmp_path_factory.mktemp("serve-ray")
    index = tmp / "index"
    build_index(index, [Document(d["id"], d["title"], d["contents"], d.get("metadata", {}))
                        for d in DOCS + EXPERT_DOCS], progress=False)
    ExpertRegistry(index).add([ExpertRecord(name="medicine", domain="medicine")])  # finance: added by a test
    store = KeyStore(keys_path(index, None))
    keys = {"admin": store.add("admin", [], admin=True), "staff": store.add("ann", ["staff"]),
            "guest": store.add("eve", ["guests"])}
    config = ExpertRAGConfig.model_validate(CONFIG)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the replicas
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", ignore_reinit_error=True,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        assert deploy(index, config) == {"added": [], "removed": [], "failed": []}  # medicine has replicas: 0

        def client(key: str | None = None) -> httpx.Client:
            return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300,
                                headers={"Authorization": f"Bearer {key}"} if key else {})

        yield client, keys, index, config
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local(deployed):
    """The in-process Service on the same index and config: what `expertrag serve` answers."""
    from expertrag.serve.app import answer_payload
    from expertrag.serve.service import Service

    _, keys, index, config = deployed
    svc = Service(index, config)
    svc.start()

    def ask(key: str, question: str) -> dict:
        ticket = svc.submit_answer(svc.authenticate(key), question)
        return json.loads(json.dumps(answer_payload(ticket.future.result(timeout=300))))
    yield ask
    svc.close()


def _same(a: dict, b: dict) -> None:
    for k in COMPARED:
        assert a[k] == b[k], k
    assert [p["id"] for p in a["passages"]] == [p["id"] for p in b["passages"]]
    assert [c["id"] for c in a["citations"]] == [c["id"] for c in b["citations"]]
    assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-6)


@needs_serve
@pytest.mark.slow
def test_answers_over_http_equal_the_in_process_service(deployed, local):
    client, keys, _, _ = deployed
    with client() as c:
        assert c.get("/healthz").json() == {"status": "ok"} and c.get("/readyz").json()["ready"] is True
        assert c.post("/v1/answer", json={"question": "hi"}).status_code == 401
    for who, question in [("guest", "Who founded the Zorblatt Institute?"),
                          ("staff", "What is Project Falcon's launch code word?"),
                          ("guest", "What is Project Falcon's launch code word?")]:
        with client(keys[who]) as c:
            r = c.post("/v1/answer", json={"question": question})
        assert r.status_code == 200, r.text
        _same(r.json(), local(keys[who], question))
        seen = {p["id"] for p in r.json()["passages"]}
        assert ("falcon" in seen) == (who == "staff" and "Falcon" in question)  # the groups reach retrieval


@needs_serve
@pytest.mark.slow
def test_streamed_answer_and_request_errors(deployed, local):
    client, keys, _, _ = deployed
    question = "What is the capital of France?"
    with client(keys["guest"]) as c, c.stream("POST", "/v1/answer", json={"question": question, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["decision", "passages"] and kinds[-1] == "answer" and set(kinds[2:-1]) == {"token"}
    _same(events[-1][1], local(keys["guest"], question))
    with client(keys["guest"]) as c:  # the ingress validates as in-process: same status, same field
        bad = c.post("/v1/answer", json={"question": "x", "max_tokens": 99})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "max_tokens"
        assert c.post("/v1/answer", json={"question": "x", "policy": "nope"}).json()["error"]["field"] == "policy"


@needs_serve
@pytest.mark.slow
def test_two_pipeline_replicas_and_an_ingest_reaches_them(deployed):
    from ray import serve

    from expertrag.serve.ray_serve import APP_NAME

    client, keys, _, _ = deployed
    pipeline = serve.status().applications[APP_NAME].deployments["pipeline"]
    assert pipeline.replica_states.get("RUNNING") == 2
    with client(keys["admin"]) as c:
        r = c.post("/v1/documents", json={"id": "kelp", "title": "Kelp",
                                          "text": "Kelp forests grow in cold, nutrient-rich seas."})
        assert r.status_code == 200, r.text
    # whichever replica answers (Serve picks), it opens the new generation before answering; 8 at once (more
    # than Serve's default of 5 per ingress replica): all answered, spread over the replicas, the same answer
    from concurrent.futures import ThreadPoolExecutor

    def ask(_):
        with client(keys["guest"]) as c:
            return c.post("/v1/answer", json={"question": "Where do kelp forests grow?"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert {r.status_code for r in answers} == {200}
    assert {r.json()["passages"][0]["id"] for r in answers} == {"kelp"}
    assert len({r.json()["text"] for r in answers}) == 1


def _dispatched(c) -> dict[str, float]:
    """/metrics of the ingress: answers sent to each deployment, and the expert deployments it sees running."""
    out = {}
    for line in c.get("/metrics").text.splitlines():
        for prefix in ("expertrag_ray_dispatched_total", "expertrag_ray_expert_deployment_running",
                       "expertrag_ray_expert_fallback_total"):
            if line.startswith(prefix + "{"):
                out[line.split(" ")[0]] = float(line.split(" ")[1])
    return out


def _wait_for(c, series: str, present: bool, timeout: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout
    while (series in _dispatched(c)) != present:
        assert time.monotonic() < deadline, f"{series} still {'absent' if present else 'present'}"
        time.sleep(0.2)


@needs_serve
@pytest.mark.slow
def test_each_domain_expert_answers_from_its_own_deployment(deployed, local):
    from ray import serve

    from expertrag.experts.registry import ExpertRecord, ExpertRegistry
    from expertrag.serve.ray_serve import expert_app_name, sync_experts

    client, keys, index, config = deployed
    running = 'expertrag_ray_expert_deployment_running{expert="finance"}'
    to_finance = 'expertrag_ray_dispatched_total{deployment="expert-finance"}'
    assert set(serve.status().applications) == {"expertrag"}  # medicine has replicas: 0, the pipeline answers it
    bond, insulin = "What is a bond?", "What hormone do beta cells of the pancreas make?"

    def ask(c, question: str, expert: str) -> None:
        r = c.post("/v1/answer", json={"question": question})
        assert r.status_code == 200, r.text
        assert r.json()["routing"]["experts"][0]["name"] == expert
        _same(r.json(), local(keys["guest"], question))

    with client(keys["guest"]) as c:
        ask(c, insulin, "medicine")  # no expert deployment at all: the ingress does not even route
        ask(c, bond, "general")  # no finance expert yet

        registry = ExpertRegistry(index)
        registry.add([ExpertRecord(name="finance", domain="finance")])  # at run time: a deployment is created
        assert sync_experts(index, config)["added"] == ["finance"]
        app = serve.status().applications[expert_app_name("finance")]
        assert app.deployments["expert-finance"].replica_states.get("RUNNING") == 1
        _wait_for(c, running, True)
        before = _dispatched(c).get(to_finance, 0)
        ask(c, bond, "finance")
        ask(c, insulin, "medicine")
        assert _dispatched(c)[to_finance] == before + 1  # the bond question, not the insulin one
        assert _dispatched(c)['expertrag_ray_expert_fallback_total{expert="medicine"}'] == 1

        registry.retire("finance")  # the deployment goes; finance questions go to the general expert again
        assert sync_experts(index, config)["removed"] == ["finance"]
        _wait_for(c, running, False)
        assert expert_app_name("finance") not in serve.status().applications
        ask(c, bond, "general")
        assert _dispatched(c)[to_finance] == before + 1


def test_ray_serve_config_is_checked(tmp_path):
    from pydantic import ValidationError

    from expertrag.serve.config import RayServeConfig, ServeConfig
    from expertrag.serve.ray_serve import scaling_options

    with pytest.raises(ValidationError, match="not both"):
        RayServeConfig.model_validate({"replicas": 2, "autoscaling": {"max_replicas": 3}})
    with pytest.raises(ValidationError, match="above max_replicas"):
        RayServeConfig.model_validate({"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({"ray": {"replica": 2}})  # a misspelt field is refused, not ignored

    class S:
        def __init__(self, ray):
            self.serve = ServeConfig.model_validate({"ray": ray})

    assert scaling_options(S({"replicas": 3}))["num_replicas"] == 3
    # per-expert deployments: a default, per-name overrides; errors name the field
    from expertrag.config import ConfigError, ExpertRAGConfig
    from expertrag.serve.ray_serve import expert_scaling_options

    per = S({"cpus_per_replica": 0.5, "expert_default": {"replicas": 2},
             "experts": {"law": {"autoscaling": {"max_replicas": 3}, "cpus_per_replica": 1}, "med": {"replicas": 0}}})
    assert expert_scaling_options(per, "finance") == {"ray_actor_options": {"num_cpus": 0.5},
                                                      "max_ongoing_requests": 16, "num_replicas": 2}
    assert expert_scaling_options(per, "law")["autoscaling_config"]["max_replicas"] == 3
    assert expert_scaling_options(per, "law")["ray_actor_options"] == {"num_cpus": 1}
    assert expert_scaling_options(per, "med") is None  # no deployment of its own: the pipeline answers
    for bad, message in [({"general": {"replicas": 2}}, "serve.ray: .*experts.general: the general expert is"),
                         ({"bad name": {}}, "serve.ray: .*experts.'bad name': not an expert name"),
                         ({"law": {"replicas": -1}}, "serve.ray.experts.law.replicas: .*greater than or equal"),
                         ({"law": {"replicas": 1, "autoscaling": {}}}, "serve.ray.experts.law: .*not both"),
                         ({"law": {"replica": 1}}, "serve.ray.experts.law.replica: Extra inputs")]:
        path = tmp_path / "bad.yaml"
        path.write_text(json.dumps({"serve": {"ray": {"experts": bad}}}), encoding="utf-8")
        with pytest.raises(ConfigError, match=message):
            ExpertRAGConfig.load(path)
    auto = scaling_options(S({"autoscaling": {"min_replicas": 0, "max_replicas": 4}, "cpus_per_replica": 2}))
    assert "num_replicas" not in auto and auto["ray_actor_options"] == {"num_cpus": 2}
    assert auto["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 4.0}
    if _serve_importable():  # Serve itself accepts both forms (it validates the options here, no cluster needed)
        from ray import serve

        from expertrag.serve.ray_serve import PipelineReplica

        for opts in (auto, scaling_options(S({"replicas": 3}))):
            serve.deployment(PipelineReplica, name="pipeline", **opts)


def _serve_cli(tmp_path, *args: str, hide_ray: bool = False) -> subprocess.CompletedProcess:
    argv = ["expertrag", "serve", "--index", str(tmp_path), *args]
    code = ("import sys; " + ("sys.modules['ray'] = None; " if hide_ray else "") +
            f"from expertrag.cli import main; sys.argv = {argv!r}; main()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, hide, message", [
    (["--ray"], True, INSTALL),
    (["--address", "auto"], False, "error: --address needs --ray"),
    pytest.param(["--ray", "--port", "0"], False, "--ray needs a fixed --port", marks=needs_serve),
])
def test_serve_ray_usage_errors_are_one_line(tmp_path, args, hide, message):
    proc = _serve_cli(tmp_path, *args, hide_ray=hide)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and message in lines[0], proc.stderr
