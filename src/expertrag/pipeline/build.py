"""Assemble an `ExpertRAG` from an index directory and the config: the one place that wires parts.

It reads only the sections it needs (`PipelineSettings`): the root `expertrag.config.ExpertRAGConfig`,
which composes every part's section (eval's included), sits above the pipeline and is never imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from expertrag.errors import InputError
from expertrag.experts.policy_config import PolicyConfig
from expertrag.gate.config import GateConfig
from expertrag.model.backend import Generator
from expertrag.model.config import ModelConfig
from expertrag.pipeline.config import PipelineConfig
from expertrag.pipeline.rag import AUDIT_FILE, ExpertRAG
from expertrag.retrieval.config import RetrievalConfig
from expertrag.retrieval.index import Index

GATE_DIR = "gate"
__all__ = ["AUDIT_FILE", "GATE_DIR", "PipelineSections", "PipelineSettings", "expert_policy", "gate_dir",
           "load_generator", "load_pipeline", "load_screen", "wire_pipeline"]


def gate_dir(index_dir: str | Path) -> Path:
    """Where `expertrag train gate` writes, and policies read, the gate artifacts of an index."""
    return Path(index_dir) / GATE_DIR


class PipelineSettings(Protocol):
    """The config sections a pipeline is built from; `ExpertRAGConfig` is one."""

    retrieval: RetrievalConfig
    model: ModelConfig
    gate: GateConfig
    pipeline: PipelineConfig
    policy: PolicyConfig  # optional: settings without it screen nothing (load_pipeline reads it with getattr)


@dataclass
class PipelineSections:
    """The default `PipelineSettings` (every section at its defaults)."""

    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)


def load_generator(config: PipelineSettings) -> Generator:
    """The generator `config.model.backend` names (see ModelConfig); with `model.long_prompt_backend`, long
    prompts go to that engine and short ones to `backend` (model.length_routed)."""
    from expertrag.model.auto_backend import resolve

    cfg = resolve(config.model)
    if cfg.long_prompt_backend is None:
        return _one_generator(cfg)
    if cfg.backend != "llamacpp":
        raise InputError(f"model.long_prompt_backend needs model.backend: llamacpp (got {cfg.backend!r}): the short "
                         "prompts' engine counts the tokens")
    from expertrag.model.length_routed import LengthRoutedGenerator

    short = _one_generator(cfg)
    long = _one_generator(cfg.model_copy(update={"backend": cfg.long_prompt_backend, "path": None}))
    return LengthRoutedGenerator(short, long, cfg.long_prompt_tokens, lambda p: len(short.encode(p)))


def _one_generator(cfg: ModelConfig) -> Generator:
    backend = cfg.backend
    if cfg.adapter is not None and (backend != "native" or cfg.checkpoint):
        raise InputError(f"model.adapter needs model.backend: native on the dense base (got backend {backend!r}"
                         f"{', checkpoint ' + repr(cfg.checkpoint) if cfg.checkpoint else ''})", field="model.adapter")
    if backend == "transformers":
        from expertrag.model.hf_backend import TransformersGenerator

        return TransformersGenerator.from_config(cfg)
    if backend == "llamacpp":
        from expertrag.model.llamacpp_backend import LlamaCppGenerator

        return LlamaCppGenerator.from_config(cfg)
    if backend == "openai":
        from expertrag.model.openai_backend import OpenAIGenerator

        return OpenAIGenerator.from_config(cfg)
    from expertrag.model.generator import ExpertRAGGenerator

    if cfg.checkpoint:
        from expertrag.model.moe_model import load_moe_model

        model, tokenizer = load_moe_model(cfg, None, cfg.checkpoint)
        return ExpertRAGGenerator(model, tokenizer, cfg.generation)
    generator = ExpertRAGGenerator.from_config(cfg)
    if cfg.adapter is not None:  # a knowledge expert on the base: stays for every answer and probe
        import dataclasses

        from expertrag.experts.adapter import load_adapter

        load_adapter(generator.model, cfg.adapter)
        # the model holds one adapter at a time: domain experts' adapters are not applied beside it
        generator.capabilities = dataclasses.replace(
            generator.capabilities, adapters=False, model=f"{generator.capabilities.model} + adapter {cfg.adapter}")
        generator.base_adapter = cfg.adapter
    return generator


def load_pipeline(index_dir: str | Path, config: PipelineSettings | None = None, policy: str | None = None,
                  gate: str | Path | None = None, generator: Generator | None = None) -> ExpertRAG:
    """Index + generator + policy. The policy's artifacts come from `gate` or the index's gate folder.
    The index's domain experts (INDEX/experts.json, INDEX/router/) are watched: with active domain experts
    every question is routed; without, the pipeline answers exactly as it did before experts existed.
    A bad expert `gate` fails here (see wire_pipeline); one added later fails the questions routed to it."""
    from expertrag.gate.policies import make_policy

    config = config or PipelineSections()
    index = Index(index_dir, config.retrieval)
    name = policy or config.gate.policy
    pol = make_policy(name, config.gate, artifacts_dir=gate or gate_dir(index_dir))
    return wire_pipeline(index, index_dir, generator or load_generator(config), pol, name, config)


def wire_pipeline(index: Index, index_dir: str | Path, generator: Generator, policy, policy_name: str,
                  config: PipelineSettings) -> ExpertRAG:
    """An ExpertRAG with the index's domain experts, their gates and the policy expert wired in (what
    `load_pipeline` and the service build). Every active expert's gate is built here, so a bad `gate` in the
    registry fails at start-up, naming the file and the record's field."""
    from expertrag.experts.live import LiveExperts

    policy_config = getattr(config, "policy", None) or PolicyConfig()
    screen = load_screen(policy_config, index, index_dir)
    experts = LiveExperts(index_dir)
    rag = ExpertRAG(index, generator, policy, config.pipeline, policy_name, experts=experts, screen=screen,
                    gate_config=config.gate,
                    expert_policy=None if screen is not None else expert_policy(policy_config, index_dir))
    rag.gates.check(experts.current().snapshot)
    return rag


def expert_policy(policy: PolicyConfig, index_dir: str | Path):
    """The policy expert for questions routed to sensitive experts when no rule screens questions: the
    config's `sensitive_experts` settings, no rules, audited where the rules' matches would be."""
    from expertrag.experts.audit import AuditLog
    from expertrag.experts.policy import PolicyExpert

    cfg = PolicyConfig(sensitive_experts=policy.sensitive_experts, refusal_text=policy.refusal_text,
                       audit_path=policy.audit_path)
    return PolicyExpert(cfg, audit=AuditLog(policy.audit_path or Path(index_dir) / AUDIT_FILE))


def policy_factory(index_dir: str | Path, config: PipelineSettings, gate: str | Path | None = None,
                   generator: Generator | None = None):
    """policy name -> ExpertRAG sharing one Index and one generator (loaded now), answer and retrieval caches
    off: what `expertrag eval` answers with, in its own process or in each Ray worker."""
    from expertrag.gate.policies import make_policy

    index = Index(index_dir, config.retrieval)
    generator = generator if generator is not None else load_generator(config)
    pcfg = config.pipeline.model_copy(update={"answer_cache_size": 0, "retrieval_cache_size": 0, "cache_path": None})
    artifacts = gate if gate is not None else gate_dir(index_dir)

    def factory(policy: str) -> ExpertRAG:
        return ExpertRAG(index, generator, make_policy(policy, config.gate, artifacts), pcfg, policy)

    return factory


def load_screen(policy: PolicyConfig, index: Index, index_dir: str | Path):
    """The policy expert of these rules (None without rules), classifying with the index's own embedder
    so its question embedding is the one the gate and dense retrieval reuse."""
    from expertrag.experts.policy import PolicyExpert

    return PolicyExpert.from_config(policy, index.embedder if policy.active else None,
                                    audit_path=Path(index_dir) / AUDIT_FILE)
