"""Reading the training data: which files are corpora and which questions, the passages each question is
shown (index search or `metadata.context_ids`), and the resulting tokenized examples."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from expertrag.data.questions import load_questions
from expertrag.data.readers import iter_documents
from expertrag.errors import InputError
from expertrag.model.train.config import TrainConfig
from expertrag.model.train.examples import Example, corpus_blocks, qa_examples
from expertrag.retrieval.types import Hit

SEARCH_BATCH = 64  # questions per Index.search_many call


@dataclass
class TrainingData:
    corpus: list[Example]
    qa: list[Example]
    files: dict[str, str]  # path -> "questions" | "corpus"
    skipped_questions: int = 0  # no golden answer
    no_passages: int = 0  # questions with no passages found (closed-book only)

    def counts(self) -> dict[str, int]:
        return {
            "corpus_blocks": len(self.corpus),
            "closed_book": sum(e.kind == "closed" for e in self.qa),
            "open_book": sum(e.kind == "open" for e in self.qa),
            "questions_without_answer": self.skipped_questions,
            "questions_without_passages": self.no_passages,
        }


def data_file_kind(path: str | Path) -> Literal["questions", "corpus"]:
    """'questions' if the file's first JSONL record has a `question` field, else 'corpus'."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or directory", path=p)
    if p.is_dir() or p.suffix.lower() != ".jsonl":
        return "corpus"
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            raw = raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"not a JSONL data file (first record does not parse: {e})", path=p,
                                 line=lineno) from None
            if not isinstance(obj, dict):
                raise InputError("not a JSONL data file (first record is not a JSON object)", path=p, line=lineno)
            return "questions" if "question" in obj else "corpus"
    raise InputError("empty file: no records", path=p)


def find_passages(questions: Sequence[Any], docs: Sequence[Any], cfg: TrainConfig,
                  index: str | Path | None = None, retrieval: Any = None) -> list[list[Hit] | None]:
    """Per question, the passages its open-book example shows (None: closed-book only): the index's top
    `passages_k` when an index is given, else its `metadata.context_ids` looked up in `docs`. `retrieval`: the
    RetrievalConfig the index is searched with (its embed backend must match the index's)."""
    hits_for: list[list[Hit] | None] = [None] * len(questions)
    if questions and index is not None:
        from expertrag.retrieval import Index  # loads the retrievers: only when an index is given

        idx = Index(index, retrieval)
        texts = [q.question for q in questions]
        for start in range(0, len(texts), SEARCH_BATCH):
            found = idx.search_many(texts[start:start + SEARCH_BATCH], cfg.passages_k, cfg.search_mode)
            hits_for[start:start + SEARCH_BATCH] = found
    elif questions and docs:
        by_id = {d.id: d for d in docs}
        for i, q in enumerate(questions):
            ids = q.metadata.get("context_ids") or []
            found = [by_id[c] for c in ids if isinstance(c, str) and c in by_id][: cfg.passages_k]
            hits_for[i] = [Hit(d.id, d.title, d.contents, 0.0) for d in found] or None
    return hits_for


def load_training_data(files: Sequence[str | Path], tokenizer: Any, cfg: TrainConfig,
                       index: str | Path | None = None, retrieval: Any = None) -> TrainingData:
    """Read every data file (see the package doc) into tokenized examples, in a deterministic order."""
    if not files:
        raise InputError("no data files given (--data FILE)")
    kinds = {str(p): data_file_kind(p) for p in files}
    corpora = [Path(p) for p, k in kinds.items() if k == "corpus"]
    question_files = [Path(p) for p, k in kinds.items() if k == "questions"]

    docs = list(iter_documents(corpora)) if corpora else []
    corpus = corpus_blocks(docs, tokenizer, cfg.seq_len, cfg.max_corpus_blocks)
    questions = []
    for qf in question_files:
        questions.extend(load_questions(qf)[: cfg.max_questions])
    hits_for = find_passages(questions, docs, cfg, index, retrieval)

    data = TrainingData(corpus=corpus, qa=[], files=kinds)
    for q, hits in zip(questions, hits_for, strict=True):
        exs = qa_examples(q, hits, tokenizer, cfg)
        if not exs:
            data.skipped_questions += 1
            continue
        data.no_passages += len(exs) == 1
        data.qa.extend(exs)
    if not data.corpus and not data.qa:
        raise InputError(f"no training examples in {', '.join(kinds)} (corpora too short for one block of "
                         f"{cfg.seq_len} tokens, or no question with a golden answer)")
    return data
