"""Gate-only evaluation (`expertrag eval-gates`) and stratified label folds (`expertrag split-labels`)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from expertrag.errors import ExpertRAGError, InputError
from expertrag.eval.gate_eval import evaluate_gates
from expertrag.gate.labels import LabelRecord, read_labels, split_folds
from expertrag.gate.policies import make_policy
from expertrag.gate.types import Decision


def labels(n_no: int = 4, n_ret: int = 6, n_bw: int = 10) -> list[LabelRecord]:
    out = [LabelRecord(f"n{i}", f"known {i}", "no_retrieve", True, i % 2 == 0) for i in range(n_no)]
    out += [LabelRecord(f"r{i}", f"unknown {i}", "retrieve", False, True) for i in range(n_ret)]
    out += [LabelRecord(f"b{i}", f"hopeless {i}", "both_wrong", False, False) for i in range(n_bw)]
    return out


def test_split_folds_is_stratified_disjoint_and_order_free():
    recs = labels(5, 7, 11)
    folds = split_folds(recs, 2, seed=0)
    ids = [[r.id for r in f] for f in folds]
    assert sorted(ids[0] + ids[1]) == sorted(r.id for r in recs) and not set(ids[0]) & set(ids[1])
    for lab, total in (("no_retrieve", 5), ("retrieve", 7), ("both_wrong", 11)):
        counts = sorted(sum(r.label == lab for r in f) for f in folds)
        assert counts == [total // 2, total - total // 2]
    again = split_folds(list(reversed(recs)), 2, seed=0)
    assert [sorted(r.id for r in f) for f in again] == [sorted(i) for i in ids]
    other = split_folds(recs, 2, seed=1)
    assert [sorted(r.id for r in f) for f in other] != [sorted(i) for i in ids]
    assert sum(len(f) for f in split_folds(recs, 3)) == len(recs)
    with pytest.raises(ValueError):
        split_folds(recs, 1)


@dataclass
class Ctx:
    question: str
    metadata: dict


class KnownWordGate:
    """Scores 0.2 for questions with 'known' in them, else 0.9; retrieves at >= 0.5."""

    def decide(self, ctx: Ctx) -> Decision:
        s = 0.2 if "known" in ctx.question and "unknown" not in ctx.question else 0.9
        return Decision(s >= 0.5, s, "fast", "known-word")


class Broken:
    def decide(self, ctx: Ctx) -> Decision:
        raise ExpertRAGError("needs a model with a retrieval expert")


class KeyErrorBug:
    def decide(self, ctx: Ctx) -> Decision:
        return {}["missing"]  # a bug in a policy


def test_a_bug_in_a_policy_raises_while_missing_artifacts_are_skipped(tmp_path):
    recs = labels(2, 2, 0)
    with pytest.raises(KeyError):
        evaluate_gates(lambda r: Ctx(r.question, dict(r.metadata)), {"never": make_policy("never"),
                                                                     "bug": KeyErrorBug()}, recs, progress=False)
    # as `eval-gates` builds them: skr-knn's artifacts are missing in an empty gate folder -> skipped with
    # the loader's line; a bug while building a policy raises
    from expertrag.eval.gate_eval import build_policies
    from expertrag.gate.config import GateConfig

    built, skipped = build_policies(["never", "skr-knn"], GateConfig(), tmp_path)
    assert list(built) == ["never"] and "GateArtifactError" in skipped["skr-knn"]
    assert "skr_knn.json" in skipped["skr-knn"] and "train" in skipped["skr-knn"]
    with pytest.raises(AttributeError):
        build_policies(["popularity"], object(), tmp_path)  # a config without the fields: a bug, not a skip


def test_evaluate_gates_reads_accuracy_off_the_labels():
    recs = labels(4, 6, 10) + [LabelRecord("m0", "unknown meta", "retrieve")]  # no branch correctness
    policies = {"never": make_policy("never"), "always": make_policy("always"), "kw": KnownWordGate(),
                "broken": Broken()}
    res = evaluate_gates(lambda r: Ctx(r.question, dict(r.metadata)), policies, recs, progress=False)
    json.dumps(res, allow_nan=False)
    assert set(res["results"]) == {"never", "always", "kw"} and "retrieval expert" in res["skipped"]["broken"]
    never, always, kw = (res["results"][p]["overall"] for p in ("never", "always", "kw"))
    # 20 questions with both branches known: closed right 4, open right 2 (of the 4 known) + 6
    assert never["n"] == 21 and never["n_known"] == 20
    assert never["accuracy"] == pytest.approx(4 / 20) and always["accuracy"] == pytest.approx(8 / 20)
    assert kw["accuracy"] == pytest.approx(10 / 20)  # closed on the 4 known, open on the 6 that need it
    assert kw["retrieval_rate"] == pytest.approx(17 / 21) and kw["stages"] == {"fast": 1.0}
    g = kw["gate_quality"]  # need = not closed_correct: the 17 others (m0 included)
    assert (g["tp"], g["fp"], g["fn"], g["tn"]) == (17, 0, 0, 4) and g["auroc"] == 1.0
    dec = kw["gate_quality_decisive"]  # retrieve vs no_retrieve only: 7 need it, 4 do not
    assert (dec["n"], dec["positives"], dec["auroc"]) == (11, 7, 1.0)
    assert res["baselines"] == pytest.approx({"never_accuracy": 0.2, "always_accuracy": 0.4, "oracle_accuracy": 0.5})
    assert res["results"]["kw"]["sweep"]["best"]["accuracy"] == pytest.approx(0.5)
    assert res["results"]["never"]["sweep"] is None  # a constant score has no curve
    assert res["results"]["kw"]["sources"]["n0"]["n"] == 1  # source falls back to the id's prefix
    assert res["labels"] == {"both_wrong": 10, "no_retrieve": 4, "retrieve": 7}


# ------------------------------------------------------------------------------------------ commands


def run_cli(args: list[str]):
    from typer.testing import CliRunner

    from expertrag.cli.app import app  # importing the app registers every command

    return CliRunner().invoke(app, args)


def test_split_labels_command(tmp_path):
    from expertrag.gate.labels import write_labels

    src = tmp_path / "labels.jsonl"
    write_labels(src, labels())
    r = run_cli(["split-labels", "--labels", str(src), "--out", str(tmp_path / "folds"), "--folds", "2"])
    assert r.exit_code == 0, r.output
    f0, t0 = read_labels(tmp_path / "folds" / "fold0.jsonl"), read_labels(tmp_path / "folds" / "train0.jsonl")
    f1 = read_labels(tmp_path / "folds" / "fold1.jsonl")
    assert {r.id for r in t0} == {r.id for r in f1} and len(f0) + len(t0) == 20
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": r.id, "question": r.question, "golden_answers": ["a"]}) + "\n"
                             for r in labels()))
    r = run_cli(["split-labels", "--labels", str(src), "--out", str(tmp_path / "fq"), "--questions", str(qfile)])
    assert r.exit_code == 0, r.output
    from expertrag.data.questions import load_questions

    assert [q.id for q in load_questions(tmp_path / "fq" / "fold1.questions.jsonl")] == [r.id for r in f1]
    qfile.write_text(json.dumps({"id": "other", "question": "?", "golden_answers": ["a"]}) + "\n")
    r = run_cli(["split-labels", "--labels", str(src), "--out", str(tmp_path / "fx"), "--questions", str(qfile)])
    assert isinstance(r.exception, InputError) and "not in the question file" in str(r.exception)
    r = run_cli(["split-labels", "--labels", str(src), "--out", str(tmp_path / "x"), "--folds", "1"])
    assert isinstance(r.exception, InputError) and "--folds" in str(r.exception)
    r = run_cli(["eval-gates", "--index", str(tmp_path / "none"), "--labels", str(src), "--out", str(tmp_path / "o")])
    assert isinstance(r.exception, InputError) and "index" in str(r.exception)


@pytest.mark.slow
def test_eval_gates_command_with_smollm2(tmp_path, monkeypatch, smollm2):
    import expertrag.cli.eval_common as ec
    from expertrag.data.types import Document
    from expertrag.gate.labels import write_labels
    from expertrag.model.generator import ExpertRAGGenerator
    from expertrag.retrieval import build_index

    monkeypatch.setattr(ec, "load_generator", lambda config: ExpertRAGGenerator(*smollm2))
    index = tmp_path / "index"
    build_index(index, [Document("fr", "France", "Paris is the capital of France."),
                        Document("moon", "Moon", "The Moon is Earth's only natural satellite.")], progress=False)
    lab = tmp_path / "l.jsonl"
    write_labels(lab, [LabelRecord("fr", "What is the capital of France?", "no_retrieve", True, True),
                       LabelRecord("mo", "What is Earth's only natural satellite?", "retrieve", False, True),
                       LabelRecord("zo", "Who founded the Zorblatt Institute?", "both_wrong", False, False)])
    conf = tmp_path / "c.yaml"
    # 8 answer tokens, not the default 24: the timed answers still outlast flare's 4-token probe
    conf.write_text("pipeline:\n  probe_tokens: 4\n  max_new_tokens: 8\n")
    out = tmp_path / "out"
    r = run_cli(["eval-gates", "--index", str(index), "--labels", str(lab), "--out", str(out),
                 "--policies", "never,always,flare,skr-knn", "--config", str(conf), "--json",
                 "--time-answers", "2", "--bootstrap", "50"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout.strip().splitlines()[-1])
    # answer time measured on 2 questions per branch; flare's probe is its cost, a share of that time
    assert s["answer_ms"]["questions"] == 2 and s["answer_ms"]["open"] > 0 and s["answer_ms"]["closed"] > 0
    assert 0 < s["policies"]["flare"]["cost"]["gate_share_of_answer_time"] < 1
    assert s["policies"]["flare"]["operating"]["n"] == 3
    assert set(s["policies"]) == {"never", "always", "flare"} and "skr-knn" in s["skipped"]
    assert s["policies"]["never"]["accuracy"] == pytest.approx(1 / 3)
    assert s["policies"]["always"]["accuracy"] == pytest.approx(2 / 3)
    doc = json.loads((out / "gates.json").read_text())
    flare = [x for x in doc["records"] if x["policy"] == "flare"]
    # each decision follows flare's rule (retrieve iff p_min < 0.2, score = 1 - p_min), and the rate is theirs
    assert len(flare) == 3 and all(0.0 <= x["score"] <= 1.0 and x["retrieved"] == (x["score"] > 0.8) for x in flare)
    assert s["policies"]["flare"]["retrieval_rate"] == pytest.approx(sum(x["retrieved"] for x in flare) / 3)
    assert (out / "gates.md").is_file()


def test_merged_folds_equal_one_run_over_all_questions(tmp_path):
    from expertrag.eval.gate_eval import merge_gate_results

    recs = labels(4, 6, 10)
    folds = split_folds(recs, 2)
    pol = {"never": make_policy("never"), "kw": KnownWordGate()}

    def ctx(r):
        return Ctx(r.question, dict(r.metadata))

    whole = evaluate_gates(ctx, pol, recs, progress=False)
    parts = [evaluate_gates(ctx, pol, f, progress=False) for f in folds]
    merged = merge_gate_results(parts)
    assert merged["n"] == 20 and merged["merged_from"] == 2
    assert merged["baselines"] == whole["baselines"] and merged["labels"] == whole["labels"]
    for p in pol:
        a, b = merged["results"][p]["overall"], whole["results"][p]["overall"]
        assert a["accuracy"] == pytest.approx(b["accuracy"]) and a["gate_quality"] == b["gate_quality"]
    with pytest.raises(ValueError, match="disjoint"):
        merge_gate_results([parts[0], parts[0]])
    # the command: both formats, and clear errors for anything else
    for i, part in enumerate(parts):
        (tmp_path / f"g{i}.json").write_text(json.dumps(part))
    r = run_cli(["merge-results", str(tmp_path / "g0.json"), str(tmp_path / "g1.json"), "--out", str(tmp_path / "m"),
                 "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["n"] == 20 and s["policies"]["kw"]["accuracy"] == pytest.approx(0.5)
    assert (tmp_path / "m" / "gates.md").is_file()
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    r = run_cli(["merge-results", str(tmp_path / "bad.json"), "--out", str(tmp_path / "m2")])
    assert isinstance(r.exception, InputError) and "bad.json" in str(r.exception)
    (tmp_path / "broken.json").write_text('{"format": ')
    r = run_cli(["merge-results", str(tmp_path / "broken.json"), "--out", str(tmp_path / "m2")])
    assert isinstance(r.exception, InputError) and "not a JSON" in str(r.exception)


def test_fixed_splits_never_move_a_question_as_the_label_file_grows(tmp_path):
    from expertrag.gate.labels import parse_splits, split_fixed, write_labels

    shares = parse_splits("train=0.6,dev=0.2,test=0.2")
    big = labels(60, 90, 150)
    small = big[::3]  # an earlier, shorter state of the same file (another order too)
    where_big = {r.id: n for n, part in split_fixed(big, shares).items() for r in part}
    where_small = {r.id: n for n, part in split_fixed(list(reversed(small)), shares).items() for r in part}
    assert all(where_big[i] == n for i, n in where_small.items())
    parts = split_fixed(big, shares)
    assert sum(len(p) for p in parts.values()) == len(big)
    # each label lands in each split near its share (hash positions are uniform and label-blind)
    for lab, total in (("no_retrieve", 60), ("retrieve", 90), ("both_wrong", 150)):
        for name, share in shares.items():
            got = sum(r.label == lab for r in parts[name])
            assert abs(got - share * total) <= 4 * (share * (1 - share) * total) ** 0.5 + 1, (lab, name, got)
    assert split_fixed(big, shares, seed=1) != parts  # the seed matters

    src = tmp_path / "l.jsonl"
    write_labels(src, big)
    r = run_cli(["split-labels", "--labels", str(src), "--out", str(tmp_path / "s"), "--prefix", "shared",
                 "--splits", "train=0.6,dev=0.2,test=0.2"])
    assert r.exit_code == 0, r.output
    assert "shared_test:" in r.output and "no_retrieve" in r.output
    assert [x.id for x in read_labels(tmp_path / "s" / "shared_dev.jsonl")] == [x.id for x in parts["dev"]]
    for bad, msg in (("train=0.6,test=0.3", "sum to"), ("train=0.6,0.4", "NAME=SHARE"), ("train=1", "two"),
                     ("a=x,b=1", "not a number"), ("a=0.5,a=0.5", "twice")):
        r = run_cli(["split-labels", "--labels", str(src), "--out", str(tmp_path / "x"), "--splits", bad])
        assert isinstance(r.exception, InputError) and msg in str(r.exception), (bad, r.exception)
    r = run_cli(["split-labels", "--labels", str(src), "--out", str(tmp_path / "x"), "--splits", "a=0.5,b=0.5",
                 "--folds", "2"])
    assert isinstance(r.exception, InputError) and "not both" in str(r.exception)


class TierGate:
    """Scores retrieve-labelled questions 0.9, known ones 0.2, hopeless ones 0.1 (a near-oracle ordering)."""

    def decide(self, ctx) -> Decision:
        s = 0.9 if ctx.question.startswith("unknown") else 0.2 if ctx.question.startswith("known") else 0.1
        return Decision(s >= 0.5, s, "fast", "tier")


@dataclass
class ProbingCtx:
    question: str
    metadata: dict
    calls: int = 0

    def probe(self):
        from expertrag.gate.types import Probe

        self.calls += 1
        return Probe("x", [1], [-0.1], [0.2], ms=50.0)  # as if the draft had taken 50 ms


class ProbingGate:
    name = "probing"

    def decide(self, ctx) -> Decision:
        ctx.probe()
        return Decision(True, 0.5, "probe", self.name)


def test_intervals_operating_points_and_gate_cost():
    from expertrag.eval.config import EvalConfig
    from expertrag.eval.gate_quality import curve_gain, matching_rate

    recs = labels(4, 6, 10)
    policies = {"kw": KnownWordGate(), "tier": TierGate(), "p1": ProbingGate(), "p2": ProbingGate()}
    res = evaluate_gates(lambda r: ProbingCtx(r.question, dict(r.metadata)), policies, recs, progress=False,
                         settings=EvalConfig(bootstrap=200), answer_ms={"closed": 100.0, "open": 300.0})
    json.dumps(res, allow_nan=False)
    kw, tier = res["results"]["kw"]["overall"], res["results"]["tier"]["overall"]
    # always-retrieve: 8/20. kw must retrieve for the 16 unknown+hopeless to reach it; tier only for the 6
    assert kw["operating"]["match_rate"] == pytest.approx(16 / 20)
    assert tier["operating"]["match_rate"] == pytest.approx(6 / 20)
    # tier's curve (0, .2) (.3, .5) (.5, .4) (1, .4) against the chord from .2 to .4
    assert tier["operating"]["curve_gain"] == pytest.approx(0.395 - 0.3)
    lo, hi = tier["operating"]["match_rate_ci"]
    assert lo <= 6 / 20 <= hi and 0 <= lo and hi <= 1
    assert tier["auroc_ci"][0] <= tier["gate_quality"]["auroc"] <= tier["auroc_ci"][1]
    assert kw["operating"]["accuracy_at_decisions"] == pytest.approx(0.5)
    # each policy reading the (shared, cached) probe is charged its 50 ms; the others are not
    for p in ("p1", "p2"):
        c = res["results"][p]["overall"]["cost"]
        assert c["gate_ms"] >= 50.0 and 0 < c["gate_share_of_answer_time"] < 1
    assert res["results"]["kw"]["overall"]["cost"]["gate_ms"] < 50.0
    assert matching_rate(np.array([0.0, 0.5, 1.0]), np.array([0.1, 0.3, 0.3]), 0.3) == 0.5
    assert matching_rate(np.array([0.0, 1.0]), np.array([0.1, 0.29]), 0.3) == 1.0  # never reached
    assert curve_gain(np.array([0.0, 1.0]), np.array([0.2, 0.4]), 0.2, 0.4) == pytest.approx(0.0)  # the chord
    import tempfile

    from expertrag.eval.gate_eval import write_gate_report

    with tempfile.TemporaryDirectory() as d:
        md = write_gate_report(res, d).read_text()
    assert "## Intervals and operating points" in md and "match always" in md
