"""A knowledge slice for a knowledge expert (issue 15, part 2): the questions about a fixed set of entities,
the training text about them, and paraphrased questions to test whether a model learned the facts rather
than the training strings.

Built from PopQA-style questions, whose metadata names the fact: `subject`, `relation`, `object` (the
shared `popqa_longtail.jsonl` has them). Each relation has the PopQA question template (what the training
QA pairs are phrased like), a statement template (the slice's passages: one sentence per fact, in words
that are not the question's) and paraphrase templates that share neither's phrasing, so that a model which
only memorised a string cannot answer the paraphrase by pattern.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from expertrag.data.types import Document, Question
from expertrag.errors import InputError

# relation -> (fact statement, paraphrased questions). `{s}` subject, `{o}` object.
RELATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "occupation": ("{s} worked as a {o}.", ("What did {s} do for a living?", "What was {s}'s profession?")),
    "place of birth": ("{s} was born in {o}.", ("Where was {s} born?", "Which city is {s}'s birthplace?")),
    "genre": ("{s} belongs to the {o} genre.", ("Which genre does {s} belong to?",
                                                "What kind of genre is {s} classed as?")),
    "father": ("{s}'s father was {o}.", ("Who was {s}'s father?", "Name the father of {s}.")),
    "mother": ("{s}'s mother was {o}.", ("Who was {s}'s mother?", "Name the mother of {s}.")),
    "country": ("{s} is located in {o}.", ("Which country is {s} located in?", "{s} lies in which country?")),
    "producer": ("{s} was produced by {o}.", ("Who produced {s}?", "Which person produced {s}?")),
    "director": ("{s} was directed by {o}.", ("Who directed {s}?", "Which director made {s}?")),
    "capital of": ("{s} is the capital city of {o}.", ("{s} is the capital of which place?",
                                                       "Of which place is {s} the capital?")),
    "screenwriter": ("{s} was written for the screen by {o}.", ("Who wrote the screenplay of {s}?",
                                                                 "Whose screenplay is {s}?")),
    "composer": ("The music of {s} was composed by {o}.", ("Who composed the music of {s}?",
                                                           "Which composer wrote {s}?")),
    "color": ("The colour of {s} is {o}.", ("Which colour is {s}?", "{s} has what colour?")),
    "religion": ("{s} follows {o}.", ("Which religion does {s} follow?", "What faith is {s} associated with?")),
    "sport": ("{s} plays {o}.", ("Which sport is {s} known for playing?", "{s} competes in which sport?")),
    "author": ("{s} was written by {o}.", ("Who wrote {s}?", "Which writer is the author of {s}?")),
    "capital": ("The capital of {s} is {o}.", ("Which city is the capital of {s}?", "Name the capital city of {s}.")),
}


@dataclass(frozen=True)
class KnowledgeSlice:
    subjects: tuple[str, ...]
    train: list[Question]  # the original questions of the slice (the training QA pairs)
    passages: list[Document]  # one fact statement per slice question (metadata.domain = the slice's name)
    paraphrased: list[Question]  # the slice's questions reworded (evaluation: inside the slice)
    outside: list[Question]  # questions about other subjects (evaluation: damage outside the slice)


def fact(q: Question, where: str = "") -> tuple[str, str, str]:
    """(subject, relation, object) of a PopQA-style question; an InputError naming the field otherwise."""
    meta = q.metadata
    for name in ("subject", "relation", "object"):
        if not isinstance(meta.get(name), str) or not meta[name].strip():
            raise InputError(f"question {q.id!r}: metadata.{name} must be a non-empty string", path=where or None,
                             field=f"metadata.{name}")
    if meta["relation"] not in RELATIONS:
        raise InputError(f"question {q.id!r}: unknown relation {meta['relation']!r}; known: "
                         f"{', '.join(sorted(RELATIONS))}", path=where or None, field="metadata.relation")
    return meta["subject"], meta["relation"], meta["object"]


def paraphrase(q: Question, variant: int = 0) -> Question:
    """The question reworded by one of its relation's paraphrase templates (same answers, id `ID~pN`)."""
    s, r, _ = fact(q)
    templates = RELATIONS[r][1]
    text = templates[variant % len(templates)].format(s=s)
    return Question(f"{q.id}~p{variant % len(templates)}", text, list(q.golden_answers),
                    {**q.metadata, "paraphrase_of": q.id})


def statement(q: Question, domain: str = "slice") -> Document:
    """The fact of a question as a one-sentence passage titled by its subject."""
    s, r, o = fact(q)
    return Document(f"fact-{q.id}", s, RELATIONS[r][0].format(s=s, o=o), {"domain": domain, "relation": r})


def knowledge_slice(questions: Sequence[Question], n_subjects: int, *, seed: int = 0, n_outside: int | None = None,
                    domain: str = "slice", where: str = "") -> KnowledgeSlice:
    """Draw `n_subjects` subjects (seeded), and split the questions into the slice (every question about a
    drawn subject) and the rest, of which `n_outside` (seeded; default as many as the slice) are kept.

    A subject is drawn whole, so no paraphrase asks about a subject whose other facts are outside."""
    if n_subjects <= 0:
        raise InputError(f"n_subjects must be positive, got {n_subjects}")
    facts = [fact(q, where) for q in questions]
    subjects = sorted({s for s, _, _ in facts})
    if n_subjects > len(subjects):
        raise InputError(f"{n_subjects} subjects asked for, the questions name only {len(subjects)}",
                         path=where or None)
    drawn = set(random.Random(seed).sample(subjects, n_subjects))
    inside = [q for q, (s, _, _) in zip(questions, facts, strict=True) if s in drawn]
    rest = [q for q, (s, _, _) in zip(questions, facts, strict=True) if s not in drawn]
    rng = random.Random(f"{seed}:outside")
    outside = rng.sample(rest, min(len(rest), len(inside) if n_outside is None else n_outside))
    return KnowledgeSlice(
        subjects=tuple(sorted(drawn)), train=inside, passages=[statement(q, domain) for q in inside],
        paraphrased=[paraphrase(q, random.Random(f"{seed}:{q.id}").randrange(2)) for q in inside],
        outside=outside)


@dataclass(frozen=True)
class MixedWorkload:
    """A workload whose "known" half is a knowledge slice: what a gate must learn the boundary of.

    `passages` is a knowledge base of one fact per question given (the slice's with the slice's domain,
    the rest "kb"): retrieval can answer every question, the adapted model only the slice's. `gate_train`
    is the slice's questions as the adapter was trained on them plus questions about other subjects;
    `test` is every slice question in both paraphrases plus as many questions about still other subjects.
    Outside subjects are split whole, so a test question outside the slice never shares a subject with a
    gate-training one. Every question's metadata.part is "slice" or "outside"."""

    slice: KnowledgeSlice
    passages: list[Document]
    gate_train: list[Question]
    test: list[Question]


def mixed_workload(questions: Sequence[Question], n_subjects: int, *, seed: int = 0, outside_train: int | None = None,
                   domain: str = "slice", where: str = "") -> MixedWorkload:
    """The mixed workload over `questions` (see MixedWorkload); `outside_train` defaults to the slice's size."""
    n_inside = len(knowledge_slice(questions, n_subjects, seed=seed, domain=domain, where=where).train)
    n_train = n_inside if outside_train is None else outside_train
    sl = knowledge_slice(questions, n_subjects, seed=seed, n_outside=n_train + 2 * n_inside, domain=domain,
                         where=where)
    part_of: dict[str, str] = {}  # outside subject -> "train" | "test", on first sight in the seeded order
    train_out: list[Question] = []
    test_out: list[Question] = []
    for x in sl.outside:
        subject = x.metadata["subject"]
        if subject not in part_of:
            part_of[subject] = "train" if len(train_out) < n_train else "test"
        (train_out if part_of[subject] == "train" else test_out).append(x)

    def tagged(x: Question, part: str) -> Question:
        return Question(x.id, x.question, list(x.golden_answers), {**x.metadata, "part": part})

    in_slice = {x.id for x in sl.train}
    return MixedWorkload(
        slice=sl,
        passages=[statement(x, domain if x.id in in_slice else "kb") for x in questions],
        gate_train=[tagged(x, "slice") for x in sl.train] + [tagged(x, "outside") for x in train_out],
        test=[tagged(paraphrase(x, v), "slice") for x in sl.train for v in (0, 1)]
        + [tagged(x, "outside") for x in test_out])
