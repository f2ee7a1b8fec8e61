"""Issue 13, answering as an expert: each routed expert's own retrieval gate, its LoRA adapter applied at
answer time (kept in an AdapterBank, base model bit-exact in between), and sensitive experts screened by
the policy expert whatever the rules found.

A two-domain fixture (astronomy, cooking; plus passages without a domain) indexed with the real MiniLM
embedder, answered by the real SmolLM2 (native backend; the transformers backend where one that cannot
take adapters is needed). Questions are routed by a metadata hint, so no router is trained.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch

from expertrag.data.types import Document
from expertrag.errors import InputError
from expertrag.experts.adapter import (
    AdapterBank,
    AdapterError,
    attach,
    lora_config,
    save_adapter,
)
from expertrag.experts.audit import AuditLog
from expertrag.experts.live import LiveExperts
from expertrag.experts.policy_config import PolicyConfig
from expertrag.experts.registry import ExpertRecord, ExpertRegistry
from expertrag.experts.router import RoutingSettings
from expertrag.gate.policies import make_policy
from expertrag.model.prompts import closed_book_messages
from expertrag.pipeline.config import PipelineConfig
from expertrag.pipeline.rag import ExpertRAG
from expertrag.retrieval import Index, build_index
from reliability_helpers import assert_one_line_error, cli

DOCS = [
    ("a1", "Mars", "Mars is the fourth planet from the Sun; its red colour comes from iron oxide dust.", "astronomy"),
    ("a2", "Jupiter", "Jupiter is the largest planet of the solar system, a gas giant.", "astronomy"),
    ("a3", "Comet", "Comets are icy bodies that grow a glowing tail when their orbit nears the Sun.", "astronomy"),
    ("c1", "Risotto", "Risotto is cooked by stirring arborio rice with hot broth until creamy.", "cooking"),
    ("c2", "Bread", "Bread dough rises because yeast ferments sugars and releases carbon dioxide.", "cooking"),
    ("c3", "Caramel", "Caramel forms when sugar is heated until it melts and turns amber brown.", "cooking"),
    ("g1", "Piano", "The piano is a keyboard instrument whose hammers strike strings.", None),
]
CFG = PipelineConfig(k=2, max_new_tokens=8, answer_cache_size=0, retrieval_cache_size=0, abstain_below=0.0)
ASTRO = {"domain": "astronomy"}
COOK = {"domain": "cooking"}


@pytest.fixture(scope="module")
def base_index(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("answering") / "index"
    build_index(out, [Document(i, t, c, {"domain": d} if d else {}) for i, t, c, d in DOCS], progress=False)
    return out


@pytest.fixture
def index_dir(base_index, tmp_path) -> Path:
    dst = tmp_path / "index"  # a fresh copy per test: the registry, adapters and audit log live in it
    shutil.copytree(base_index, dst)
    return dst


@pytest.fixture(scope="module")
def model(smollm2):
    """A private copy of the session's SmolLM2: the adapter bank injects LoRA layers into its model."""
    return copy.deepcopy(smollm2[0]), smollm2[1]


def _native(model):
    from expertrag.model.generator import ExpertRAGGenerator

    return ExpertRAGGenerator(*model)


def _rag(index_dir: Path, gen, policy="always", **kw) -> ExpertRAG:
    return ExpertRAG(Index(index_dir), gen, make_policy(policy), CFG, policy, experts=LiveExperts(index_dir), **kw)


def _register(index_dir: Path, **extra) -> ExpertRegistry:
    reg = ExpertRegistry(index_dir)
    reg.add([ExpertRecord(name=d, domain=d, **extra.get(d, {})) for d in ("astronomy", "cooking")])
    return reg


def _random_adapter(base_model, folder: Path, seed: int, targets=("q_proj", "v_proj")) -> torch.nn.Module:
    """(`base_model`: one without LoRA layers, e.g. the session's SmolLM2, never the bank's copy.) A LoRA adapter whose B matrices are random (a fresh one is exactly the base model), saved to
    `folder`; returns the model carrying it (the reference for what the adapter computes)."""
    work = copy.deepcopy(base_model)
    attach(work, lora_config(rank=4, targets=targets), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in work.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(work, folder)
    return work


# ---- each expert's own gate ------------------------------------------------------------------------------

@pytest.mark.slow
def test_each_routed_expert_decides_retrieval_with_its_own_gate(index_dir, model):
    _register(index_dir, astronomy={"gate": "never"})
    rag = _rag(index_dir, _native(model), policy="always")
    astro = rag.answer("Why is Mars red?", metadata=ASTRO)
    assert not astro.retrieved and astro.passages == []
    c = astro.routing["contributions"][0]
    assert (c["expert"], c["gate"], c["decision"], c["policy"]) == ("astronomy", "never", "no_retrieve", "never")
    # no gate of its own: the pipeline's policy decides, as before experts had gates
    cook = rag.answer("How is caramel made?", metadata=COOK)
    assert cook.retrieved and {p["metadata"]["domain"] for p in cook.passages} == {"cooking"}
    c = cook.routing["contributions"][0]
    assert (c["gate"], c["decision"], c["stage"]) == ("always", "retrieve", "fixed")
    assert c["adapter"] is None and c["adapter_applied"] is False and cook.routing["adapter_applied"] is False


@pytest.mark.slow
def test_two_experts_one_skips_one_retrieves(index_dir, model):
    _register(index_dir, astronomy={"gate": "never"})
    rag = _rag(index_dir, _native(model), policy="always")
    rag.routing_settings = RoutingSettings(multi_min_weight=0.2)  # no router: the hits' domains decide
    events = []
    a = rag.answer("Mars planet and caramel sugar", on_event=events.append)
    by = {c["expert"]: c for c in a.routing["contributions"]}
    assert set(by) == {"astronomy", "cooking"}, a.routing
    assert by["astronomy"]["decision"] == "no_retrieve" and by["astronomy"]["passage_ids"] == []
    assert by["cooking"]["decision"] == "retrieve" and by["cooking"]["passage_ids"]
    assert a.retrieved and {p["metadata"]["domain"] for p in a.passages} == {"cooking"}
    assert all(c.expert == "cooking" for c in a.citations)
    decision = next(e for e in events if e.kind == "decision").data["gate"]
    assert {e["expert"]: e["decision"] for e in decision["experts"]} == {"astronomy": "no_retrieve",
                                                                        "cooking": "retrieve"}


@pytest.mark.slow
def test_a_trained_gate_folder_as_an_experts_gate(index_dir, model):
    from importlib.resources import files

    shutil.copytree(Path(str(files("expertrag") / "assets" / "demo_gate")), index_dir / "gates" / "astro")
    code, out, err = cli("expert", "add", "--index", str(index_dir), "--domain", "astronomy",
                         "--gate", "gates/astro", "--json")
    assert code == 0, err
    assert json.loads(out)["added"][0]["gate"] == "gates/astro"
    code, out, _ = cli("expert", "show", "astronomy", "--index", str(index_dir), "--json")
    assert json.loads(out)["gate"] == "gates/astro"
    a = _rag(index_dir, _native(model), policy="never").answer("Why is Mars red?", metadata=ASTRO)
    c = a.routing["contributions"][0]
    assert c["gate"] == "gates/astro" and c["policy"] == "adaptive" and c["stage"] in ("fast", "probe")
    assert a.retrieved == (c["decision"] == "retrieve")


def test_bad_gates_are_one_line_errors_naming_the_field(index_dir, tmp_path):
    assert_one_line_error(*cli("expert", "add", "--index", str(index_dir), "--domain", "astronomy",
                               "--gate", "alwayz")[::2], "--gate", "alwayz", "neither a gate policy")
    assert_one_line_error(*cli("expert", "add", "--index", str(index_dir), "--domain", "astronomy",
                               "--gate", "adaptiv:gates")[::2], "--gate", "unknown gate policy")
    (index_dir / "empty_gate").mkdir()  # a folder without trained artifacts
    assert_one_line_error(*cli("expert", "add", "--index", str(index_dir), "--domain", "astronomy",
                               "--gate", "empty_gate")[::2], "--gate", "fast.json")
    assert_one_line_error(*cli("expert", "add", "--index", str(index_dir), "--domain", "astronomy",
                               "--gate", "../elsewhere")[::2], "--gate", "relative")
    assert not (index_dir / "experts.json").exists()  # nothing was written


@pytest.mark.slow
def test_a_bad_gate_in_the_registry_fails_at_start_up_and_per_question(index_dir, model):
    from expertrag.pipeline.build import PipelineSections, load_pipeline

    reg = _register(index_dir, cooking={"gate": "alwayz"})  # the record's form is fine, the name is not
    with pytest.raises(InputError) as e:
        load_pipeline(index_dir, PipelineSections(), "always", generator=_native(model))
    assert "experts.json" in str(e.value) and "experts[1].gate" in str(e.value) and "alwayz" in str(e.value)
    reg.add([ExpertRecord(name="cooking", domain="cooking")], replace=True)
    rag = load_pipeline(index_dir, PipelineSections(), "always", generator=_native(model))
    reg.add([ExpertRecord(name="cooking", domain="cooking", gate="nevr")], replace=True)  # added while running
    with pytest.raises(InputError, match=r"experts\[1\]\.gate"):
        rag.answer("How is caramel made?", metadata=COOK)


# ---- adapters at answer time -----------------------------------------------------------------------------

@pytest.mark.slow
def test_the_routed_experts_adapter_is_applied_and_the_base_model_is_left_alone(index_dir, model, smollm2):
    from expertrag.model.generator import ExpertRAGGenerator

    ref = _random_adapter(smollm2[0], index_dir / "adapters" / "astronomy", seed=3)
    reg = ExpertRegistry(index_dir)
    reg.add([ExpertRecord(name="astronomy", domain="astronomy", adapter="adapters/astronomy"),
             ExpertRecord(name="astro-plain", domain="astronomy"), ExpertRecord(name="cooking", domain="cooking")])
    gen = _native(model)
    rag = _rag(index_dir, gen, policy="always")
    q = "Why is Mars red?"
    base = rag.answer(q, metadata={"expert": "astro-plain"})  # the same domain, prompt and passages
    adapted = rag.answer(q, metadata={"expert": "astronomy"})
    assert base.passages == adapted.passages
    c = adapted.routing["contributions"][0]
    assert c["adapter"] == "adapters/astronomy" and c["adapter_applied"] and adapted.routing["adapter_applied"]
    assert base.routing["contributions"][0]["adapter_applied"] is False
    assert adapted.logprobs != base.logprobs
    # what the adapter computes: the same prompt on the model the adapter was saved from
    n = min(len(adapted.token_ids), len(base.token_ids))
    mine = ExpertRAGGenerator(ref, model[1]).generate(
        _open_book(q, adapted.passages), max_new_tokens=CFG.max_new_tokens, stop=CFG.stop)
    assert mine.token_ids == adapted.token_ids
    assert mine.logprobs == pytest.approx(adapted.logprobs, abs=1e-4)
    again = rag.answer(q, metadata={"expert": "astronomy"})
    assert again.token_ids == adapted.token_ids and rag.adapters.loads == 1  # loaded once, kept
    after = rag.answer(q, metadata={"expert": "astro-plain"})
    assert after.token_ids == base.token_ids and after.logprobs == base.logprobs and n > 0  # base unchanged


def _open_book(question, passages):
    from expertrag.model.prompts import open_book_messages
    from expertrag.retrieval.types import Hit

    return open_book_messages(question, [Hit(**p) for p in passages], CFG.passage_max_chars)


@pytest.mark.slow
def test_a_retrained_adapter_is_reloaded_and_a_broken_one_names_the_record(index_dir, model, smollm2):
    _random_adapter(smollm2[0], index_dir / "adapters" / "astronomy", seed=3)
    ExpertRegistry(index_dir).add([ExpertRecord(name="astronomy", domain="astronomy", adapter="adapters/astronomy"),
                                   ExpertRecord(name="cooking", domain="cooking", adapter="adapters/missing")])
    rag = _rag(index_dir, _native(model), policy="never")
    first = rag.answer("Why is Mars red?", metadata=ASTRO)
    _random_adapter(smollm2[0], index_dir / "adapters" / "astronomy", seed=4)  # retrained: the folder replaced
    second = rag.answer("Why is Mars red?", metadata=ASTRO)
    assert rag.adapters.loads == 2 and second.logprobs != first.logprobs
    with pytest.raises(InputError, match=r"experts\[1\]\.adapter") as e:
        rag.answer("How is caramel made?", metadata=COOK)
    assert "adapters/missing" in str(e.value)


@pytest.mark.slow
def test_a_backend_that_cannot_take_adapters_says_so_once_and_answers_without(index_dir, hf_smollm2, caplog):
    from expertrag.model.hf_backend import TransformersGenerator
    from expertrag.model.loading import load_tokenizer

    _random_adapter_folder_only(index_dir / "adapters" / "astronomy")
    _register(index_dir, astronomy={"adapter": "adapters/astronomy"})
    with caplog.at_level(logging.WARNING, logger="expertrag.pipeline.rag"):
        rag = _rag(index_dir, TransformersGenerator(hf_smollm2, load_tokenizer()), policy="never")
        assert rag.adapters is None
        a = rag.answer("Why is Mars red?", metadata=ASTRO)
        rag.answer("Why is Mars red?", metadata=ASTRO)
    warned = [r for r in caplog.records if "cannot apply LoRA adapters" in r.getMessage()]
    assert len(warned) == 1 and "transformers" in warned[0].getMessage() and "astronomy" in warned[0].getMessage()
    c = a.routing["contributions"][0]
    assert c["adapter_applied"] is False and "transformers backend cannot apply" in c["adapter_note"]
    assert a.text


@pytest.mark.slow
def test_model_adapter_answers_every_question_with_it_and_says_why_experts_adapters_wait(index_dir, smollm2,
                                                                                        tmp_path, caplog):
    """`model.adapter` (a knowledge expert on the base): every answer is the adapted model's; a domain
    expert's own adapter is then not applied, with the reason in its contribution."""
    from expertrag.model.config import ModelConfig
    from expertrag.model.generator import ExpertRAGGenerator
    from expertrag.pipeline.build import PipelineSections, load_generator

    ref = _random_adapter(smollm2[0], tmp_path / "knowledge", seed=5)
    _random_adapter_folder_only(index_dir / "adapters" / "astronomy")
    _register(index_dir, astronomy={"adapter": "adapters/astronomy"})
    settings = PipelineSections(model=ModelConfig(backend="native", adapter=str(tmp_path / "knowledge")))
    gen = load_generator(settings)
    assert gen.capabilities.adapters is False and "knowledge" in gen.capabilities.model
    with caplog.at_level(logging.WARNING, logger="expertrag.pipeline.rag"):
        rag = _rag(index_dir, gen, policy="never")
        a = rag.answer("Why is Mars red?", metadata=ASTRO)
    mine = ExpertRAGGenerator(ref, smollm2[1]).generate(
        closed_book_messages("Why is Mars red?"), max_new_tokens=CFG.max_new_tokens, stop=CFG.stop)
    assert a.token_ids == mine.token_ids and a.logprobs == pytest.approx(mine.logprobs, abs=1e-4)
    plain = ExpertRAGGenerator(*smollm2).generate(
        closed_book_messages("Why is Mars red?"), max_new_tokens=CFG.max_new_tokens, stop=CFG.stop)
    assert plain.logprobs != pytest.approx(mine.logprobs, abs=1e-4)  # the adapter changes the answer
    c = a.routing["contributions"][0]
    assert c["adapter_applied"] is False and "already carries model.adapter" in c["adapter_note"]
    assert any("already carries model.adapter" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("update", [{"backend": "transformers"}, {"checkpoint": "runs/some-moe"}])
def test_model_adapter_needs_the_native_dense_model(update, tmp_path):
    from expertrag.model.config import ModelConfig
    from expertrag.pipeline.build import PipelineSections, load_generator

    cfg = ModelConfig(backend="native", adapter=str(tmp_path)).model_copy(update=update)
    with pytest.raises(InputError, match="model.adapter needs model.backend: native") as e:
        load_generator(PipelineSections(model=cfg))
    assert e.value.field == "model.adapter"


def test_a_missing_model_adapter_folder_is_one_error_naming_it(tmp_path):
    from expertrag.model.config import ModelConfig
    from expertrag.pipeline.build import PipelineSections, load_generator

    with pytest.raises(AdapterError, match="nowhere"):
        load_generator(PipelineSections(model=ModelConfig(backend="native", adapter=str(tmp_path / "nowhere"))))


def _random_adapter_folder_only(folder: Path) -> None:
    # the transformers backend never reads it: any well-formed adapter folder will do
    from conftest import TINY_LLAMA
    from expertrag.model.llama import LlamaArgs, LlamaLM

    _random_adapter(LlamaLM(LlamaArgs.from_hf(copy.deepcopy(TINY_LLAMA))), folder, seed=1)


def test_adapter_bank_switches_kept_adapters_exactly_and_under_one_lock(tiny_llama, tmp_path):
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        base = tiny_llama(ids).logits.clone()
    refs = {}
    for seed, targets in ((1, ("q_proj", "v_proj")), (2, ("gate_proj", "up_proj", "down_proj", "o_proj"))):
        work = _random_adapter(tiny_llama, tmp_path / f"a{seed}", seed, targets)
        with torch.no_grad():
            refs[seed] = work(ids).logits.clone()
    bank = AdapterBank(tiny_llama)
    keys = {s: bank.load(tmp_path / f"a{s}") for s in refs}
    assert bank.load(tmp_path / "a1") == keys[1] and bank.loads == 2  # kept, not read again
    results: dict[tuple, bool] = {}

    def worker(seed):  # two threads switching adapters on one model: each sees only its own
        for i in range(20):
            with bank.use(keys[seed] if seed else None), torch.no_grad():
                out = tiny_llama(ids).logits
            results[(seed, i)] = torch.equal(out, refs[seed] if seed else base)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 2, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 60 and all(results.values())
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, base)  # outside a block: the base model, bit-exact
    with pytest.raises(AdapterError, match="missing"):
        bank.load(tmp_path / "nowhere")


# ---- sensitive experts -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_sensitive_experts_answers_go_through_the_policy_expert(index_dir, model):
    _register(index_dir, cooking={"sensitive": True})
    rag = _rag(index_dir, _native(model), policy="never")  # the policy expert overrides the gate
    events = []
    a = rag.answer("How is caramel made?", metadata=COOK, on_event=events.append)
    assert a.needs_review and a.policy["action"] == "cite_only"
    assert a.policy["rules"] == ["sensitive-expert:cooking"] and a.policy["matches"][0]["kind"] == "expert"
    assert a.retrieved and a.gate["stage"] == "policy" and (a.citations or a.abstained)
    assert [e.kind for e in events] == ["decision", "passages", "token", "answer"]  # held until cited
    entry = AuditLog(index_dir / "audit.jsonl").read()[-1]
    assert entry["event"] == "sensitive_expert" and entry["experts"] == ["cooking"] and entry["needs_review"]
    plain = rag.answer("Why is Mars red?", metadata=ASTRO)
    assert not plain.needs_review and plain.policy == {} and not plain.retrieved
    assert len(AuditLog(index_dir / "audit.jsonl").read()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("action", ["refuse", "review"])
def test_the_policy_config_says_what_sensitive_experts_get(index_dir, model, action, tmp_path):
    from expertrag.pipeline.build import expert_policy

    _register(index_dir, cooking={"sensitive": True})
    cfg = PolicyConfig.model_validate({"sensitive_experts": {"action": action, "reason": "regulated recipes"},
                                       "audit_path": str(tmp_path / "audit.jsonl")})
    rag = _rag(index_dir, _native(model), policy="always", expert_policy=expert_policy(cfg, index_dir))
    a = rag.answer("How is caramel made?", metadata=COOK)
    assert a.needs_review and a.policy["action"] == action and a.policy["reason"] == "regulated recipes"
    if action == "refuse":
        assert a.abstained and not a.retrieved and a.gate["decision"] == "refused" and "regulated recipes" in a.text
    else:
        assert a.retrieved and a.gate["stage"] == "fixed" and a.text  # answered as usual, marked for review
    assert AuditLog(tmp_path / "audit.jsonl").read()[-1]["action"] == action


def test_bad_sensitive_experts_settings_name_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="sensitive_experts.action"):
        PolicyConfig.model_validate({"sensitive_experts": {"action": "redact"}})


def test_expert_add_adapter_is_checked_before_it_is_registered(index_dir):
    _random_adapter_folder_only(index_dir / "adapters" / "astronomy")
    assert_one_line_error(*cli("expert", "add", "--index", str(index_dir), "--domain", "astronomy",
                               "--adapter", "adapters/nowhere")[::2], "--adapter", "missing")
    assert not (index_dir / "experts.json").exists()
    code, out, err = cli("expert", "add", "--index", str(index_dir), "--domain", "astronomy",
                         "--adapter", "adapters/astronomy", "--json")
    assert code == 0, err
    assert json.loads(out)["added"][0]["adapter"] == "adapters/astronomy"


@pytest.mark.slow
def test_answer_quality_compares_routed_experts_with_one_global_index(index_dir, model, smollm2):
    from expertrag.eval.expert_routing import LabelledQuestion, answer_quality

    _random_adapter(smollm2[0], index_dir / "adapters" / "cooking", seed=5)
    _register(index_dir, cooking={"adapter": "adapters/cooking"}, astronomy={"gate": "never"})
    gen = _native(model)
    routed, plain = _rag(index_dir, gen), _rag(index_dir, gen)
    plain.experts = None  # as eval-experts compares: the same pipeline without routing
    test = [LabelledQuestion("q1", "How is caramel made?", "cooking", ["c3"], ["Sugar is heated until it melts."]),
            LabelledQuestion("q2", "Why is Mars red?", "astronomy", ["a1"], ["Iron oxide dust."])]
    report = answer_quality(routed, plain, test)
    r, g = report["routed"], report["global"]
    assert r["answers"] == g["answers"] == 2 and sum(report["paired"].values()) == 2
    assert set(r["token_f1_by_domain"]) == {"astronomy", "cooking"}
    # routed: cooking answered with its adapter, astronomy skipped retrieval by its own gate; global: neither
    assert (r["with_adapter"], r["without_retrieval"]) == (1, 1) and (g["with_adapter"], g["without_retrieval"]) == (0, 0)
