"""Label derivation and label files."""

from __future__ import annotations

import json

import pytest

from expertrag.data.types import Question
from expertrag.errors import InputError
from expertrag.gate.labels import (
    LabelRecord,
    derive_label,
    label_from_metadata,
    read_labels,
    records_from_metadata,
    target,
    write_labels,
)


@pytest.mark.parametrize("closed, open_, label", [
    (True, True, "no_retrieve"), (True, False, "no_retrieve"), (False, True, "retrieve"),
    (False, False, "both_wrong"),
])
def test_derive_label_table(closed, open_, label):
    assert derive_label(closed, open_) == label


def test_label_from_metadata():
    assert label_from_metadata({"judgement": "ir_better"}) == "retrieve"
    assert label_from_metadata({"judgement": "ir_worse"}) == "no_retrieve"
    assert label_from_metadata({"judgement": "same"}) == "no_retrieve"
    assert label_from_metadata({"needs_retrieval": True}) == "retrieve"
    assert label_from_metadata({"needs_retrieval": False, "judgement": "ir_better"}) == "no_retrieve"
    assert label_from_metadata({"s_pop": 3}) is None
    with pytest.raises(InputError, match="metadata.judgement"):
        label_from_metadata({"judgement": "better"})
    with pytest.raises(InputError, match=r"q\.jsonl:4 \(field 'metadata.needs_retrieval'\)"):
        label_from_metadata({"needs_retrieval": "yes"}, path="q.jsonl", line=4)


def test_target():
    assert target("retrieve") == 1 and target("no_retrieve") == 0
    assert target("both_wrong") == 0
    assert target("both_wrong", "retrieve") == 1
    assert target("both_wrong", "drop") is None
    with pytest.raises(ValueError):
        target("maybe")


def test_records_from_metadata():
    qs = [Question("1", "a?", metadata={"judgement": "ir_better"}), Question("2", "b?"),
          Question("3", "c?", metadata={"needs_retrieval": True})]
    assert [(r.id, r.label) for r in records_from_metadata(qs)] == [("1", "retrieve"), ("3", "retrieve")]


def test_label_file_round_trip_and_errors(tmp_path):
    recs = [LabelRecord("q1", "Who?", "retrieve", False, True, "x", "Paris", {"s_pop": 5},
                        {"token_ids": [5, 7], "logprobs": [-0.5, -1.25], "entropies": [2.0, 0.75]}),
            LabelRecord("q2", "What?", "no_retrieve")]
    p = tmp_path / "labels.jsonl"
    assert write_labels(p, recs) == 2
    assert read_labels(p) == recs

    def bad(obj, match):
        f = tmp_path / "bad.jsonl"
        f.write_text(json.dumps(recs[1].to_dict()) + "\n" + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        with pytest.raises(InputError, match=match):
            read_labels(f)

    good = recs[0].to_dict()
    bad({**good, "label": "maybe"}, r"bad\.jsonl:2 \(field 'label'\)")
    bad({**good, "label": "no_retrieve"}, r"bad\.jsonl:2 \(field 'label'\): label 'no_retrieve' contradicts")
    bad({**good, "closed_correct": "no"}, r":2 \(field 'closed_correct'\)")
    bad({**good, "id": "q2"}, r":2 \(field 'id'\): duplicate id 'q2'")
    bad({k: v for k, v in good.items() if k != "question"}, r":2 \(field 'question'\)")
    bad("{not json", r"bad\.jsonl:2: malformed JSON")
    trace = good["closed_trace"]
    bad({**good, "closed_trace": [1]}, r":2 \(field 'closed_trace'\): must be an object")
    bad({**good, "closed_trace": {**trace, "logprobs": ["a", 1]}}, r"field 'closed_trace.logprobs'")
    bad({**good, "closed_trace": {**trace, "entropies": [1.0]}}, r"field 'closed_trace'\): .* differ in length")
    assert "closed_trace" not in recs[1].to_dict()  # files without traces stay as they were
    with pytest.raises(InputError, match="no such label file"):
        read_labels(tmp_path / "missing.jsonl")
