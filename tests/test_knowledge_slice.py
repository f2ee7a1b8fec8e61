"""The knowledge slice (issue 15 part 2): subjects drawn whole, fact passages, paraphrases unlike the
training strings, and clear errors for questions that do not name their fact."""

from __future__ import annotations

import pytest

from expertrag.data.knowledge_slice import RELATIONS, knowledge_slice, mixed_workload, paraphrase, statement
from expertrag.data.types import Question
from expertrag.errors import InputError


def q(i: str, s: str, r: str, o: str, text: str) -> Question:
    return Question(i, text, [o], {"subject": s, "relation": r, "object": o})


QS = [
    q("1", "Henry Feilden", "occupation", "politician", "What is Henry Feilden's occupation?"),
    q("2", "Henry Feilden", "place of birth", "Blackburn", "In what city was Henry Feilden born?"),
    q("3", "Kew Gardens", "country", "United Kingdom", "In what country is Kew Gardens?"),
    q("4", "Night Train", "director", "Diao Yinan", "Who was the director of Night Train?"),
    q("5", "Ola Lia", "sport", "association football", "What sport does Ola Lia play?"),
]


def test_subjects_are_drawn_whole_and_outside_is_disjoint():
    for seed in range(6):
        sl = knowledge_slice(QS, 2, seed=seed)
        assert len(sl.subjects) == 2
        inside = {x.metadata["subject"] for x in sl.train}
        assert inside == set(sl.subjects)
        # every question about a drawn subject is in the slice; none of them outside
        assert {x.id for x in sl.train} == {x.id for x in QS if x.metadata["subject"] in inside}
        assert not {x.metadata["subject"] for x in sl.outside} & inside
        assert len(sl.outside) == min(len(sl.train), len(QS) - len(sl.train))
        assert [p.metadata["paraphrase_of"] for p in sl.paraphrased] == [x.id for x in sl.train]
    assert knowledge_slice(QS, 2, seed=1) == knowledge_slice(QS, 2, seed=1)


def test_paraphrases_keep_answers_and_change_the_wording():
    for x in QS:
        for v in range(2):
            p = paraphrase(x, v)
            assert p.golden_answers == x.golden_answers and x.metadata["subject"] in p.question
            assert p.question != x.question
    assert paraphrase(QS[0], 0).question == "What did Henry Feilden do for a living?"
    assert paraphrase(QS[0], 0).id == "1~p0" and paraphrase(QS[0], 3).id == "1~p1"


def test_statement_is_the_fact_in_other_words():
    d = statement(QS[1])
    assert d.title == "Henry Feilden" and d.contents == "Henry Feilden was born in Blackburn."
    assert d.metadata == {"domain": "slice", "relation": "place of birth"}
    for r, (fact, paraphrases) in RELATIONS.items():
        assert "{s}" in fact and "{o}" in fact, r
        assert len(paraphrases) == 2 and all("{s}" in t and "{o}" not in t for t in paraphrases), r


def test_bad_questions_are_named():
    bad = Question("x", "Who?", ["a"], {"subject": "A", "relation": "height", "object": "2 m"})
    with pytest.raises(InputError, match="'x'.*unknown relation 'height'") as err:
        knowledge_slice([*QS, bad], 1, where="q.jsonl")
    assert err.value.field == "metadata.relation" and err.value.path == "q.jsonl"
    with pytest.raises(InputError, match="metadata.object"):
        paraphrase(Question("y", "Who?", [], {"subject": "A", "relation": "sport"}))
    with pytest.raises(InputError, match="only 4"):
        knowledge_slice(QS, 9)
    with pytest.raises(InputError, match="positive"):
        knowledge_slice(QS, 0)


def test_mixed_workload_halves_and_subjects():
    more = QS + [q(str(10 + i), f"Subject {i}", "occupation", "writer", f"What is Subject {i}'s occupation?")
                 for i in range(12)] + [q("30", "Subject 0", "place of birth", "Oslo", "In what city was Subject 0 born?")]
    for seed in range(4):
        w = mixed_workload(more, 2, seed=seed, outside_train=3)
        inside = set(w.slice.subjects)
        train_out = [x for x in w.gate_train if x.metadata["part"] == "outside"]
        test_out = [x for x in w.test if x.metadata["part"] == "outside"]
        # the gate trains on the slice as the adapter saw it, and is tested on its paraphrases (both wordings)
        assert [x.id for x in w.gate_train if x.metadata["part"] == "slice"] == [x.id for x in w.slice.train]
        slice_test = [x for x in w.test if x.metadata["part"] == "slice"]
        assert len(slice_test) == 2 * len(w.slice.train)
        assert {x.metadata["paraphrase_of"] for x in slice_test} == {x.id for x in w.slice.train}
        assert not {x.question for x in slice_test} & {x.question for x in w.slice.train}
        # outside subjects: none in the slice, none shared by the gate's training and the test
        s_train = {x.metadata["subject"] for x in train_out}
        s_test = {x.metadata["subject"] for x in test_out}
        assert not (s_train | s_test) & inside and not s_train & s_test
        # at least the asked-for count (a subject is never split to hit it exactly), the rest to the test
        assert len(train_out) >= 3 and test_out and len(train_out) + len(test_out) == len(w.slice.outside)
        # the knowledge base holds one fact per question; only the slice's are the slice's domain
        assert len(w.passages) == len(more)
        assert {d.id for d in w.passages if d.metadata["domain"] == "slice"} == {f"fact-{x.id}" for x in w.slice.train}
    assert mixed_workload(more, 2, seed=1, outside_train=3) == mixed_workload(more, 2, seed=1, outside_train=3)
