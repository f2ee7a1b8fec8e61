"""`expertrag.eval.routing`: segments of a prompt, and the retrieval expert's routing on the real SmolLM2
upcycled to MoE (random router so the retrieval expert fires; the layer's own counts are the reference)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from expertrag.data.types import Document, Question
from expertrag.gate.labels import LabelRecord


@pytest.mark.slow
def test_token_segments_cover_passages_and_question(smollm2):
    from expertrag.eval.routing import token_segments
    from expertrag.model.generation import encode_prompt

    _, tok = smollm2
    msgs = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Passages:\n[1] Moon: The Moon orbits Earth.\n\nQuestion: What orbits Earth?"}]
    ids, segs = token_segments(tok, msgs, {"passages": "[1] Moon: The Moon orbits Earth.",
                                           "question": "What orbits Earth?"})
    assert ids == encode_prompt(tok, msgs)  # the same tokens the generator reads
    text = {s: tok.decode([i for i, g in zip(ids, segs, strict=True) if g == s]) for s in set(segs)}
    assert "The Moon orbits Earth" in text["passages"] and "What orbits Earth" in text["question"]
    assert "Answer briefly" in text["template"] and "Question:" in text["template"]


@pytest.mark.slow
def test_retrieval_routing_matches_the_layers(smollm2, tmp_path):
    from expertrag.eval.routing import retrieval_routing
    from expertrag.gate.policies import make_policy
    from expertrag.model.generator import ExpertRAGGenerator
    from expertrag.model.upcycle import DEMO_MOE, upcycle
    from expertrag.pipeline.config import PipelineConfig
    from expertrag.pipeline.rag import ExpertRAG
    from expertrag.retrieval import build_index
    from expertrag.retrieval.index import Index

    model, tok = smollm2
    cfg = DEMO_MOE.model_copy(update={"router_init_std": 0.5, "retrieval_out_init_std": 0.02, "layers": "1,15"})
    up = upcycle(copy.deepcopy(model), cfg).eval()
    build_index(tmp_path / "idx", [Document("moon", "Moon", "The Moon is Earth's only natural satellite."),
                                   Document("fr", "France", "Paris is the capital of France.")], progress=False)
    rag = ExpertRAG(Index(tmp_path / "idx"), ExpertRAGGenerator(up, tok), make_policy("always"),
                    PipelineConfig(k=2, fusion="both"), "always")
    qs = [Question("m", "What is Earth's only natural satellite?", ["Moon"]),
          Question("f", "What is the capital of France?", ["Paris"])]
    labels = {"m": LabelRecord("m", qs[0].question, "retrieve", False, True)}
    res = retrieval_routing(rag, qs, labels, progress=False)  # raises if our fired counts differ from the layer's
    assert res["n"] == 2 and set(res["open_book"]) == {"passages", "question", "template"}
    assert set(res["closed_book"]) == {"question", "template"}
    for seg in res["closed_book"].values():
        assert seg["fired"] == 0.0  # no passages: the slot is unavailable
    assert res["open_book"]["passages"]["fired"] > 0.0  # a random router picks it somewhere
    for mode in ("closed_book", "open_book"):
        for seg in res[mode].values():
            assert 0.0 < seg["affinity"] < 1.0 and set(seg["layers"]) == {"1", "15"}
    assert res["by_label"]["retrieve"]["n"] == 1
    q = res["questions"][0]
    assert np.isfinite(q["closed_question_affinity"]) and np.isfinite(q["open_question_affinity"])
    assert res["fusion"] == "both"

    # the open-book prompt follows pipeline.fusion, as the pipeline answers: memory only ...
    only_memory = ExpertRAG(rag.index, rag.generator, make_policy("always"), PipelineConfig(k=2, fusion="expert"),
                            "always")
    res = retrieval_routing(only_memory, qs, progress=False)
    assert res["fusion"] == "expert" and set(res["open_book"]) == {"question", "template"}  # no passage block
    assert max(seg["fired"] for seg in res["open_book"].values()) > 0.0  # the memory is there to route to
    # ... or passages in the prompt only: no memory, so the slot is unavailable everywhere
    prompt_only = ExpertRAG(rag.index, rag.generator, make_policy("always"), PipelineConfig(k=2, fusion="concat"),
                            "always")
    res = retrieval_routing(prompt_only, qs, progress=False)
    assert set(res["open_book"]) == {"passages", "question", "template"}
    assert all(seg["fired"] == 0.0 for seg in res["open_book"].values())
