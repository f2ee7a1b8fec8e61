"""Request bodies of the HTTP API (pydantic): what FastAPI validates and what /openapi.json describes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class AnswerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(description="the question")
    policy: str | None = Field(None, description="retrieval policy (default: the server's gate.policy)")
    k: int | None = Field(None, description="passages retrieved when retrieving")
    max_tokens: int | None = Field(None, description="most tokens generated")
    stream: bool = Field(False, description="Server-Sent Events: decision, passages, tokens, then the answer")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(BaseModel):
    """OpenAI's chat completion request; fields ExpertRAG does not use are accepted and ignored so that
    OpenAI-compatible clients work unchanged."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, description="accepted; answers are greedy (the gate assumes it)")
    logprobs: bool = Field(False, description="return each generated token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token: ExpertRAG returns "
                                     "only the chosen token (its decoder keeps no top-k)")


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str
    k: int = 5
    mode: str = "hybrid"


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    title: str | None = None
    contents: str
    metadata: dict[str, Any] | None = Field(None, description="`domain` (string), `groups` (list of strings)")


class DocumentsBody(BaseModel):
    """Either `documents` (JSONL-style records) or one `text` with its `id`."""

    model_config = ConfigDict(extra="forbid")
    documents: list[DocumentIn] | None = None
    text: str | None = None
    id: str | None = None
    title: str | None = None
    metadata: dict[str, Any] | None = None
