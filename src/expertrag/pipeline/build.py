"""Assemble an `ExpertRAG` from an index directory and the config: the one place that wires parts.

It reads only the sections it needs (`PipelineSettings`): the root `expertrag.config.ExpertRAGConfig`,
which composes every part's section (eval's included), sits above the pipeline and is never imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from expertrag.experts.policy_config import PolicyConfig
from expertrag.gate.config import GateConfig
from expertrag.model.backend import Generator
from expertrag.model.config import ModelConfig
from expertrag.pipeline.config import PipelineConfig
from expertrag.pipeline.rag import ExpertRAG
from expertrag.retrieval.config import RetrievalConfig
from expertrag.retrieval.index import Index

GATE_DIR = "gate"
AUDIT_FILE = "audit.jsonl"  # the policy expert's audit log, inside the index folder unless policy.audit_path


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
    """The generator `config.model.backend` names (see ModelConfig)."""
    backend = config.model.backend
    if backend == "transformers":
        from expertrag.model.hf_backend import TransformersGenerator

        return TransformersGenerator.from_config(config.model)
    if backend == "openai":
        from expertrag.model.openai_backend import OpenAIGenerator

        return OpenAIGenerator.from_config(config.model)
    from expertrag.model.generator import ExpertRAGGenerator

    if config.model.checkpoint:
        from expertrag.model.moe_model import load_moe_model

        model, tokenizer = load_moe_model(config.model, None, config.model.checkpoint)
        return ExpertRAGGenerator(model, tokenizer, config.model.generation)
    return ExpertRAGGenerator.from_config(config.model)


def load_pipeline(index_dir: str | Path, config: PipelineSettings | None = None, policy: str | None = None,
                  gate: str | Path | None = None, generator: Generator | None = None) -> ExpertRAG:
    """Index + generator + policy. The policy's artifacts come from `gate` or the index's gate folder."""
    from expertrag.gate.policies import make_policy

    config = config or PipelineSections()
    index = Index(index_dir, config.retrieval)
    name = policy or config.gate.policy
    pol = make_policy(name, config.gate, artifacts_dir=gate or gate_dir(index_dir))
    screen = load_screen(getattr(config, "policy", None) or PolicyConfig(), index, index_dir)
    return ExpertRAG(index, generator or load_generator(config), pol, config.pipeline, name, screen=screen)


def load_screen(policy: PolicyConfig, index: Index, index_dir: str | Path):
    """The policy expert of these rules (None without rules), classifying with the index's own embedder
    so its question embedding is the one the gate and dense retrieval reuse."""
    from expertrag.experts.policy import PolicyExpert

    return PolicyExpert.from_config(policy, index.embedder if policy.active else None,
                                    audit_path=Path(index_dir) / AUDIT_FILE)
