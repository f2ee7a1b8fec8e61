"""One typed config for the whole system: every knob is a named field of a section.

Each part defines its own section next to its code; this module composes them.
Load from YAML with `ExpertRAGConfig.load(path)`; unknown keys are errors, not silently ignored.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from expertrag.data.config import ChunkingConfig
from expertrag.errors import ConfigError
from expertrag.eval.config import EvalConfig
from expertrag.experts.policy_config import PolicyConfig
from expertrag.gate.config import GateConfig
from expertrag.model.config import ModelConfig
from expertrag.model.train.config import TrainConfig
from expertrag.moe.config import MoEConfig
from expertrag.pipeline.config import PipelineConfig
from expertrag.retrieval.config import RetrievalConfig
from expertrag.serve.config import ServeConfig


class ExpertRAGConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)  # the policy expert's rules (none by default)

    @classmethod
    def load(cls, path: str | Path | None) -> ExpertRAGConfig:
        if path is None:
            return cls()
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
            )
            raise ConfigError(f"{path}: {problems}") from None

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
