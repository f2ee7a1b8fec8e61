"""Assemble an `ExpertRAG` from an index directory and the config: the one place that wires parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expertrag.config import ExpertRAGConfig
from expertrag.pipeline.rag import ExpertRAG
from expertrag.retrieval.index import Index

GATE_DIR = "gate"


def gate_dir(index_dir: str | Path) -> Path:
    """Where `expertrag train gate` writes, and policies read, the gate artifacts of an index."""
    return Path(index_dir) / GATE_DIR


def load_generator(config: ExpertRAGConfig) -> Any:
    from expertrag.model.generator import ExpertRAGGenerator

    if config.model.checkpoint:
        from expertrag.model.moe_model import load_moe_model

        model, tokenizer = load_moe_model(config.model, None, config.model.checkpoint)
        return ExpertRAGGenerator(model, tokenizer, config.model.generation)
    return ExpertRAGGenerator.from_config(config.model)


def load_pipeline(index_dir: str | Path, config: ExpertRAGConfig | None = None, policy: str | None = None,
                  gate: str | Path | None = None, generator: Any = None) -> ExpertRAG:
    """Index + generator + policy. The policy's artifacts come from `gate` or the index's gate folder."""
    from expertrag.gate.policies import make_policy

    config = config or ExpertRAGConfig()
    index = Index(index_dir, config.retrieval)
    name = policy or config.gate.policy
    pol = make_policy(name, config.gate, artifacts_dir=gate or gate_dir(index_dir))
    return ExpertRAG(index, generator or load_generator(config), pol, config.pipeline, name)
