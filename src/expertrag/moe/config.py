from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MoEConfig(BaseModel):
    """The sparse expert layer (router, experts, losses). Owned by the moe/ package."""

    model_config = ConfigDict(extra="forbid")
    num_experts: int = Field(4, gt=0)
    top_k: int = Field(2, gt=0)
