"""The reader's compact id table against a plain dict (the reference it replaces)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from expertrag.data.id_table import IdTable


def test_matches_a_dict_through_many_growths():
    table, ref = IdTable(capacity=1), {}
    ids = [f"doc-{i % 3000}" if i % 7 else f"wiki:{i // 7}" for i in range(9000)]
    for n, doc_id in enumerate(ids):
        got = table.add(doc_id, n)
        assert got == ref.get(doc_id), doc_id
        ref.setdefault(doc_id, n)
    assert len(table) == len(ref)
    # after growing, every id still answers with its first location
    for doc_id, first in ref.items():
        assert table.add(doc_id, -1) == first
    assert table.nbytes <= 24 * 4 * len(ref)  # at most half full after the last growth, so <= 96 B an id


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=12), max_size=200))
def test_any_strings(ids):
    table, ref = IdTable(capacity=2), {}
    for n, doc_id in enumerate(ids):
        assert table.add(doc_id, n) == ref.get(doc_id)
        ref.setdefault(doc_id, n)
