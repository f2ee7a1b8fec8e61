"""`expertrag bench build-memory`: corpus prefixes, size parsing, and real builds measured in child processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertrag.bench.build_memory import CORPUS_ORDER, parse_sizes, run, write_prefix
from expertrag.errors import InputError


def _data(tmp_path: Path, counts=(4, 3)) -> Path:
    corpora = tmp_path / "data" / "corpora"
    corpora.mkdir(parents=True)
    for name, n in zip(CORPUS_ORDER, counts, strict=False):
        stem = name.split(".")[0]
        rows = [{"id": f"{stem}-{i}", "title": f"{stem} {i}", "contents": f"Text {i} of {stem} about item {i}."}
                for i in range(n)]
        (corpora / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return tmp_path / "data"


def test_parse_sizes_sorts_and_rejects_bad_input():
    assert parse_sizes("15000,2000, 5000") == [2000, 5000, 15000]
    with pytest.raises(InputError, match="comma-separated"):
        parse_sizes("2k,5k")
    with pytest.raises(InputError, match="positive"):
        parse_sizes("0,10")
    with pytest.raises(InputError, match="positive"):
        parse_sizes(",")


def test_prefixes_follow_the_fixed_corpus_order(tmp_path):
    data = _data(tmp_path)
    small, large = tmp_path / "s.jsonl", tmp_path / "l.jsonl"
    assert write_prefix(data, 3, small) == 3
    assert write_prefix(data, 6, large) == 6
    small_ids = [json.loads(line)["id"] for line in small.read_text().splitlines()]
    large_ids = [json.loads(line)["id"] for line in large.read_text().splitlines()]
    assert large_ids[:3] == small_ids  # the smaller corpus is a prefix of the larger
    assert large_ids == ["wiki_vital-0", "wiki_vital-1", "wiki_vital-2", "wiki_vital-3",
                         "lfrqa_answers-0", "lfrqa_answers-1"]  # wiki_vital first, then lfrqa_answers
    assert write_prefix(data, 100, tmp_path / "all.jsonl") == 7  # everything there is, no more


def test_run_refuses_a_folder_without_corpora_and_too_few_documents(tmp_path):
    with pytest.raises(InputError, match="corpora"):
        run(tmp_path, [10], progress=False)
    with pytest.raises(InputError, match="only 7 documents"):
        run(_data(tmp_path), [100], progress=False)


def test_run_measures_each_build_in_its_own_process(tmp_path):
    data = _data(tmp_path)
    config = tmp_path / "torch.yaml"
    config.write_text("retrieval:\n  embed_backend: torch\n", encoding="utf-8")
    result = run(data, [3, 6], config=config, threads=1, progress=False)
    small, large = result["sizes"]
    assert (small["documents"], small["passages"]) == (3, 3)
    assert (large["documents"], large["passages"]) == (6, 6)
    assert small["embed_backend"] == large["embed_backend"] == "torch"
    for row in (small, large):
        # a child that imports torch and loads MiniLM holds far more than 100 MB at its peak
        assert row["peak_rss_mb"] > 100
        assert set(row["peak_rss_mb_after_phase"]) == {"start", "store", "embed", "bm25", "dense"}
        assert max(row["peak_rss_mb_after_phase"].values()) <= row["peak_rss_mb"] + 1
    assert result["ratio_largest_smallest"] == pytest.approx(large["peak_rss_mb"] / small["peak_rss_mb"], abs=1e-3)
    assert result["flat"] == (result["ratio_largest_smallest"] <= result["target_ratio"])
