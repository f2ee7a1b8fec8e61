"""The LRU answer/retrieval cache: eviction order, normalised keys, persistence on disk."""

from __future__ import annotations

from expertrag.model.prompts import open_book_messages
from expertrag.pipeline.cache import LRUCache, cache_key
from expertrag.retrieval.types import Hit


def test_lru_evicts_least_recently_used():
    c = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now the most recent
    c.put("c", 3)
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3
    assert c.hits == 3 and c.misses == 1 and len(c) == 2


def test_keys_normalise_the_query_and_separate_everything_else():
    assert cache_key("What is Tea?", 1, "never") == cache_key("what is tea", 1, "never")
    assert cache_key("what is tea", 1, "never") != cache_key("what is tea", 2, "never")  # index version
    assert cache_key("what is tea", 1, "never") != cache_key("what is tea", 1, "always")  # policy


def test_disk_cache_survives_a_new_process_object(tmp_path):
    path = tmp_path / "cache.sqlite"
    first = LRUCache(4, path, "answers")
    first.put("k", {"text": "Paris", "n": [1, 2]})
    again = LRUCache(4, path, "answers")
    assert again.get("k") == {"text": "Paris", "n": [1, 2]}
    assert LRUCache(4, path, "retrieval").get("k") is None  # namespaces are separate
    again.clear()
    assert LRUCache(4, path, "answers").get("k") is None


def test_open_book_prompt_numbers_and_cuts_passages():
    hits = [Hit("a", "Tea", "Tea is a drink. " * 100, 1.0), Hit("b", "Moon", "The Moon orbits Earth.", 0.5)]
    msgs = open_book_messages("what is tea?", hits, max_chars=60)
    user = msgs[-1]["content"]
    assert "[1] Tea:" in user and "[2] Moon: The Moon orbits Earth." in user
    assert user.index("[1]") < user.index("[2]") < user.index("Question: what is tea?")
    assert len(user.split("\n")[1]) < 100  # the long passage was cut at a word boundary


def test_support_needs_the_answers_own_content_words():
    from expertrag.pipeline.rag import supports

    passage = "Brazil. Portuguese is the official and national language of Brazil."
    q = "What is the official language of Brazil?"
    assert supports(passage, "The official language of Brazil is Portuguese.", q)
    assert not supports(passage, "The official language of Brazil is Spanish.", q)
    assert not supports(passage, "The official language of Brazil.", q)  # nothing beyond the question
    assert supports("Leonardo da Vinci painted the Mona Lisa.", "Leonardo da Vinci", "Who painted it?")
    assert not supports("Leonardo da Vinci painted it.", "", "Who painted it?")
