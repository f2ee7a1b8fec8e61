"""Ingestion: corpus and question files in, documents and token-bounded passages out."""

from expertrag.data.chunking import (
    chunk_document,
    chunk_documents,
    content_hash,
    count_tokens,
    load_tokenizer,
)
from expertrag.data.config import ChunkingConfig
from expertrag.data.questions import load_questions
from expertrag.data.readers import SUPPORTED_SUFFIXES, FileStats, IngestReport, iter_documents
from expertrag.data.types import Document, Passage, Question
from expertrag.data.wiki_offline import iter_wiki_offline_documents, wiki_offline_path

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ChunkingConfig",
    "Document",
    "FileStats",
    "IngestReport",
    "Passage",
    "Question",
    "chunk_document",
    "chunk_documents",
    "content_hash",
    "count_tokens",
    "iter_documents",
    "iter_wiki_offline_documents",
    "load_questions",
    "load_tokenizer",
    "wiki_offline_path",
]
