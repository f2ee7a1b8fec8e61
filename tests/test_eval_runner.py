"""The evaluation runner, the mixed workload and the `eval` / `bench pipeline` commands.

Aggregation, sweep and workload are checked on hand-made cases; `evaluate` runs against a stub pipeline;
the commands and one end-to-end run use the real SmolLM2 on a 4-document index.
"""

from __future__ import annotations

import json

import pytest

from expertrag.data.types import Document, Question
from expertrag.errors import ExpertRAGError, InputError
from expertrag.eval.aggregate import summarize
from expertrag.eval.experts import expert_utilisation
from expertrag.eval.gate_quality import gate_quality, threshold_sweep
from expertrag.eval.records import group_of
from expertrag.eval.runner import evaluate
from expertrag.eval.sampling import select_questions
from expertrag.eval.workload import mixed_workload
from expertrag.gate.labels import LabelRecord
from expertrag.gate.models import GateArtifactError
from expertrag.pipeline.answer import Answer, Timings
from expertrag.pipeline.config import PipelineConfig


def rec(i: int, **kw) -> dict:
    r = {"id": str(i), "dataset": "d", "policy": "p", "decision": "no_retrieve", "retrieved": False, "score": 0.0,
         "stage": "fixed", "correct": True, "em": 1.0, "f1": 1.0, "abstained": False, "confidence": 0.9,
         "latency_ms": float(i), "gate_ms": 0.0, "probe_ms": 0.0, "retrieval_ms": 0.0, "generation_ms": float(i),
         "prompt_tokens": 10, "generated_tokens": 2, "retrievals": 0, "label": None, "closed_correct": None,
         "open_correct": None, "group": None}
    r.update(kw)
    if "retrieved" in kw:
        r["retrievals"] = int(kw["retrieved"])
    return r


# ------------------------------------------------------------------------------------------ aggregation


def test_summarize_hand_made_records():
    records = [rec(i, correct=i <= 6, em=float(i <= 3), f1=0.5, retrieved=i % 2 == 0,
                   stage="fast" if i <= 7 else "probe", gate_ms=0.1 * i, abstained=i == 10) for i in range(1, 11)]
    records[8]["correct"] = records[8]["em"] = records[8]["f1"] = None  # no gold answers: not graded
    records.append({"id": "bad", "dataset": "d", "policy": "p", "error": "empty question"})
    s = summarize(records)
    assert s["n"] == 10 and s["errors"] == 1 and s["graded"] == 9
    assert s["correct"] == 6 and s["accuracy"] == pytest.approx(6 / 9)
    assert s["em"] == pytest.approx(3 / 9) and s["f1"] == pytest.approx(0.5)
    assert s["latency_ms_mean"] == pytest.approx(5.5) and s["latency_ms_p50"] == pytest.approx(5.5)
    assert s["latency_ms_p95"] == pytest.approx(9.55) and s["latency_ms_p99"] == pytest.approx(9.91)
    assert s["retrieval_rate"] == pytest.approx(0.5) and s["retrievals_per_query"] == pytest.approx(0.5)
    assert s["stages"] == {"fast": pytest.approx(0.7), "probe": pytest.approx(0.3)}
    assert s["abstain_rate"] == pytest.approx(0.1)
    assert s["gate_overhead_share"] == pytest.approx(0.1)  # gate_ms = 0.1 * latency
    assert s["ms_per_generated_token"] == pytest.approx(55 / 20) and s["mean_prompt_tokens"] == 10
    assert s["gate_quality"] is None and s["experts"] is None


def test_gate_quality_counts_precision_recall_auroc():
    labels = ["retrieve", "retrieve", "both_wrong", "no_retrieve", "no_retrieve", None]
    retrieved = [True, False, True, True, False, True]
    scores = [0.9, 0.4, 0.7, 0.6, 0.1, 0.5]
    rows = [rec(i, label=lab, retrieved=d, score=s)
            for i, (lab, d, s) in enumerate(zip(labels, retrieved, scores, strict=True))]
    g = gate_quality(rows)  # both_wrong counts as needing retrieval
    assert (g["n"], g["positives"], g["negatives"]) == (5, 3, 2)
    assert (g["tp"], g["fp"], g["fn"], g["tn"]) == (2, 1, 1, 1)
    assert g["precision"] == pytest.approx(2 / 3) and g["recall"] == pytest.approx(2 / 3)
    # positives 0.9, 0.4, 0.7 vs negatives 0.6, 0.1: 5 of 6 pairs ordered right
    assert g["auroc"] == pytest.approx(5 / 6) and g["n_scored"] == 5
    assert sum(b["count"] for b in g["reliability"]) == 5
    top = [b for b in g["reliability"] if b["lo"] == pytest.approx(0.9)][0]
    assert top["count"] == 1 and top["observed"] == 1.0 and top["mean_score"] == pytest.approx(0.9)
    dropped = gate_quality(rows, both_wrong_as="drop")
    assert dropped["n"] == 4
    assert gate_quality([rec(0)]) is None


def test_threshold_sweep_hand_case():
    rows = [rec(i, score=s, closed_correct=c, open_correct=o, retrieved=d, correct=k)
            for i, (s, c, o, d, k) in enumerate([(0.1, True, False, False, True), (0.4, True, True, False, True),
                                                 (0.6, False, True, True, True), (0.9, False, True, True, False)])]
    sw = threshold_sweep(rows)
    pts = [(round(p["retrieval_rate"], 2), round(p["accuracy"], 2)) for p in sw["points"]]
    assert pts == [(1.0, 0.75), (0.75, 1.0), (0.5, 1.0), (0.25, 0.75), (0.0, 0.5)]
    assert sw["best"]["threshold"] == pytest.approx(0.6) and sw["best"]["retrieval_rate"] == 0.5
    assert (sw["never_accuracy"], sw["always_accuracy"], sw["oracle_accuracy"]) == (0.5, 0.75, 1.0)
    op = sw["operating_point"]
    assert op["retrieval_rate"] == 0.5 and op["label_accuracy"] == 1.0 and op["measured_accuracy"] == 0.75
    # at most `points` thresholds, the two ends kept
    many = [rec(i, score=i / 100, closed_correct=True, open_correct=False) for i in range(100)]
    sw = threshold_sweep(many, points=11)
    assert len(sw["points"]) == 11
    assert sw["points"][0]["retrieval_rate"] == 1.0 and sw["points"][-1]["retrieval_rate"] == 0.0
    # constant scores (never/always) or no branch correctness: no sweep
    assert threshold_sweep([rec(i, closed_correct=True, open_correct=True) for i in range(3)]) is None
    assert threshold_sweep([rec(i, score=i / 3) for i in range(3)]) is None


def test_expert_utilisation_means_entropy_and_collapse():
    usages = [{"layers": {"0": [0.5, 0.5, 0.0], "1": [1.0, 0.0, 0.2]}, "retrieval_expert_share": 0.0},
              {"layers": {"0": [0.4, 0.4, 0.2], "1": [1.0, 0.0, 0.4]}, "retrieval_expert_share": 0.2},
              {}]
    u = expert_utilisation(usages)
    assert u["layers"]["0"]["share"] == pytest.approx([0.45, 0.45, 0.1])
    assert u["layers"]["0"]["normalized_entropy"] == pytest.approx(1.0)
    assert u["layers"]["0"]["retrieval_share"] == pytest.approx(0.1) and u["retrieval_slot"]
    assert u["retrieval_expert_share"] == pytest.approx(0.1)
    assert u["layers"]["1"]["entropy"] == pytest.approx(0.0)  # all FFN tokens on one expert
    assert u["collapsed_layers"] == [1] and any("dominant" in m for m in u["collapse"])
    assert expert_utilisation([{"layers": {}, "retrieval_expert_share": None}]) is None


def test_select_questions_is_seeded_and_groups_follow_labels():
    qs = [Question(str(i), f"q{i}") for i in range(20)]
    assert select_questions(qs, None, 0) == qs
    a, b = select_questions(qs, 5, 1, "x"), select_questions(qs, 5, 1, "x")
    assert [q.id for q in a] == [q.id for q in b] and len(a) == 5
    assert [q.id for q in a] != [q.id for q in select_questions(qs, 5, 2, "x")]
    assert len(select_questions(qs, 50, 0)) == 20
    assert group_of(LabelRecord("1", "q", "no_retrieve", True, False)) == "no_retrieval"
    assert group_of(LabelRecord("1", "q", "retrieve", False, True)) == "retrieval"
    assert group_of(LabelRecord("1", "q", "both_wrong", False, False)) == "both_wrong"
    assert group_of(None) is None


# ----------------------------------------------------------------------------------------- evaluate


class StubRAG:
    """Retrieves per its policy; knows closed-book the answers of questions 0-2, open-book all of them."""

    def __init__(self, policy: str, k: int = 3):
        self.policy_name = policy
        self.config = PipelineConfig(k=k)
        self.answer_cache = object()  # the runner must switch caches off
        self.retrieval_cache = object()
        self.calls: list[str] = []

    def decide(self, q: str) -> tuple[bool, float, str]:
        n = int(q.split()[-1])
        if self.policy_name == "never":
            return False, 0.0, "fixed"
        if self.policy_name == "always":
            return True, 1.0, "fixed"
        return n >= 3, n / 10, "fast"

    def answer(self, question: str, user=None, metadata=None) -> Answer:
        self.calls.append(question)
        if "broken" in question:
            raise InputError("bad question")
        if self.policy_name == "flaky" and question.endswith(" 4"):
            raise ExpertRAGError("model has no retrieval expert")
        retrieve, score, stage = self.decide(question)
        n = int(question.split()[-1])
        right = retrieve or n < 3
        return Answer(question=question, text="x", retrieved=retrieve,
                      gate={"decision": "retrieve" if retrieve else "no_retrieve", "score": score, "stage": stage,
                            "policy": self.policy_name},
                      timings=Timings(gate_ms=1.0, total_ms=(20.0 if retrieve else 10.0) + self.config.k,
                                      generation_ms=5.0),
                      tokens={"prompt": 50 * self.config.k if retrieve else 20, "generated": 5},
                      generated=f"ans{n}" if right else "wrong",
                      experts={"layers": {"0": [0.6, 0.4]}, "retrieval_expert_share": None})


def stub_questions(n: int = 6) -> list[Question]:
    return [Question(str(i), f"question {i}", [f"ans{i}"]) for i in range(n)]


def stub_labels(n: int = 6) -> dict[str, LabelRecord]:
    return {str(i): LabelRecord(str(i), f"question {i}", "no_retrieve" if i < 3 else "retrieve", i < 3, True)
            for i in range(n)}


def stub_factory(made: list):
    def factory(policy: str):
        if policy == "adaptive-missing":
            raise GateArtifactError("policy needs fast.json; train it with `expertrag train gate`")
        rag = StubRAG(policy)
        made.append(rag)
        return rag
    return factory


def test_evaluate_with_a_stub_pipeline(tmp_path):
    made: list[StubRAG] = []
    f = tmp_path / "d.jsonl"
    f.write_text("{}\n")
    qs = {"d": stub_questions(), "e": [Question("b", "broken 0", ["x"])]}
    res = evaluate(stub_factory(made), qs, ["never", "always", "scored", "adaptive-missing", "flaky"],
                   labels=stub_labels(), k_sweep=[1, 3], files={"d": f}, progress=False)
    assert all(r.answer_cache is None and r.retrieval_cache is None for r in made)
    json.dumps(res, allow_nan=False)  # strict JSON throughout
    assert set(res["results"]) == {"never", "always", "scored"}
    assert "GateArtifactError" in res["skipped"]["adaptive-missing"] and "flaky" in res["skipped"]
    never, always, scored = (res["results"][p]["overall"] for p in ("never", "always", "scored"))
    assert never["retrieval_rate"] == 0.0 and always["retrieval_rate"] == 1.0 and scored["retrieval_rate"] == 0.5
    assert never["accuracy"] == 0.5 and always["accuracy"] == 1.0 and scored["accuracy"] == 1.0
    assert never["n"] == 6 and never["errors"] == 1 and res["results"]["never"]["datasets"]["e"]["errors"] == 1
    assert scored["gate_quality"]["f1"] == 1.0 and scored["gate_quality"]["auroc"] == 1.0
    assert res["results"]["never"]["sweep"] is None
    sw = res["results"]["scored"]["sweep"]
    assert sw["best"]["accuracy"] == 1.0 and sw["best"]["retrieval_rate"] == 0.5
    # latency: 13 ms never, 23 always, 13/23 half-half for the scored gate; the no-retrieval half is 13 vs 23
    assert res["results"]["scored"]["speedup_vs_always"] == pytest.approx(23 / 18)
    assert res["results"]["scored"]["speedup_vs_always_no_retrieval"] == pytest.approx(23 / 13)
    assert res["results"]["always"]["groups"]["retrieval"]["n"] == 3
    assert res["context_dilution"]["1"]["mean_prompt_tokens"] == 50
    assert res["context_dilution"]["3"]["n"] == 6  # k=3 reuses the always run
    assert res["datasets"]["d"]["sha256"] and res["datasets"]["d"]["labelled"] == 6
    assert res["packages"]["expertrag"] and res["machine"]["cpu_count"]
    assert res["results"]["never"]["overall"]["experts"]["layers"]["0"]["share"] == pytest.approx([0.6, 0.4])
    # 3 policies x 7 questions, then the k=1 dilution run's 7 (k=3 is the always run itself)
    assert len(res["records"]) == 4 * 7 and "_experts" not in res["records"][0]
    assert res["summary"]["speedup_adaptive_vs_always"] is None  # adaptive was not run
    again = evaluate(stub_factory([]), qs, ["never", "always", "scored"], labels=stub_labels(), progress=False)
    key = [(r["policy"], r["id"], r.get("correct")) for r in again["records"]]
    assert key == [(r["policy"], r["id"], r.get("correct")) for r in evaluate(
        stub_factory([]), qs, ["never", "always", "scored"], labels=stub_labels(), progress=False)["records"]]


def test_k_sweep_keeps_every_answer_tagged_with_its_k():
    res = evaluate(stub_factory([]), stub_questions(), ["never", "always"], k_sweep=[1, 3, 5], progress=False)
    by_run: dict[str, list[dict]] = {}
    for r in res["records"]:
        by_run.setdefault(r["policy"], []).append(r)
    assert list(by_run) == ["never", "always", "always@k=1", "always@k=5"]  # policies first, then k order
    assert {r["k"] for r in by_run["always"]} == {3} and {r["k"] for r in by_run["never"]} == {3}
    for k in (1, 5):
        recs = by_run[f"always@k={k}"]
        assert [r["id"] for r in recs] == [q.id for q in stub_questions()] and {r["k"] for r in recs} == {k}
        # the stub's prompt is 50 tokens per passage: each record holds its own run's answer
        assert {r["prompt_tokens"] for r in recs} == {50 * k}
        assert res["context_dilution"][str(k)]["mean_prompt_tokens"] == 50 * k
    # the dilution runs are records, not policies: results and the latency figure list only the policies
    assert set(res["results"]) == {"never", "always"}


def policy_failing_with(error: Exception):
    """A factory whose 'buggy' policy raises `error` on every answer (as a bug in decide() would)."""
    def factory(policy: str):
        rag = StubRAG(policy)
        if policy == "buggy":
            def answer(question, user=None, metadata=None):
                raise error
            rag.answer = answer
        if policy == "adaptive-missing":
            raise GateArtifactError("policy 'adaptive' needs gate/fast.json, which does not exist")
        return rag
    return factory


def test_a_bug_in_a_policy_raises_while_missing_artifacts_are_skipped():
    qs = stub_questions(3)
    res = evaluate(policy_failing_with(KeyError("x")), qs, ["never", "adaptive-missing"], progress=False)
    assert set(res["results"]) == {"never"} and "fast.json" in res["skipped"]["adaptive-missing"]
    with pytest.raises(KeyError):  # decide() raising KeyError is a bug: it must not become a skipped line
        evaluate(policy_failing_with(KeyError("x")), qs, ["never", "buggy", "adaptive-missing"], progress=False)

    def broken_factory(policy: str):
        if policy == "buggy":
            raise KeyError("low")  # building the policy hits a bug
        return StubRAG(policy)

    with pytest.raises(KeyError):
        evaluate(broken_factory, qs, ["never", "buggy"], progress=False)


def test_evaluate_interleaves_policies_and_samples_by_seed():
    made: list[StubRAG] = []
    res = evaluate(stub_factory(made), stub_questions(10), ["never", "always"], limit=4, seed=3, progress=False)
    never, always = made
    # one untimed warm-up each, then the same 4 sampled questions in the same order
    assert never.calls[1:] == always.calls[1:] and len(never.calls) == 5 and never.calls[0] == never.calls[1]
    assert res["datasets"]["all"]["evaluated"] == 4 and res["summary"]["policies"]["never"]["n"] == 4
    with pytest.raises(ValueError):
        evaluate(stub_factory([]), stub_questions(), [], progress=False)


# ---------------------------------------------------------------------------------------------- workload


def labelled(n_closed: int, n_retrieve: int, n_both: int) -> tuple[list[LabelRecord], dict[str, Question]]:
    recs = ([LabelRecord(f"c{i}", "q", "no_retrieve", True, bool(i % 2)) for i in range(n_closed)]
            + [LabelRecord(f"r{i}", "q", "retrieve", False, True) for i in range(n_retrieve)]
            + [LabelRecord(f"b{i}", "q", "both_wrong", False, False) for i in range(n_both)])
    return recs, {r.id: Question(r.id, f"question {r.id}", ["a"]) for r in recs}


def test_workload_is_balanced_and_seeded():
    recs, qs = labelled(30, 25, 10)
    w = mixed_workload(recs, qs, size=20, seed=1)
    assert len(w.questions) == 20 and list(w.groups.values()).count("no_retrieval") == 10
    assert w.used == {"closed_correct": 10, "retrieve": 10, "both_wrong": 0}
    assert w.available == {"closed_correct": 30, "retrieve": 25, "both_wrong": 10, "without_question": 0}
    assert all(w.groups[q.id] == ("no_retrieval" if q.id.startswith("c") else "retrieval") for q in w.questions)
    same = mixed_workload(list(reversed(recs)), qs, size=20, seed=1)  # label-file order does not matter
    assert [q.id for q in same.questions] == [q.id for q in w.questions]
    assert [q.id for q in mixed_workload(recs, qs, size=20, seed=2).questions] != [q.id for q in w.questions]


def test_workload_fallback_and_shortage():
    recs, qs = labelled(30, 3, 10)
    w = mixed_workload(recs, qs, size=20, seed=0)
    assert w.used == {"closed_correct": 10, "retrieve": 3, "both_wrong": 7} and len(w.questions) == 20
    assert any("both_wrong" in n for n in w.notes)
    strict = mixed_workload(recs, qs, size=20, seed=0, fallback_both_wrong=False)
    assert strict.used == {"closed_correct": 3, "retrieve": 3, "both_wrong": 0} and strict.notes
    loose = mixed_workload(recs, qs, size=20, seed=0, fallback_both_wrong=False, keep_balance=False)
    assert loose.used == {"closed_correct": 10, "retrieve": 3, "both_wrong": 0}
    del qs["c0"]
    assert mixed_workload(recs, qs, size=20).available["without_question"] == 1


# ----------------------------------------------------------------------------------------- commands


DOCS = [
    Document("paris", "Paris", "Paris is the capital and largest city of France, on the Seine."),
    Document("zorbl", "Zorblatt Institute", "The Zorblatt Institute was founded in 1987 by Mirela Quenton in Tallinn."),
    Document("moon", "Moon", "The Moon is Earth's only natural satellite; it causes the tides."),
    Document("tea", "Tea", "Tea is an aromatic beverage prepared by pouring hot water over cured tea leaves."),
]
QUESTIONS = [("fr", "What is the capital of France?", ["Paris"]),
             ("zo", "Who founded the Zorblatt Institute?", ["Mirela Quenton"]),
             ("tide", "What causes the tides on Earth?", ["the Moon", "Moon"])]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from expertrag.retrieval import build_index

    out = tmp_path_factory.mktemp("eval") / "index"
    build_index(out, DOCS, progress=False)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "questions").mkdir()
    (d / "labels").mkdir()
    (d / "questions" / "qs.jsonl").write_text("".join(
        json.dumps({"id": i, "question": q, "golden_answers": g}) + "\n" for i, q, g in QUESTIONS))
    labels = [LabelRecord("fr", QUESTIONS[0][1], "no_retrieve", True, True),
              LabelRecord("zo", QUESTIONS[1][1], "retrieve", False, True),
              LabelRecord("tide", QUESTIONS[2][1], "both_wrong", False, False)]
    (d / "labels" / "l.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in labels))
    return d


def run_cli(args: list[str]):
    from typer.testing import CliRunner

    from expertrag.cli.app import app  # importing the app registers every command

    return CliRunner().invoke(app, args)


def test_cli_rejects_bad_arguments(tmp_path, data_dir):
    q = str(data_dir / "questions" / "qs.jsonl")
    r = run_cli(["eval", "--index", str(tmp_path), "--dataset", q, "--out", str(tmp_path / "o"), "--policies", "never,nope"])
    assert isinstance(r.exception, InputError) and "unknown policy 'nope'" in str(r.exception)
    r = run_cli(["eval", "--index", str(tmp_path), "--dataset", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])
    assert isinstance(r.exception, InputError) and "missing.jsonl" in str(r.exception)
    r = run_cli(["eval", "--index", str(tmp_path / "nope"), "--dataset", q, "--out", str(tmp_path)])
    assert isinstance(r.exception, InputError) and "index" in str(r.exception)
    r = run_cli(["eval", "--index", str(tmp_path), "--dataset", q, "--out", str(tmp_path), "--k-sweep", "1,x"])
    assert isinstance(r.exception, InputError) and "--k-sweep" in str(r.exception)
    r = run_cli(["eval", "--index", str(tmp_path), "--dataset", q, "--out", str(tmp_path),
                 "--labels", str(tmp_path / "nolabels.jsonl")])
    assert isinstance(r.exception, InputError) and "nolabels.jsonl" in str(r.exception)
    r = run_cli(["bench", "pipeline", "--data", str(tmp_path), "--index", str(tmp_path)])
    assert isinstance(r.exception, InputError) and "question files" in str(r.exception)


@pytest.mark.slow
def test_cli_eval_and_bench_pipeline(index_dir, data_dir, tmp_path, monkeypatch, smollm2):
    import expertrag.cli.eval_common as ec
    from expertrag.model.generator import ExpertRAGGenerator

    # the session's already-loaded SmolLM2 instead of a second copy
    monkeypatch.setattr(ec, "load_generator", lambda config: ExpertRAGGenerator(*smollm2))
    conf = tmp_path / "c.yaml"
    conf.write_text("pipeline:\n  max_new_tokens: 8\n  probe_tokens: 4\n  k: 2\n")
    out = tmp_path / "eval"
    r = run_cli(["eval", "--index", str(index_dir), "--dataset", str(data_dir / "questions" / "qs.jsonl"),
                 "--labels", str(data_dir / "labels" / "l.jsonl"), "--policies", "never,always,adaptive",
                 "--out", str(out), "--k-sweep", "1", "--config", str(conf), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["policies"]["never"]["retrieval_rate"] == 0.0 and summary["policies"]["always"]["retrieval_rate"] == 1.0
    assert "adaptive" in summary["skipped"] and "train" in summary["skipped"]["adaptive"]
    doc = json.loads((out / "eval.json").read_text())
    assert doc["context_dilution"]["1"]["n"] == 3 and doc["config"]["labels"]
    never_recs = [x for x in doc["records"] if x["policy"] == "never"]
    assert doc["summary"]["policies"]["never"]["accuracy"] == pytest.approx(
        sum(x["correct"] for x in never_recs) / len(never_recs))
    assert [x["k"] for x in doc["records"] if x["policy"] == "always@k=1"] == [1, 1, 1]
    assert (out / "report.md").is_file() and (out / "latency_cdf.png").is_file()

    r = run_cli(["bench", "pipeline", "--data", str(data_dir), "--index", str(index_dir), "--size", "2",
                 "--policies", "never,always,flare,skr-knn", "--config", str(conf), "--json",
                 "--out", str(tmp_path / "bench")])
    assert r.exit_code == 0, r.output
    b = json.loads(r.stdout.strip().splitlines()[-1])
    assert b["size"] == 2 and b["workload"]["used"] == {"closed_correct": 1, "retrieve": 1, "both_wrong": 0}
    assert set(b["policies"]) == {"never", "always", "flare"} and "skr-knn" in b["skipped"]
    for p in b["policies"].values():
        assert {"accuracy", "retrieval_rate", "latency_ms_mean", "latency_ms_p95", "latency_ms_p99"} <= set(p)
    # flare's rate is what its decisions give, and each decision follows its rule: retrieve iff the least
    # likely drafted token has p < 0.2, i.e. score = 1 - p_min > 0.8
    flare = [x for x in json.loads((tmp_path / "bench" / "eval.json").read_text())["records"]
             if x["policy"] == "flare"]
    assert len(flare) == 2 and all(x["retrieved"] == (x["score"] > 0.8) for x in flare)
    assert b["policies"]["flare"]["retrieval_rate"] == pytest.approx(sum(x["retrieved"] for x in flare) / 2)
    assert b["speedup_adaptive_vs_always"] is None and "speedup_no_retrieval_half" in b


# ------------------------------------------------------------------------------------ real model, slow


@pytest.mark.slow
def test_evaluate_end_to_end_with_smollm2(index_dir, data_dir, smollm2):
    from expertrag.gate.policies import make_policy
    from expertrag.model.generator import ExpertRAGGenerator
    from expertrag.pipeline.rag import ExpertRAG
    from expertrag.retrieval.index import Index

    index = Index(index_dir)
    gen = ExpertRAGGenerator(*smollm2)
    cfg = PipelineConfig(k=2, max_new_tokens=8, probe_tokens=4, abstain_below=0.0)

    def factory(policy):
        return ExpertRAG(index, gen, make_policy(policy), cfg, policy)

    questions = [Question(i, q, g) for i, q, g in QUESTIONS]
    labels = {r.id: r for r in (LabelRecord("fr", "q", "no_retrieve", True, True),
                                LabelRecord("zo", "q", "retrieve", False, True))}
    res = evaluate(factory, {"qs": questions}, ["never", "always"], labels=labels, k_sweep=[1], progress=False)
    json.dumps(res, allow_nan=False)
    never, always = res["results"]["never"]["overall"], res["results"]["always"]["overall"]
    assert never["retrieval_rate"] == 0.0 and always["retrieval_rate"] == 1.0
    assert never["n"] == always["n"] == 3 and never["stages"] == {"fixed": 1.0}
    assert always["mean_prompt_tokens"] > never["mean_prompt_tokens"]
    for name, o in (("never", never), ("always", always)):
        assert o["correct"] == round(o["accuracy"] * o["graded"]) and 0 < o["latency_ms_p50"] <= o["latency_ms_p99"]
        mine = [r for r in res["records"] if r["policy"] == name]  # the summary is computed from these
        assert o["ms_per_generated_token"] == pytest.approx(
            sum(r["generation_ms"] for r in mine) / sum(r["generated_tokens"] for r in mine))
        assert o["gate_overhead_share"] == pytest.approx(
            sum(r["gate_ms"] for r in mine) / sum(r["latency_ms"] for r in mine))
        assert o["gate_quality"]["n"] == 2 and o["gate_quality"]["positives"] == 1
    assert res["results"]["always"]["overall"]["gate_quality"]["recall"] == 1.0
    recs = res["records"]
    assert len(recs) == 9 and [r["policy"] for r in recs] == ["never"] * 3 + ["always"] * 3 + ["always@k=1"] * 3
    assert [r["k"] for r in recs] == [2] * 6 + [1] * 3
    assert all(r["retrieved"] == r["policy"].startswith("always") and r["generated_tokens"] <= 8 for r in recs)
    assert res["context_dilution"]["1"]["n"] == 3
    assert res["summary"]["policies"]["always"]["speedup_vs_always"] == pytest.approx(1.0)


def test_merge_results_pools_disjoint_runs():
    from expertrag.eval.merge import merge_results

    qs = stub_questions(8)
    pols = ["never", "always", "scored"]
    whole = evaluate(stub_factory([]), qs, pols, labels=stub_labels(8), progress=False)
    parts = [evaluate(stub_factory([]), part, pols, labels=stub_labels(8), progress=False)
             for part in (qs[:3], qs[3:])]
    merged = merge_results(parts)
    json.dumps(merged, allow_nan=False)
    for p in pols:
        a, b = merged["results"][p]["overall"], whole["results"][p]["overall"]
        for key in ("n", "accuracy", "retrieval_rate", "latency_ms_mean", "latency_ms_p95"):
            assert a[key] == pytest.approx(b[key]), (p, key)
        for key in ("tp", "fp", "fn", "tn", "auroc"):
            assert a["gate_quality"][key] == pytest.approx(b["gate_quality"][key], nan_ok=True), (p, key)
    assert merged["summary"]["policies"]["scored"]["speedup_vs_always"] == pytest.approx(
        whole["summary"]["policies"]["scored"]["speedup_vs_always"])
    with pytest.raises(ValueError, match="disjoint"):
        merge_results([parts[1], parts[1]])
    parts[0]["workload"] = {"size": 3, "requested": 4, "available": {"retrieve": 2}, "used": {"retrieve": 1}}
    parts[1]["workload"] = {"size": 5, "requested": 6, "available": {"retrieve": 3}, "used": {"retrieve": 2},
                            "notes": ["short"]}
    wl = merge_results(parts)["workload"]
    assert (wl["size"], wl["requested"], wl["available"], wl["used"]) == (8, 10, {"retrieve": 5}, {"retrieve": 3})
    assert wl["notes"] == ["part 1: short"]
