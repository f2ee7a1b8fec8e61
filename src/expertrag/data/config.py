from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ChunkingConfig(BaseModel):
    """How documents are cut into passages (sizes in tokenizer tokens of the embedder).

    Token counts exclude the special tokens ([CLS]/[SEP]); the MiniLM embedder reads 256 tokens
    including them, so keep `max_tokens` <= 254 for it to see whole passages.
    """

    model_config = ConfigDict(extra="forbid")
    max_tokens: int = Field(200, gt=8, description="passage length bound, in embedder tokens")
    overlap_tokens: int = Field(40, ge=0, description="tokens shared by consecutive passages of a document")
    snap_to_sentences: bool = Field(
        True,
        description="end passages at a sentence or paragraph end when one lies in the last half of the "
        "window (otherwise at a word boundary)",
    )
    csv_text_column: str = "text"
    csv_title_column: str | None = "title"
    csv_id_column: str | None = "id"

    @model_validator(mode="after")
    def _overlap_below_max(self) -> ChunkingConfig:
        if self.overlap_tokens >= self.max_tokens:
            raise ValueError(
                f"overlap_tokens ({self.overlap_tokens}) must be smaller than max_tokens ({self.max_tokens})"
            )
        return self
