from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ChunkingConfig(BaseModel):
    """How documents are cut into passages (sizes in tokenizer tokens of the embedder)."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: int = Field(200, gt=8, description="passage length bound, in embedder tokens")
    overlap_tokens: int = Field(40, ge=0, description="tokens shared by consecutive passages of a document")
    csv_text_column: str = "text"
    csv_title_column: str | None = "title"
    csv_id_column: str | None = "id"
