"""The transformers backend on tiny random Llama, Mixtral, OLMoE and Qwen2-MoE models built here (no
download), through the whole pipeline: probe + draft continuation, streaming, answer_many batching, MoE
router statistics over the question's tokens, and policies refused by capability."""

from __future__ import annotations

import math

import pytest

from expertrag.data.types import Document
from expertrag.errors import ExpertRAGError, InputError
from expertrag.gate.policies import EntropyPolicy, FlarePolicy, RouterPolicy, make_policy
from expertrag.gate.requirements import BackendCapabilityError
from expertrag.model.config import ModelConfig
from expertrag.model.prompts import closed_book_messages
from expertrag.pipeline.build import PipelineSections, load_generator
from expertrag.pipeline.config import PipelineConfig
from expertrag.pipeline.rag import AnswerEvent, AnswerRequest, ExpertRAG
from expertrag.retrieval import Index, build_index

pytestmark = pytest.mark.slow

DOCS = [
    Document("paris", "Paris", "Paris is the capital and largest city of France, on the Seine."),
    Document("moon", "Moon", "The Moon is Earth's only natural satellite; it causes the tides."),
    Document("tea", "Tea", "Tea is an aromatic beverage prepared by pouring hot water over cured tea leaves."),
]
QUESTION = "What is the capital of France?"
# no stop strings: a random model's text may hold a newline anywhere, and the lengths below are exact
CFG = PipelineConfig(k=2, max_new_tokens=8, probe_tokens=3, answer_cache_size=0, retrieval_cache_size=0,
                     abstain_below=0.0, stop=[])
N_EXPERTS = 4


def _config(kind: str, vocab: int, eos: int, pad: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  eos_token_id=eos, pad_token_id=pad, bos_token_id=eos, tie_word_embeddings=True)
    if kind == "llama":
        return tf.LlamaConfig(**common)
    if kind == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=N_EXPERTS, num_experts_per_tok=2)
    if kind == "olmoe":
        return tf.OlmoeConfig(**common, num_experts=N_EXPERTS, num_experts_per_tok=2)
    if kind == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, num_experts=N_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=32, decoder_sparse_step=1)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    out = tmp_path_factory.mktemp("tfpipe") / "index"
    build_index(out, DOCS, progress=False)
    return Index(out)


def save_tiny(kind: str, tokenizer, out):
    """A tiny random model of this family saved with the SmolLM2 tokenizer (same vocabulary)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _config(kind, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id or 0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["llama", "mixtral", "olmoe", "qwen2_moe"])
def model_dir(request, tokenizer, tmp_path_factory):
    return request.param, save_tiny(request.param, tokenizer, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def generator(model_dir):
    kind, path = model_dir
    sections = PipelineSections(model=ModelConfig(backend="transformers", path=str(path)))
    return kind, load_generator(sections)


def rag_with(index, generator, policy) -> ExpertRAG:
    return ExpertRAG(index, generator, policy, CFG, getattr(policy, "name", "custom"))


def test_capabilities_and_router_stats_over_the_question(index, generator):
    kind, gen = generator
    caps = gen.capabilities
    assert caps.backend == "transformers" and caps.hidden_states and caps.batched and caps.entropy == "full"
    assert caps.router_stats == (kind != "llama") and not caps.passage_memory
    probe = rag_with(index, gen, make_policy("never")).probe(QUESTION)
    assert probe.hidden is not None and probe.hidden.shape == (32,)
    assert len(probe.token_ids) == 3 and len(probe.entropies) == 3
    g = probe.draft
    if kind == "llama":
        assert g.router_stats is None and probe.router_entropy is None and probe.router_agreement is None
        return
    stats = g.router_stats
    q_tokens = len(gen.tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    assert stats.span == "question" and abs(stats.tokens - q_tokens) <= 1 and stats.tokens < g.prompt_tokens
    assert sorted(stats.layers) == [0, 1, 2]  # every layer is an MoE layer in these configs
    for layer in stats.layers.values():
        assert 0.0 < layer.entropy <= math.log(N_EXPERTS) + 1e-6
        assert len(layer.expert_share) == N_EXPERTS and sum(layer.expert_share) == pytest.approx(1.0, abs=1e-3)
    assert 0.0 <= probe.router_agreement <= 1.0 and probe.router_entropy == pytest.approx(stats.mean_entropy)
    # the whole prompt (chat template + system prompt) gives other statistics than the question alone
    whole = gen.generate(closed_book_messages(QUESTION), max_new_tokens=1, return_router=True)
    assert whole.router_stats.span == "prompt" and whole.router_stats.tokens == whole.prompt_tokens
    assert whole.router_stats.mean_entropy != pytest.approx(stats.mean_entropy, abs=1e-6)


def test_no_retrieval_answer_continues_the_probe_and_streams(index, generator):
    _, gen = generator
    rag = rag_with(index, gen, FlarePolicy(theta=0.0))  # p < 0 never: always continues the draft
    events: list[AnswerEvent] = []
    a = rag.answer(QUESTION, on_event=events.append)
    assert not a.retrieved and a.gate["stage"] == "probe" and len(a.token_ids) == CFG.max_new_tokens
    fresh = gen.generate(closed_book_messages(QUESTION), max_new_tokens=CFG.max_new_tokens)
    assert a.token_ids == fresh.token_ids  # the KV-cache continuation equals one uninterrupted greedy run
    kinds = [e.kind for e in events]
    assert kinds[0] == "decision" and kinds[-1] == "answer" and "token" in kinds
    streamed = "".join(e.data["text"] for e in events if e.kind == "token")
    assert streamed.strip().startswith(a.generated[:5]) or not a.generated
    assert a.tokens["prompt"] == fresh.prompt_tokens


def test_answer_many_batches_like_single_answers(index, generator):
    kind, gen = generator
    rag = rag_with(index, gen, make_policy("always"))
    questions = [QUESTION, "What causes the tides on Earth?", "How is tea made?"]
    many = rag.answer_many([AnswerRequest(q) for q in questions])
    for q, a in zip(questions, many, strict=True):
        one = rag.answer(q)
        assert a.retrieved and a.passages and a.token_ids == one.token_ids, (kind, q)
        if kind != "llama":
            assert a.experts["layers"] and a.experts["retrieval_expert_share"] is None


def test_policies_the_backend_cannot_serve_are_refused_at_start_up(index, generator):
    kind, gen = generator
    with pytest.raises(BackendCapabilityError, match=r"policy 'router' needs a retrieval expert.*'transformers'"):
        rag_with(index, gen, RouterPolicy(threshold=0.5))
    rag = rag_with(index, gen, EntropyPolicy(threshold=100.0))  # full entropies: served
    assert rag.answer(QUESTION).gate["stage"] == "probe"
    # a per-request policy the backend cannot serve is that request's error, the others are answered
    out = rag.answer_many([AnswerRequest(QUESTION, policy=RouterPolicy(0.5)), AnswerRequest(QUESTION)])
    assert isinstance(out[0], InputError) and not isinstance(out[1], Exception)


def test_bad_model_path_is_one_clear_error(tmp_path):
    with pytest.raises(ExpertRAGError, match="not a transformers model folder"):
        load_generator(PipelineSections(model=ModelConfig(backend="transformers", path=str(tmp_path))))


def test_cli_ask_and_label_with_backend_override(tokenizer, tmp_path):
    """`--backend transformers` overrides model.backend of the YAML config (which names the folder)."""
    import json

    from typer.testing import CliRunner

    from expertrag.cli.app import app  # importing the app registers every command

    path = save_tiny("mixtral", tokenizer, tmp_path / "mixtral")
    build_index(tmp_path / "idx", DOCS, progress=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  backend: native\n  path: {path}\npipeline:\n  max_new_tokens: 4\n  stop: []\n")
    r = CliRunner().invoke(app, ["ask", QUESTION, "-i", str(tmp_path / "idx"), "--policy", "always", "--config",
                                 str(cfg), "--backend", "transformers", "--json"])
    assert r.exit_code == 0, r.output
    a = json.loads(r.output[r.output.index('{"question"'):])  # after the weight loader's progress bars
    assert a["retrieved"] and a["tokens"]["generated"] == 4 and a["experts"]["layers"]
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "1", "question": QUESTION, "golden_answers": ["Paris"]}) + "\n")
    r = CliRunner().invoke(app, ["label", "-d", str(questions), "-i", str(tmp_path / "idx"), "-o",
                                 str(tmp_path / "labels.jsonl"), "--config", str(cfg), "--backend", "transformers"])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "labels.jsonl").read_text())
    assert rec["id"] == "1"
    trace = rec["closed_trace"]  # the closed-book answer's tokens, for probe features without a rerun
    assert len(trace["token_ids"]) == len(trace["logprobs"]) == len(trace["entropies"]) == 4
    prov = json.loads((tmp_path / "labels.provenance.json").read_text())
    assert prov["settings"]["model"]["config"]["backend"] == "transformers"
    assert prov["settings"]["max_new_tokens"] == 4 and prov["settings"]["k"] == 3
    # resuming with other settings is refused, naming what differs; the labels already there are kept
    cfg.write_text(cfg.read_text().replace("max_new_tokens: 4", "max_new_tokens: 5"))
    r = CliRunner().invoke(app, ["label", "-d", str(questions), "-i", str(tmp_path / "idx"), "-o",
                                 str(tmp_path / "labels.jsonl"), "--config", str(cfg), "--backend", "transformers"])
    assert isinstance(r.exception, InputError) and "max_new_tokens differ" in str(r.exception)
    assert json.loads((tmp_path / "labels.jsonl").read_text()) == rec
    bad = CliRunner().invoke(app, ["ask", QUESTION, "-i", str(tmp_path / "idx"), "--backend", "llama"])
    assert isinstance(bad.exception, InputError) and "unknown backend 'llama'" in str(bad.exception)


def test_eval_runs_on_the_backend_and_skips_policies_it_cannot_serve(tokenizer, tmp_path):
    """`eval` with a transformers MoE folder: `always` is evaluated, `router` (no retrieval expert) is reported
    as skipped with the backend named, not crashed on."""
    from expertrag.cli import eval_common as ec
    from expertrag.config import ExpertRAGConfig
    from expertrag.data.types import Question
    from expertrag.eval.runner import evaluate

    path = save_tiny("olmoe", tokenizer, tmp_path / "olmoe")
    build_index(tmp_path / "idx", DOCS, progress=False)
    config = ec.with_backend(ExpertRAGConfig.model_validate(
        {"model": {"path": str(path)}, "pipeline": {"max_new_tokens": 3, "stop": []},
         "gate": {"router_threshold": 0.5}}), "transformers")
    assert config.model.backend == "transformers"
    factory = ec.make_factory(tmp_path / "idx", config, None)
    questions = [Question("1", QUESTION, ["Paris"]), Question("2", "How is tea made?", ["hot water"])]
    result = evaluate(factory, questions, ["always", "router"], progress=False, k_sweep=())
    assert "router" in result["skipped"] and "'transformers'" in result["skipped"]["router"]
    assert list(result["results"]) == ["always"] and "always" in str(result["summary"]["policies"])
