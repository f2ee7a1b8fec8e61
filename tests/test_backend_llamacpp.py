"""The llamacpp backend on the packaged SmolLM2 GGUF, read directly: the same prompt tokens and (where the
quantisation allows) the same greedy tokens as our decoder, full-distribution log-probs and entropies,
continuation of the probe's draft, streaming, stop strings, the pipeline end to end, the CLI override, and
policies it cannot serve refused at start-up. Skipped, saying why, where llama-cpp-python is not installed
(`make llamacpp` builds it)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from expertrag.data.types import Document
from expertrag.errors import ExpertRAGError
from expertrag.model import llamacpp_backend
from expertrag.model.config import ModelConfig
from expertrag.model.loading import gguf_path
from expertrag.model.prompts import closed_book_messages
from expertrag.pipeline.build import PipelineSections, load_generator
from expertrag.pipeline.config import PipelineConfig
from expertrag.pipeline.rag import AnswerEvent, AnswerRequest, ExpertRAG

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not llamacpp_backend.available(),
                       reason="llama-cpp-python is not installed (optional: `make llamacpp` compiles it, ~20 min)"),
]

Q = "What is the capital of France?"
DOCS = [
    Document("paris", "Paris", "Paris is the capital and largest city of France, on the Seine."),
    Document("moon", "Moon", "The Moon is Earth's only natural satellite; it causes the tides."),
]


@pytest.fixture(scope="module")
def gen():
    return load_generator(PipelineSections(model=ModelConfig(backend="llamacpp", threads=1)))


@pytest.fixture(scope="module")
def native(smollm2):
    from expertrag.model.generator import ExpertRAGGenerator

    model, tok = smollm2
    return ExpertRAGGenerator(model, tok)


def test_prompt_tokens_match_the_native_tokenizer(gen, native):
    msgs = closed_book_messages(Q)
    assert gen.encode(msgs) == native.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                                     return_dict=False)
    assert gen.encode("Paris is") == native.tokenizer("Paris is")["input_ids"]


def test_greedy_answer_logprobs_and_entropies_against_our_decoder(gen, native):
    ours = native.generate(closed_book_messages(Q), max_new_tokens=6, stop=[])
    g = gen.generate(closed_book_messages(Q), max_new_tokens=6, stop=[])
    assert g.finish_reason == "length" and len(g.token_ids) == len(g.logprobs) == len(g.entropies) == 6
    assert g.prompt_tokens == ours.prompt_tokens
    # same weights (the GGUF our decoder was dequantised from), llama.cpp's kernels: the first greedy token
    # agrees and its probability is close; later tokens may diverge by rounding
    assert g.token_ids[0] == ours.token_ids[0]
    assert abs(g.logprobs[0] - ours.logprobs[0]) < 0.1
    assert all(lp <= 0 for lp in g.logprobs)
    assert all(0 <= e <= math.log(gen.n_vocab) for e in g.entropies)
    caps = gen.capabilities
    assert caps.backend == "llamacpp" and caps.entropy == "full"
    assert not caps.hidden_states and not caps.router_stats and not caps.batched and caps.continuation


def test_continuation_equals_one_call_and_survives_another_prompt(gen):
    full = gen.generate(closed_book_messages(Q), max_new_tokens=7, stop=[])
    draft = gen.generate(closed_book_messages(Q), max_new_tokens=4, stop=[])
    gen.generate("Something else entirely", max_new_tokens=2, stop=[])  # the context now holds other tokens
    rest = gen.generate(state=draft.state, max_new_tokens=3, stop=[])
    assert draft.token_ids + rest.token_ids == full.token_ids
    assert rest.prompt_tokens == 1  # the draft's KV cells were put back, not recomputed
    draft.state.kv = None  # without them, the prompt is recomputed to the same tokens
    gen.generate("Something else entirely", max_new_tokens=2, stop=[])
    slow = gen.generate(state=draft.state, max_new_tokens=3, stop=[])
    assert slow.token_ids == rest.token_ids and slow.prompt_tokens == len(draft.state.tokens)
    # continuing right away reuses the cache: only the pending token is evaluated
    again = gen.generate(closed_book_messages(Q), max_new_tokens=3, stop=[])
    more = gen.generate(state=again.state, max_new_tokens=2, stop=[])
    assert more.prompt_tokens == 1


def test_streaming_pieces_make_the_text_and_stop_strings_cut(gen):
    pieces: list[str] = []
    g = gen.generate(closed_book_messages(Q), max_new_tokens=12, stop=[], on_token=lambda ev: pieces.append(ev.text))
    assert "".join(pieces) == g.text and len(pieces) == len(g.token_ids)
    word = g.text.split()[1] if len(g.text.split()) > 1 else g.text[-2:]
    cut = gen.generate(closed_book_messages(Q), max_new_tokens=12, stop=[word])
    assert cut.finish_reason == "stop" and word not in cut.text and g.text.startswith(cut.text)


def test_seeded_sampling_is_reproducible(gen):
    a = gen.generate(closed_book_messages(Q), max_new_tokens=6, stop=[], temperature=1.0, seed=3)
    b = gen.generate(closed_book_messages(Q), max_new_tokens=6, stop=[], temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids


def test_pipeline_end_to_end_and_policies_refused(gen, tmp_path):
    from expertrag.gate.policies import FlarePolicy, RouterPolicy, make_policy
    from expertrag.gate.requirements import BackendCapabilityError
    from expertrag.retrieval import Index, build_index

    build_index(tmp_path / "idx", DOCS, progress=False)
    index = Index(tmp_path / "idx")
    cfg = PipelineConfig(k=1, max_new_tokens=6, probe_tokens=3, answer_cache_size=0, retrieval_cache_size=0,
                         abstain_below=0.0, stop=[])
    events: list[AnswerEvent] = []
    rag = ExpertRAG(index, gen, make_policy("always"), cfg, "always")
    a = rag.answer_many([AnswerRequest(Q, on_event=events.append)])[0]
    assert a.retrieved and a.passages and a.passages[0]["id"] == "paris"
    assert "".join(e.data["text"] for e in events if e.kind == "token") == a.generated
    # no retrieval: the probe's draft is continued from llama.cpp's cache and equals one uninterrupted run
    rag = ExpertRAG(index, gen, FlarePolicy(theta=0.0), cfg, "flare")
    b = rag.answer(Q)
    fresh = gen.generate(closed_book_messages(Q), max_new_tokens=cfg.max_new_tokens, stop=[])
    assert not b.retrieved and b.gate["stage"] == "probe" and b.token_ids == fresh.token_ids
    with pytest.raises(BackendCapabilityError, match=r"policy 'router'.*'llamacpp'"):
        ExpertRAG(index, gen, RouterPolicy(threshold=0.5), cfg, "router")


def test_re_encoded_gguf_is_cached_and_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTRAG_CACHE", str(tmp_path / "cache"))
    g = load_generator(PipelineSections(model=ModelConfig(backend="llamacpp", gguf_type="q8_0", threads=1)))
    assert g.path.is_file() and "q8_0" in g.path.name and "as q8_0" in g.capabilities.model
    out = g.generate(closed_book_messages(Q), max_new_tokens=4, stop=[])
    assert len(out.token_ids) == 4
    assert llamacpp_backend.converted_gguf(gguf_path(), "q8_0") == g.path  # cached


def test_bad_gguf_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ExpertRAGError, match="broken.gguf"):
        load_generator(PipelineSections(model=ModelConfig(backend="llamacpp", path=str(bad))))
    with pytest.raises(ExpertRAGError, match="no such GGUF"):
        load_generator(PipelineSections(model=ModelConfig(backend="llamacpp", path=str(tmp_path / "none.gguf"))))


def test_cli_ask_with_the_backend_override(tmp_path):
    from expertrag.retrieval import build_index

    build_index(tmp_path / "idx", DOCS, progress=False)
    r = subprocess.run([sys.executable, "-m", "expertrag", "ask", "--index", str(tmp_path / "idx"), "--backend",
                        "llamacpp", "--policy", "always", "--json", Q], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["retrieved"] and out["text"]


def test_long_prompts_go_to_the_long_prompt_engine(tmp_path):
    """model.long_prompt_backend: a 5-passage prompt runs on our decoder, a closed-book one on llama.cpp; each
    continuation returns to the engine that made it; capabilities are what both give."""
    from expertrag.gate.policies import FlarePolicy, make_policy
    from expertrag.retrieval import Index, build_index

    g = load_generator(PipelineSections(model=ModelConfig(backend="llamacpp", threads=1, long_prompt_backend="native",
                                                          long_prompt_tokens=60)))
    caps = g.capabilities
    assert caps.backend == "llamacpp+native" and caps.entropy == "full" and not caps.hidden_states
    assert not caps.batched and caps.continuation
    short = g.generate(closed_book_messages(Q), max_new_tokens=3, stop=[])
    assert g.routed == {"short": 1, "long": 0}
    long_prompt = closed_book_messages(" ".join(["Paris is the capital of France."] * 10) + " " + Q)
    g.generate(long_prompt, max_new_tokens=3, stop=[])
    assert g.routed == {"short": 1, "long": 1}
    g.generate(state=short.state, max_new_tokens=2, stop=[])
    assert g.routed == {"short": 2, "long": 1}
    build_index(tmp_path / "idx", DOCS, progress=False)
    cfg = PipelineConfig(k=2, max_new_tokens=4, probe_tokens=2, answer_cache_size=0, retrieval_cache_size=0,
                         abstain_below=0.0, stop=[])
    index = Index(tmp_path / "idx")
    a = ExpertRAG(index, g, make_policy("always"), cfg, "always").answer(Q)
    b = ExpertRAG(index, g, FlarePolicy(theta=0.0), cfg, "flare").answer(Q)
    assert a.retrieved and not b.retrieved and len(b.token_ids) == 4
    with pytest.raises(ExpertRAGError, match="long_prompt_backend needs model.backend: llamacpp"):
        load_generator(PipelineSections(model=ModelConfig(backend="native", long_prompt_backend="native")))
