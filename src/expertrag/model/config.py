from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ModelConfig(BaseModel):
    """The decoder model and where its base weights come from. Owned by the model/ package."""

    model_config = ConfigDict(extra="forbid")
    base: str = "smollm2-135m-instruct"
