"""ExpertRAG.answer end to end with the real SmolLM2, the real embedder and a small fixture index."""

from __future__ import annotations

import pytest

from expertrag.data.types import Document
from expertrag.errors import InputError
from expertrag.gate.config import GateConfig
from expertrag.gate.labels import LabelRecord
from expertrag.gate.policies import POLICIES, make_policy
from expertrag.gate.types import Decision
from expertrag.pipeline.answer import User
from expertrag.pipeline.config import PipelineConfig
from expertrag.pipeline.rag import ABSTAIN_TEXT, ExpertRAG
from expertrag.retrieval import Index, build_index

pytestmark = pytest.mark.slow

DOCS = [
    Document("paris", "Paris", "Paris is the capital and largest city of France, on the Seine."),
    Document("zorbl", "Zorblatt Institute", "The Zorblatt Institute was founded in 1987 by Mirela Quenton in Tallinn."),
    Document("secret", "Project Falcon", "Project Falcon's launch code word is Bluebird.", {"groups": ["staff"]}),
    Document("moon", "Moon", "The Moon is Earth's only natural satellite; it causes the tides."),
    Document("tea", "Tea", "Tea is an aromatic beverage prepared by pouring hot water over cured tea leaves."),
]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "index"
    build_index(out, DOCS, progress=False)
    return Index(out)


@pytest.fixture(scope="module")
def generator(smollm2):
    from expertrag.model.generator import ExpertRAGGenerator

    model, tokenizer = smollm2
    return ExpertRAGGenerator(model, tokenizer)


CFG = PipelineConfig(k=2, max_new_tokens=10, probe_tokens=4, answer_cache_size=0, retrieval_cache_size=0,
                     abstain_below=0.0)


def rag_with(index, generator, policy, **overrides) -> ExpertRAG:
    pol = make_policy(policy) if isinstance(policy, str) else policy
    return ExpertRAG(index, generator, pol, CFG.model_copy(update=overrides), getattr(pol, "name", "custom"))


def test_never_answers_closed_book(index, generator):
    a = rag_with(index, generator, "never").answer("What is the capital of France?")
    assert not a.retrieved and a.passages == [] and a.citations == []
    assert a.gate["decision"] == "no_retrieve" and a.gate["stage"] == "fixed"
    assert 0 < a.tokens["generated"] <= 10 and a.tokens["prompt"] > 0
    assert 0.0 < a.confidence <= 1.0 and a.timings.retrieval_ms == 0.0 and a.timings.total_ms > 0


def test_always_retrieves_and_cites_only_retrieved_passages(index, generator):
    a = rag_with(index, generator, "always", max_new_tokens=20).answer("Who founded the Zorblatt Institute?")
    assert a.retrieved and len(a.passages) == 2 and a.passages[0]["id"] == "zorbl"
    retrieved = {p["id"] for p in a.passages}
    assert {c.id for c in a.citations} <= retrieved
    # the passage holds the answer: the model must give it, and cite that passage
    assert not a.abstained and "Quenton" in a.text
    assert "zorbl" in {c.id for c in a.citations}
    t = a.timings  # the parts partition the total
    assert t.retrieval_ms > 0 and t.generation_ms > 0
    assert t.gate_ms + t.probe_ms + t.retrieval_ms + t.generation_ms + t.other_ms == pytest.approx(t.total_ms)


def test_citation_markers_outside_the_retrieved_set_are_dropped(index, generator):
    rag = rag_with(index, generator, "always")
    hits = index.search("Zorblatt Institute founder", 2)
    decision = Decision(True, 1.0, "fixed", "always")
    from expertrag.pipeline.answer import Timings

    a = rag._finish("q", "Mirela Quenton [1] [7]", [1, 2], [-0.1, -0.1], hits, decision, Timings(), None, 5)
    assert [c.marker for c in a.citations] == [1] and a.citations[0].id == hits[0].id
    assert a.text == "Mirela Quenton"
    # no marker: the passage containing the answer is cited
    a = rag._finish("q", "Mirela Quenton", [1], [-0.1], hits, decision, Timings(), None, 5)
    assert [c.id for c in a.citations] == ["zorbl"]


def test_abstains_when_unsure_and_unsupported(index, generator):
    unsure = rag_with(index, generator, "never", abstain_below=1.0)
    a = unsure.answer("What was the name of Mirela Quenton's first cat?")
    assert a.abstained and a.text == ABSTAIN_TEXT and a.citations == [] and a.generated
    # with retrieval the best passages come with the abstention
    b = rag_with(index, generator, "always", abstain_below=1.0).answer("What was Mirela Quenton's first cat called?")
    assert b.abstained and len(b.passages) == 2
    # a supported answer is not withdrawn however low its confidence
    from expertrag.pipeline.answer import Timings

    hits = index.search("Zorblatt founded", 2)
    c = unsure._finish("q", "1987", [1], [-5.0], hits, Decision(True, 1.0, "fixed", "always"), Timings(), None, 3)
    assert not c.abstained and c.text == "1987"


class ProbeThenSkip:
    """A policy that runs the closed-book probe and then decides not to retrieve."""

    name = "probe-then-skip"

    def decide(self, ctx):
        ctx.probe()
        return Decision(False, 0.0, "probe", self.name)


def test_no_retrieval_answer_continues_the_probe_token_for_token(index, generator):
    q = "Which planet is known as the Red Planet?"
    plain = rag_with(index, generator, "never").answer(q)
    reused = rag_with(index, generator, ProbeThenSkip()).answer(q)
    assert reused.token_ids == plain.token_ids and reused.generated == plain.generated
    assert reused.timings.probe_ms > 0 and reused.gate["stage"] == "probe"
    t = reused.timings  # the draft is counted once, in probe_ms, not again in generation_ms
    assert t.gate_ms + t.probe_ms + t.retrieval_ms + t.generation_ms + t.other_ms == pytest.approx(t.total_ms)
    assert t.generation_ms < plain.timings.generation_ms


def test_access_groups_reach_retrieval(index, generator):
    rag = rag_with(index, generator, "always", k=5)
    outsider = rag.answer("What is Project Falcon's launch code word?", user=User("eve", ("guests",)))
    assert "secret" not in {p["id"] for p in outsider.passages}
    staff = rag.answer("What is Project Falcon's launch code word?", user=User("ann", ("staff",)))
    assert staff.passages[0]["id"] == "secret"


@pytest.mark.parametrize("bad", ["", "   ", "?!", "x" * 1001, 42, None])
def test_bad_questions(index, generator, bad):
    with pytest.raises(InputError):
        rag_with(index, generator, "never").answer(bad)


def test_answer_cache(index, generator):
    rag = rag_with(index, generator, "never", answer_cache_size=8)
    first = rag.answer("What is tea?")
    second = rag.answer("what is tea")  # normalised key
    assert first.timings.cache == "miss" and second.timings.cache == "answer"
    assert second.text == first.text and second.token_ids == first.token_ids
    # retrieval cache: another policy misses the answer cache but reuses the hits
    rag_always = rag_with(index, generator, "always", retrieval_cache_size=8, max_new_tokens=4)
    a = rag_always.answer("What is tea?")
    b = rag_always.answer("What is tea?")
    assert a.timings.cache == "miss" and b.timings.cache == "retrieval" and b.passages == a.passages


def test_every_policy_runs_through_the_pipeline_with_trained_artifacts(index, generator, tmp_path):
    from expertrag.gate.train import train_artifacts
    from expertrag.pipeline.labeling import gate_examples

    questions = ["What is the capital of France?", "Who founded the Zorblatt Institute?", "What causes tides?",
                 "How is tea made?", "When was the Zorblatt Institute founded?", "Where is Paris?",
                 "What is the Moon?", "Who is Mirela Quenton?"]
    records = [LabelRecord(id=str(i), question=q, label="retrieve" if i % 2 else "no_retrieve",
                           closed_correct=not i % 2, open_correct=True,
                           metadata={"s_pop": 10 ** (i % 4 + 1), "relation": "r"})
               for i, q in enumerate(questions)]
    rag = rag_with(index, generator, "never")
    examples = gate_examples(rag, records, probe=True)
    assert examples[0].probe_features and examples[0].hidden is not None and examples[0].query_embedding is not None
    config = GateConfig(calibration="none", calibration_fraction=0.0, validation_fraction=0.0, skr_k=3)
    train_artifacts(examples, config, tmp_path / "gate")
    for name in POLICIES:
        if name == "router":
            continue  # needs a model with a retrieval expert (covered with the MoE model)
        policy = make_policy(name, config, tmp_path / "gate")
        a = rag_with(index, generator, policy).answer("Who founded the Zorblatt Institute?",
                                                     metadata={"s_pop": 50, "relation": "r"})
        assert a.gate["policy"] == name and a.gate["decision"] in ("retrieve", "no_retrieve")
        assert a.retrieved == (a.gate["decision"] == "retrieve") == bool(a.passages)
        if name == "adaptive":
            assert a.gate["stage"] in ("fast", "probe")


def test_router_policy_and_expert_usage_with_the_upcycled_model(index, smollm2):
    """The MoE model reports retrieval-expert affinity on the probe; the router policy decides on it and
    the answer carries per-layer expert usage; fusion through the retrieval expert gets passage memory."""
    import copy

    from expertrag.gate.policies import RouterPolicy
    from expertrag.model.generator import ExpertRAGGenerator
    from expertrag.model.upcycle import DEMO_MOE, upcycle
    from expertrag.pipeline.rag import has_retrieval_expert

    model, tokenizer = smollm2
    moe = upcycle(copy.deepcopy(model), DEMO_MOE)
    gen = ExpertRAGGenerator(moe, tokenizer)
    assert has_retrieval_expert(gen)
    rag = rag_with(index, gen, RouterPolicy(threshold=0.0), fusion="both")
    a = rag.answer("Who founded the Zorblatt Institute?")
    assert a.retrieved and a.gate["stage"] == "probe" and 0.0 < a.gate["score"] < 1.0
    assert a.experts["layers"] and a.experts["retrieval_expert_share"] is not None
    assert len(next(iter(a.experts["layers"].values()))) == DEMO_MOE.num_experts + 1
    never = rag_with(index, gen, RouterPolicy(threshold=1.0)).answer("Who founded the Zorblatt Institute?")
    assert not never.retrieved and never.gate["score"] == pytest.approx(a.gate["score"])


def test_answer_many_batches_and_matches_one_at_a_time(index, generator):
    from expertrag.pipeline.rag import AnswerRequest

    rag = rag_with(index, generator, "always", max_new_tokens=12)
    questions = ["Who founded the Zorblatt Institute?", "What is the capital of France?"]
    alone = [rag.answer(q) for q in questions]
    events: list[list[str]] = [[], []]
    batched = rag.answer_many([
        AnswerRequest(questions[0], on_event=lambda e: events[0].append(e.kind)),
        AnswerRequest("", on_event=lambda e: events[1].append(e.kind)),  # bad input: its error, not a crash
        AnswerRequest(questions[1], k=1),
    ])
    assert batched[0].token_ids == alone[0].token_ids and batched[0].citations == alone[0].citations
    assert isinstance(batched[1], InputError)
    assert len(batched[2].passages) == 1 and batched[2].text == rag_with(index, generator, "always", k=1,
                                                                         max_new_tokens=12).answer(questions[1]).text
    assert events[0][:2] == ["decision", "passages"] and events[0][-1] == "answer" and "token" in events[0]


def test_streamed_tokens_add_up_to_the_answer(index, generator):
    rag = rag_with(index, generator, "never", max_new_tokens=12)
    pieces: list[str] = []
    a = rag.answer("Which planet is known as the Red Planet?",
                   on_event=lambda e: pieces.append(e.data["text"]) if e.kind == "token" else None)
    assert "".join(pieces).strip() == a.generated


def test_a_cancelled_request_stops(index, generator):
    from expertrag.pipeline.rag import AnswerRequest, RequestCancelled

    rag = rag_with(index, generator, "never", max_new_tokens=24)
    seen: list[str] = []
    stop = {"now": False}

    def on_event(e):
        if e.kind == "token":
            seen.append(e.data["text"])
            stop["now"] = True  # the client leaves after its first token

    out = rag.answer_many([AnswerRequest("Which planet is known as the Red Planet?", on_event=on_event,
                                         cancelled=lambda: stop["now"])])
    assert isinstance(out[0], RequestCancelled) and len(seen) == 1
