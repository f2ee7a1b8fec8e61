from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PipelineConfig(BaseModel):
    """How one question is answered, end to end."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(3, gt=0, description="passages put in the prompt when retrieving")
    search_mode: Literal["bm25", "dense", "hybrid"] = "hybrid"
    fusion: Literal["concat", "expert", "both"] = Field(
        "concat", description="passages in the prompt, fed to the retrieval expert, or both")
    passage_max_chars: int = Field(600, gt=50, description="each passage is cut to this length in the prompt")
    max_new_tokens: int = Field(24, gt=0)
    probe_tokens: int = Field(8, gt=0, description="closed-book draft length for the slow gate stage")
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    probe_layer: int = Field(-1, description="decoder layer whose hidden state feeds the gate (-1 = last, normed)")
    probe_layers: list[int] | None = Field(
        None, description="several decoder layers whose last-token hidden states, concatenated in this order, "
                          "feed the gate's linear probe (null = [probe_layer])")
    probe_batch_size: int = Field(16, gt=0, description="probes run together when training a gate")
    abstain_below: float = Field(0.25, ge=0, le=1, description="answer confidence under which an unsupported answer abstains")
    max_query_chars: int = Field(1000, gt=0)
    answer_cache_size: int = Field(1024, ge=0)
    retrieval_cache_size: int = Field(4096, ge=0)
    cache_path: str | None = Field(None, description="SQLite file to persist caches across runs")
