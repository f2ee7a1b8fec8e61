"""Domain experts (issue 13): registry, CLI, two-layer routing, pipeline integration, fusion, access.

A three-domain fixture (astronomy, cooking, law; plus general passages without a domain) indexed with the
real MiniLM embedder. Generation is not under test here, so the pipeline tests use `Extractive`, a
stand-in generator that answers with the start of its first passage and cites it (deterministic, so
citations can be checked exactly); the router, retrieval, registry and fusion are the real code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from expertrag.data.types import Document
from expertrag.errors import InputError
from expertrag.experts.live import LiveExperts
from expertrag.experts.registry import EXPERTS_FILE, ExpertRecord, ExpertRegistry
from expertrag.experts.router import RoutingSettings, load_router, route, router_dir, save_router
from expertrag.experts.router_train import fit_router, held_out
from expertrag.gate.policies import make_policy
from expertrag.model.backend import Capabilities, Generation
from expertrag.pipeline.answer import User
from expertrag.pipeline.config import PipelineConfig
from expertrag.pipeline.rag import AnswerRequest, ExpertRAG
from expertrag.retrieval import Index, build_index
from reliability_helpers import assert_one_line_error, cli

ASTRO = [
    ("a1", "Mars", "Mars is the fourth planet from the Sun; its red colour comes from iron oxide dust."),
    ("a2", "Jupiter", "Jupiter is the largest planet of the solar system, a gas giant with the Great Red Spot."),
    ("a3", "Black hole", "A black hole is a region of spacetime where gravity prevents even light escaping."),
    ("a4", "Comet", "Comets are icy bodies that grow a glowing tail when their orbit nears the Sun."),
    ("a5", "Galaxy", "The Milky Way galaxy holds hundreds of billions of stars bound by gravity."),
    ("a6", "Telescope", "The James Webb telescope observes distant galaxies in infrared light."),
]
COOK = [
    ("c1", "Risotto", "Risotto is cooked by stirring arborio rice with hot broth until creamy."),
    ("c2", "Bread", "Bread dough rises because yeast ferments sugars and releases carbon dioxide."),
    ("c3", "Braising", "Braising cooks tough cuts of meat slowly in a covered pot with a little liquid."),
    ("c4", "Caramel", "Caramel forms when sugar is heated until it melts and turns amber brown."),
    ("c5", "Knife", "A sharp chef's knife slices onions cleanly and is safer than a dull blade."),
    ("c6", "Pasta", "Fresh pasta dough is made from flour and eggs, kneaded and rolled thin."),
]
LAW = [
    ("l1", "Contract", "A contract is a legally binding agreement requiring offer, acceptance and consideration."),
    ("l2", "Tenancy", "A tenant must receive written notice before a landlord can end the lease."),
    ("l3", "Copyright", "Copyright protects original works of authorship such as books and songs."),
    ("l4", "Negligence", "Negligence claims require a duty of care, a breach, and resulting damage."),
    ("l5", "Will", "A will must be signed and witnessed to transfer property after death."),
    ("l6", "Appeal", "An appeal asks a higher court to review the decision of a lower court."),
]
GENERAL_DOCS = [("g1", "Football", "Football is a team sport played with a ball between two teams of eleven."),
                ("g2", "Piano", "The piano is a keyboard instrument whose hammers strike strings."),
                ("g3", "Everest", "Mount Everest is the highest mountain above sea level, in the Himalayas.")]

QUESTIONS = {
    "astronomy": ["Why is Mars red?", "What is the biggest planet?", "Can light escape a black hole?",
                  "Why do comets have tails?", "How many stars are in the Milky Way?",
                  "What does the Webb telescope see?", "Which planet has the Great Red Spot?",
                  "What orbits the Sun and is icy?", "How far away are other galaxies?"],
    "cooking": ["How do I make risotto creamy?", "Why does bread dough rise?", "How do you braise beef?",
                "How is caramel made?", "Why should a knife be sharp?", "How do I make fresh pasta?",
                "What rice is used for risotto?", "How long should I knead dough?", "How to cook meat slowly?"],
    "law": ["What makes a contract binding?", "How much notice must a landlord give a tenant?",
            "What does copyright protect?", "What do I need to prove negligence?", "How is a will made valid?",
            "How do I appeal a court decision?", "Is a verbal agreement a contract?",
            "Can my landlord evict me without notice?", "Who owns the rights to a song?"],
}


def _docs() -> list[Document]:
    out = []
    for domain, rows in (("astronomy", ASTRO), ("cooking", COOK), ("law", LAW)):
        out += [Document(i, t, c, {"domain": domain}) for i, t, c in rows]
    out += [Document(i, t, c) for i, t, c in GENERAL_DOCS]
    # a restricted law passage: visible to group "legal" only
    out.append(Document("l7", "Privilege", "Attorney-client privilege keeps legal advice confidential.",
                        {"domain": "law", "groups": ["legal"]}))
    return out


@pytest.fixture(scope="module")
def base_index(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("experts") / "index"
    build_index(out, _docs(), progress=False)
    return out


@pytest.fixture
def index_dir(base_index, tmp_path) -> Path:
    """A fresh copy per test (the registry and router are written into the index directory)."""
    import shutil

    dst = tmp_path / "index"
    shutil.copytree(base_index, dst)
    return dst


@pytest.fixture(scope="module")
def embedder(base_index):
    return Index(base_index).embedder


def _labelled():
    texts, labels = [], []
    for dom, qs in QUESTIONS.items():
        texts += qs
        labels += [dom] * len(qs)
    return texts, labels


def _train_router(index_dir: Path, embedder) -> None:
    texts, labels = _labelled()
    model = fit_router(embedder.encode(texts), labels, None, embedder="all-MiniLM-L6-v2", folds=3)
    save_router(router_dir(index_dir), model)


def _register_three(index_dir: Path, **extra) -> ExpertRegistry:
    reg = ExpertRegistry(index_dir)
    reg.add([ExpertRecord(name=d, domain=d, **extra.get(d, {})) for d in ("astronomy", "cooking", "law")])
    return reg


class Extractive:
    """Stand-in generator: answers with the first six words of passage [1] and cites it; closed-book it
    says "unknown". Deterministic, so a test can tell which expert's evidence an answer came from."""

    capabilities = Capabilities(backend="extractive", model="none", continuation=False, streaming=True)

    def __init__(self):
        self.prompts: list = []

    def generate(self, messages, **kw):
        self.prompts.append(messages)
        user = messages[-1]["content"]
        if "Passages:" in user:
            first = user.split("\n")[1]
            text = " ".join(first.split(": ", 1)[1].split()[:6]) + " [1]"
        else:
            text = "unknown"
        ids = list(range(len(text.split())))
        if kw.get("on_token"):
            from expertrag.model.backend import TokenEvent

            kw["on_token"](TokenEvent(row=0, token_id=0, text=text))
        return Generation(text=text, token_ids=ids, logprobs=[-0.1] * len(ids), entropies=[0.1] * len(ids),
                          state=None, prompt_tokens=10, finish_reason="stop")


CFG = PipelineConfig(k=2, max_new_tokens=12, answer_cache_size=0, retrieval_cache_size=0, abstain_below=0.0)


def _rag(index_dir: Path, gen=None, policy="always") -> ExpertRAG:
    return ExpertRAG(Index(index_dir), gen or Extractive(), make_policy(policy), CFG, policy,
                     experts=LiveExperts(index_dir))


# ---- registry -------------------------------------------------------------------------------------------

def test_registry_round_trip_and_version_counter(index_dir):
    reg = ExpertRegistry(index_dir)
    assert reg.snapshot().version == 0 and [e.name for e in reg.snapshot().active] == ["general"]
    snap = reg.add([ExpertRecord(name="law", domain="law", k=4, mode="bm25", groups=("legal",), sensitive=True,
                                 adapter="adapters/law", system_prompt="You are a careful lawyer.")])
    assert snap.version == 1
    again = ExpertRegistry(index_dir).snapshot()  # a fresh reader sees exactly what was written
    assert again.get("law") == snap.get("law") and again.version == 1
    assert again.get("law").groups == ("legal",) and again.get("law").adapter == "adapters/law"
    assert reg.retire("law").version == 2
    assert reg.snapshot().get("law").status == "retired" and reg.snapshot().get("law").retired
    snap = reg.add([ExpertRecord(name="law", domain="law")])  # re-adding a retired name: next version
    assert snap.get("law").version == 2 and snap.get("law").active and snap.version == 3
    with pytest.raises(InputError, match="exists"):
        reg.add([ExpertRecord(name="law", domain="law")])
    with pytest.raises(InputError, match="cannot be retired"):
        reg.retire("general")


def test_registry_snapshot_is_cached_until_the_file_changes(index_dir):
    reg = _register_three(index_dir)
    first = reg.snapshot()
    assert reg.snapshot() is first  # unchanged file: no re-read
    ExpertRegistry(index_dir).retire("law")  # another process's write
    assert reg.snapshot() is not first and reg.snapshot().get("law").status == "retired"


def test_registry_validation_names_file_and_field(index_dir):
    path = index_dir / EXPERTS_FILE
    path.write_text(json.dumps({"format": "expertrag-experts/1", "version": 1,
                                "experts": [{"name": "law", "domain": "law", "k": 0}]}))
    with pytest.raises(InputError) as e:
        ExpertRegistry(index_dir).snapshot()
    assert str(path) in str(e.value) and "experts[0].k" in str(e.value)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        ExpertRegistry(index_dir).snapshot()


WRITER = """
import os, sys
from expertrag import fileio
from expertrag.experts.registry import ExpertRecord, ExpertRegistry
real_replace = os.replace
def die_before_rename(src, dst):  # the temporary file is complete; kill the process before the rename
    os.kill(os.getpid(), 9)
fileio.os.replace = die_before_rename
ExpertRegistry(sys.argv[1]).add([ExpertRecord(name="cooking", domain="cooking")])
"""


def test_a_write_killed_midway_leaves_the_old_registry(index_dir):
    reg = _register_three(index_dir)
    before = (index_dir / EXPERTS_FILE).read_bytes()
    reg.retire("cooking")
    before = (index_dir / EXPERTS_FILE).read_bytes()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-c", WRITER, str(index_dir)], env=env, capture_output=True, timeout=120)
    assert p.returncode == -9, p.stderr.decode()[-500:]
    assert (index_dir / EXPERTS_FILE).read_bytes() == before  # the old file, whole
    assert ExpertRegistry(index_dir).snapshot().get("cooking").status == "retired"


# ---- CLI ----------------------------------------------------------------------------------------------------

def test_cli_add_list_show_retire(index_dir):
    code, out, err = cli("expert", "add", "--index", str(index_dir), "--from-domains", "--json")
    assert code == 0, err
    assert sorted(r["name"] for r in json.loads(out)["added"]) == ["astronomy", "cooking", "law"]
    code, out, err = cli("expert", "add", "--index", str(index_dir), "--name", "contracts", "--domain", "law",
                         "--k", "3", "--groups", "legal", "--prompt", "Cite the clause.")
    assert code == 0 and "contracts" in out, err
    code, out, _ = cli("expert", "list", "--index", str(index_dir), "--json")
    listed = json.loads(out)
    assert [e["name"] for e in listed["experts"]] == ["astronomy", "cooking", "law", "contracts", "general"]
    code, out, _ = cli("expert", "show", "contracts", "--index", str(index_dir), "--json")
    assert json.loads(out)["groups"] == ["legal"] and json.loads(out)["k"] == 3
    code, out, err = cli("expert", "retire", "contracts", "--index", str(index_dir))
    assert code == 0 and "retired contracts" in out
    code, out, _ = cli("expert", "list", "--index", str(index_dir))
    assert "contracts" not in out and "astronomy" in out
    code, out, _ = cli("expert", "add", "--index", str(index_dir), "--from-domains")  # re-run: nothing new
    assert code == 0 and "nothing to add" in out


@pytest.mark.parametrize("args, needle", [
    (["--name", "x", "--domain", "physics"], "no passage of the index has domain 'physics'"),
    (["--name", "bad name", "--domain", "law"], "--name"),
    (["--name", "x", "--domain", "law", "--k", "0"], "--k"),
    (["--name", "x", "--domain", "law", "--mode", "fuzzy"], "--mode"),
    (["--name", "law2"], "--domain"),
    (["--from-domains", "--name", "x"], "--from-domains"),
])
def test_cli_add_bad_input_is_one_line(index_dir, args, needle):
    code, _, err = cli("expert", "add", "--index", str(index_dir), *args)
    assert_one_line_error(code, err, needle)


def test_cli_errors_for_missing_things(index_dir, tmp_path):
    assert_one_line_error(*cli("expert", "show", "nobody", "--index", str(index_dir))[::2], "nobody")
    assert_one_line_error(*cli("expert", "retire", "nobody", "--index", str(index_dir))[::2], "nobody")
    assert_one_line_error(*cli("expert", "list", "--index", str(tmp_path / "missing"))[::2], "no such index")
    (index_dir / EXPERTS_FILE).write_text('{"format": "expertrag-experts/1", "version": "x", "experts": []}')
    assert_one_line_error(*cli("expert", "list", "--index", str(index_dir))[::2], EXPERTS_FILE, "version")


# ---- routing ------------------------------------------------------------------------------------------------

def test_router_routes_held_out_questions_of_three_domains(index_dir, embedder):
    texts, labels = _labelled()
    test = [i for i in range(len(texts)) if i % 3 == 0]  # a third held out, the router never sees them
    train = [i for i in range(len(texts)) if i % 3 != 0]
    X = embedder.encode(texts)
    model = fit_router(X[train], [labels[i] for i in train], None, folds=3)
    reg = _register_three(index_dir)
    routes = [route(reg.snapshot(), model, X[i]) for i in test]
    correct = sum(r.experts[0][0].domain == labels[i] for r, i in zip(routes, test, strict=True))
    assert correct >= len(test) - 1, [(texts[i], r.names) for r, i in zip(routes, test, strict=True)]
    # saved and loaded: the same probabilities
    save_router(router_dir(index_dir), model)
    loaded = load_router(router_dir(index_dir))
    assert np.allclose(loaded.proba(X[0]), model.proba(X[0]), atol=1e-6) and loaded.classes == model.classes


def test_refining_layer_uses_retrieval_and_falls_back_to_general(index_dir, embedder):
    texts, labels = _labelled()
    model = fit_router(embedder.encode(texts), labels, None, folds=3)
    model.threshold = 1.01  # force every question through the refining layer
    snap = _register_three(index_dir).snapshot()
    q = embedder.encode(["Why is Mars red?"])[0]
    r = route(snap, model, q, hit_domains=lambda: ["astronomy"] * 5)
    assert r.layer == "refine" and r.names == ["astronomy"] and r.retrieval["astronomy"] == pytest.approx(1.0)
    # hits from general passages only, no fast router: the general expert answers
    r = route(snap, None, None, hit_domains=lambda: [None] * 5)
    assert r.names == ["general"]
    # evenly split evidence and a weak fast layer: low confidence -> general
    model.mix = 0.0
    r = route(snap, model, q, hit_domains=lambda: ["astronomy", "cooking", "law", None] * 3,
              settings=RoutingSettings(general_below=0.5))
    assert r.names == ["general"] and "low confidence" in r.reason
    # two domains share the evidence: two experts with weights
    r = route(snap, model, q, hit_domains=lambda: ["astronomy", "cooking"] * 5,
              settings=RoutingSettings(multi_min_weight=0.3))
    assert sorted(r.names) == ["astronomy", "cooking"] and sum(w for _, w in r.experts) == pytest.approx(1.0)


def test_metadata_hint_and_groups_restrict_candidates(index_dir, embedder):
    texts, labels = _labelled()
    model = fit_router(embedder.encode(texts), labels, None, folds=3)
    reg = _register_three(index_dir, law={"groups": ("legal",)})
    q = embedder.encode(["What makes a contract binding?"])[0]
    snap = reg.snapshot()
    assert route(snap, model, q, metadata={"domain": "cooking"}).names == ["cooking"]
    assert route(snap, model, q, metadata={"domain": "cooking"}).layer == "metadata"
    # the law expert is not open to an anonymous caller: never chosen, even by a hint
    for r in (route(snap, model, q), route(snap, model, q, metadata={"expert": "law"}),
              route(snap, model, q, hit_domains=lambda: ["law"] * 10)):
        assert "law" not in r.names
    assert route(snap, model, q, groups=("legal",)).names == ["law"]


def test_train_router_cli_from_labels_and_from_passages(index_dir, tmp_path):
    rows = [{"id": f"{d}-{i}", "question": q, "metadata": {"domain": d}}
            for d, qs in QUESTIONS.items() for i, q in enumerate(qs)]
    ds = tmp_path / "q.jsonl"
    ds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = cli("train", "router", "--index", str(index_dir), "--dataset", str(ds), "--holdout", "0.2",
                         "--folds", "3", "--json")
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["classes"] == ["astronomy", "cooking", "law"] and report["source"] == "questions"
    trained = set(load_router(router_dir(index_dir)).info["trained_ids"])
    assert trained and not any(held_out(i, 0, 0.2) for i in trained)  # held-out ids are never trained on
    code, out, err = cli("train", "router", "--index", str(index_dir), "--folds", "3", "--per-domain", "6", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["classes"] == ["astronomy", "cooking", "general", "law"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "question": "Why?"}) + "\n")
    assert_one_line_error(*cli("train", "router", "--index", str(index_dir), "--dataset", str(bad))[::2],
                          "metadata.domain", str(bad))


# ---- the pipeline ------------------------------------------------------------------------------------------

def test_pipeline_without_registry_has_no_routing(index_dir):
    a = _rag(index_dir).answer("Why is Mars red?")
    assert a.routing == {} and a.retrieved and all(c.expert is None for c in a.citations)


def test_routed_answer_retrieves_within_the_expert_domain(index_dir, embedder):
    _register_three(index_dir, cooking={"k": 3, "system_prompt": "You are a chef."})
    _train_router(index_dir, embedder)
    gen = Extractive()
    rag = _rag(index_dir, gen)
    a = rag.answer("How do I make risotto creamy?")
    assert a.routing["experts"][0]["name"] == "cooking" and a.routing["layer"] in ("fast", "refine")
    assert len(a.passages) == 3 and {p["metadata"]["domain"] for p in a.passages} == {"cooking"}
    assert a.citations and all(c.expert == "cooking" for c in a.citations)
    assert gen.prompts[-1][0]["content"].startswith("You are a chef.")  # the expert's prompt
    assert a.routing["contributions"][0]["passage_ids"] == [p["id"] for p in a.passages]
    # the gate still decides: with `never` nothing is retrieved, but the question is still routed
    b = _rag(index_dir, policy="never").answer("How do I make risotto creamy?")
    assert not b.retrieved and b.passages == [] and b.routing["experts"][0]["name"] == "cooking"


def test_expert_groups_are_enforced_in_the_pipeline(index_dir, embedder):
    _register_three(index_dir, law={"groups": ("legal",)})
    _train_router(index_dir, embedder)
    rag = _rag(index_dir)
    anon = rag.answer("What is attorney-client privilege for a contract?")
    assert "law" not in [e["name"] for e in anon.routing["experts"]]
    assert "l7" not in {p["id"] for p in anon.passages}  # passage groups still apply
    legal = rag.answer("What is attorney-client privilege for a contract?", user=User("u", ("legal",)))
    assert legal.routing["experts"][0]["name"] == "law"
    assert {p["metadata"]["domain"] for p in legal.passages} == {"law"}


def test_multi_expert_fusion_cites_each_experts_passages(index_dir, embedder):
    _register_three(index_dir)
    rag = _rag(index_dir)
    rag.routing_settings = RoutingSettings(multi_min_weight=0.2)
    a = rag.answer("Mars planet and caramel sugar")  # no router: evidence from both domains decides
    names = [e["name"] for e in a.routing["experts"]]
    assert sorted(names) == ["astronomy", "cooking"], a.routing
    assert a.routing["fusion"] in ("pick", "merge") and len(a.routing["contributions"]) == 2
    by_expert = {c["expert"]: set(c["passage_ids"]) for c in a.routing["contributions"]}
    assert sum(c["chosen"] for c in a.routing["contributions"]) == 1
    assert a.citations
    for c in a.citations:  # each citation is a passage of the expert it names, and [n] indexes passages
        assert c.id in by_expert[c.expert]
        assert a.passages[c.marker - 1]["id"] == c.id
    chosen = next(c for c in a.routing["contributions"] if c["chosen"])
    assert a.text == chosen["answer"]


def test_hot_add_and_retire_while_answering(index_dir, embedder):
    _train_router(index_dir, embedder)
    reg = ExpertRegistry(index_dir)
    reg.add([ExpertRecord(name="astronomy", domain="astronomy")])
    started, release = threading.Event(), threading.Event()

    class Paused(Extractive):  # holds the first generation until the registry has changed
        def generate(self, messages, **kw):
            if not started.is_set():
                started.set()
                assert release.wait(60)
            return super().generate(messages, **kw)

    results = {}

    def worker():  # one thread owns the pipeline (SQLite connections are per thread), as a service worker
        rag = _rag(index_dir, Paused())
        results["inflight"] = rag.answer("How do I make risotto creamy?")
        results["after"] = rag.answer("How do I make risotto creamy?")
        results["mars"] = rag.answer("Why is Mars red?")

    t = threading.Thread(target=worker)
    t.start()
    assert started.wait(60)
    reg.add([ExpertRecord(name="cooking", domain="cooking")])  # added while the question is in flight
    reg.retire("astronomy")
    release.set()
    t.join(120)
    inflight, after, mars = results["inflight"], results["after"], results["mars"]
    assert inflight.routing["registry_version"] == 1  # finished on the set it started with
    assert "cooking" not in [e["name"] for e in inflight.routing["experts"]]
    assert after.routing["registry_version"] == 3 and after.routing["experts"][0]["name"] == "cooking"
    assert {p["metadata"]["domain"] for p in after.passages} == {"cooking"}
    # astronomy retired: no astronomy expert, and nothing breaks
    assert "astronomy" not in [e["name"] for e in mars.routing["experts"]]


def test_answer_many_routes_each_request(index_dir, embedder):
    _register_three(index_dir)
    _train_router(index_dir, embedder)
    out = _rag(index_dir).answer_many([AnswerRequest("Why does bread dough rise?"),
                                       AnswerRequest("How do I appeal a court decision?"),
                                       AnswerRequest("Why is Mars red?", metadata={"domain": "cooking"})])
    assert [a.routing["experts"][0]["name"] for a in out] == ["cooking", "law", "cooking"]
    assert out[2].routing["layer"] == "metadata"


def test_eval_experts_scores_only_held_out_questions(index_dir, tmp_path):
    _register_three(index_dir)
    gold = {"astronomy": ["a1", "a2", "a3", "a4", "a5", "a6"], "cooking": ["c1", "c2", "c3", "c4", "c5", "c6"],
            "law": ["l1", "l2", "l3", "l4", "l5", "l6"]}
    rows = [{"id": f"{d}-{i}", "question": q, "golden_answers": ["x"],
             "metadata": {"domain": d, "gold_passage_ids": [gold[d][i % 6]]}}
            for d, qs in QUESTIONS.items() for i, q in enumerate(qs)]
    ds = tmp_path / "q.jsonl"
    ds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli("train", "router", "--index", str(index_dir), "--dataset", str(ds), "--holdout", "0.4",
                       "--folds", "3", "--json")
    assert code == 0, err
    out = tmp_path / "eval"
    code, stdout, err = cli("eval-experts", "--index", str(index_dir), "--dataset", str(ds), "--out", str(out),
                            "--json")
    assert code == 0, err
    head = json.loads(stdout.strip().splitlines()[-1])
    for key in ("routing_accuracy", "routing_macro_f1", "fast_layer_share", "recall_at_5_routed",
                "recall_at_5_global"):
        assert 0.0 <= head[key] <= 1.0, (key, head)
    report = json.loads((out / "experts.json").read_text())
    router = load_router(router_dir(index_dir))
    trained = set(router.info["trained_ids"])
    # gold passages in the training split: the retrieval scope was chosen on them (recorded with its grid)
    assert router.info["cv"]["domain_boost"]["chosen"]["domain_boost"] == router.domain_boost
    assert len(router.info["cv"]["domain_boost"]["grid"]) > 2
    scored = {p["id"] for p in report["predictions"]}
    assert scored and not (scored & trained) and len(scored) == head["questions"]
    assert report["excluded_training_questions"] == len(trained)
    assert {r["router"] for r in report["routers"]} == {"fast", "two-layer", "knn"}
    assert (out / "confusion_two-layer.png").read_bytes()[:4] == b"\x89PNG"
    two = next(r for r in report["routers"] if r["router"] == "two-layer")
    assert sum(map(sum, two["confusion"]["matrix"])) == head["questions"]
    assert_one_line_error(*cli("eval-experts", "--index", str(index_dir), "--dataset", str(ds), "--out",
                               str(out), "--limit", "0")[::2], "--limit")


def test_boost_scope_lifts_in_domain_hits_of_the_global_ranking(index_dir, embedder):
    _register_three(index_dir)
    _train_router(index_dir, embedder)
    model = load_router(router_dir(index_dir))
    model.domain_boost = 1.0  # as if `train router` had chosen it: in-domain hits of the ranking come first
    save_router(router_dir(index_dir), model)
    a = _rag(index_dir).answer("How do I make risotto creamy?", metadata={"domain": "cooking"})
    assert a.routing["scope"] == "boost" and a.routing["confidence"] == 1.0
    assert [p["metadata"]["domain"] for p in a.passages] == ["cooking", "cooking"]
    # a boost of 0 is the global ranking itself
    model.domain_boost = 0.0
    save_router(router_dir(index_dir), model)
    rag = _rag(index_dir)
    b = rag.answer("How do I make risotto creamy?", metadata={"domain": "law"})
    glob = rag.index.search("How do I make risotto creamy?", 2)
    assert [p["id"] for p in b.passages] == [h.id for h in glob]


def test_a_router_caught_mid_write_keeps_the_previous_one(index_dir, embedder):
    from expertrag.experts.router import WEIGHTS_FILE, RouterFile

    _train_router(index_dir, embedder)
    live = RouterFile(index_dir)
    before = live.current()
    assert before is not None
    # the weights of a new training run are in place, its JSON not yet: a mismatch for a moment
    np.savez(router_dir(index_dir) / WEIGHTS_FILE, coef=before.coef * 2, intercept=before.intercept)
    assert live.current() is before
    with pytest.raises(InputError, match="not the ones router.json names"):
        RouterFile(index_dir).current()  # a reader with no previous router says what is wrong


def test_passage_router_reads_int8_vectors_of_an_onnx_index(tmp_path):
    # vectors of an onnx-int8 index are stored under their own key: the passage fallback must find them
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from expertrag.experts.router_train import passage_training_set
    from expertrag.retrieval.config import RetrievalConfig

    out = tmp_path / "int8"
    cfg = RetrievalConfig(embed_backend="onnx-int8")
    build_index(out, _docs(), retrieval=cfg, progress=False)
    X, labels = passage_training_set(Index(out, cfg), per_domain=3)
    assert X.shape == (12, 384) and sorted(set(labels)) == ["astronomy", "cooking", "general", "law"]
