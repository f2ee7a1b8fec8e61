"""Deriving gate labels from the model itself: answer closed-book and open-book, compare with the gold.

`retrieve` where only the open-book answer is right, `no_retrieve` where the closed-book one is (retrieval
cannot help, and may hurt: SKR's ir_worse), `both_wrong` otherwise. Correctness is PopQA-style: a gold
answer contained in the normalised prediction. Results are appended batch by batch and a rerun skips ids
already labelled, so a long labelling run can be stopped and resumed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from expertrag.answers import contains_answer
from expertrag.data.types import Question
from expertrag.gate.labels import LabelRecord, derive_label
from expertrag.model.backend import generate_all
from expertrag.model.prompts import closed_book_messages, open_book_messages
from expertrag.pipeline.rag import ExpertRAG, PipelineGateContext


def already_labelled(path: Path) -> set[str]:
    if not path.exists():
        return set()
    done = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                done.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line from a killed run: that question is redone
    return done


def trace(g) -> dict[str, list]:
    """A generation's per-token record for the label file (5 decimals: far below the gate's resolution)."""
    return {"token_ids": [int(t) for t in g.token_ids],
            "logprobs": [round(float(x), 5) for x in g.logprobs],
            "entropies": [round(float(x), 5) for x in g.entropies]}


def open_for_append(out: Path):
    """`out` opened for appending label records. A torn last line (a run killed mid-write) is cut off first:
    the next record would otherwise be glued to it and lost with it, and its question redone on every rerun."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and out.stat().st_size:
        with open(out, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(out, "a", encoding="utf-8")


def label_batch(rag: ExpertRAG, questions: Sequence[Question]) -> list[LabelRecord]:
    """One batch's label records, in the order of `questions` (each with gold answers): both books are
    generated for the whole batch at once. `label_questions` and the Ray workers (pipeline/ray_work.py)
    both call this, so a batch gives the same records wherever it runs."""
    cfg = rag.config
    hits = [PipelineGateContext(rag, q.question, dict(q.metadata), None).retrieve(cfg.k) for q in questions]
    closed = generate_all(rag.generator, [closed_book_messages(q.question) for q in questions],
                          max_new_tokens=cfg.max_new_tokens, stop=cfg.stop)
    opened = generate_all(
        rag.generator, [open_book_messages(q.question, h, cfg.passage_max_chars) for q, h in zip(questions, hits, strict=True)],
        max_new_tokens=cfg.max_new_tokens, stop=cfg.stop)
    records = []
    for q, c, o in zip(questions, closed, opened, strict=True):
        closed_ok = bool(contains_answer(c.text, q.golden_answers))
        open_ok = bool(contains_answer(o.text, q.golden_answers))
        records.append(LabelRecord(id=q.id, question=q.question, label=derive_label(closed_ok, open_ok),
                                   closed_correct=closed_ok, open_correct=open_ok, closed_answer=c.text,
                                   open_answer=o.text, metadata=dict(q.metadata), closed_trace=trace(c)))
    return records


def labelling_todo(questions: Sequence[Question], out: Path) -> list[Question]:
    """The questions still to label into `out`: those with gold answers whose id is not in it yet."""
    done = already_labelled(out)
    return [q for q in questions if q.golden_answers and q.id not in done]


def label_questions(rag: ExpertRAG, questions: Sequence[Question], out: Path, *, batch_size: int = 8,
                    progress: bool | None = None) -> dict[str, int]:
    """Label `questions` (those with gold answers) into the JSONL file `out`; returns label counts."""
    todo = labelling_todo(questions, out)
    counts: dict[str, int] = {}
    bar = tqdm(total=len(todo), desc="label", unit="q", disable=None if progress is None else not progress)
    with open_for_append(out) as f:
        for i in range(0, len(todo), batch_size):
            part = todo[i:i + batch_size]
            for record in label_batch(rag, part):
                counts[record.label] = counts.get(record.label, 0) + 1
                f.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(part))
    bar.close()
    return counts


def gate_examples(rag: ExpertRAG, records: Sequence[LabelRecord], *, probe: bool = True,
                  progress: bool | None = None) -> list:
    """Features of each labelled question, computed exactly as at answer time (same context, same probe)."""
    from expertrag.gate.features import probe_features
    from expertrag.gate.train import GateExample

    examples = []
    for r in tqdm(records, desc="features", unit="q", disable=None if progress is None else not progress):
        ctx = PipelineGateContext(rag, r.question, dict(r.metadata), None)
        p = ctx.probe() if probe else None
        examples.append(GateExample(
            id=r.id, label=r.label, query_features=ctx.query_features(),
            probe_features=probe_features(p) if p is not None else None,
            query_embedding=ctx.query_embedding(), hidden=p.hidden if p is not None else None,
            metadata=dict(r.metadata), closed_correct=r.closed_correct, open_correct=r.open_correct,
        ))
    return examples


def label_settings(rag: ExpertRAG, model: dict) -> dict:
    """What decides a label (model set-up, index, prompts, decoding): recorded beside every label file so
    labels made with other settings are never mixed into it by a resumed run."""
    cfg, m = rag.config, rag.index.manifest
    return {
        "model": model,
        "index": {"dir": str(rag.index.dir), "generation": m.generation, "passages": m.passages,
                  "embedder": m.embedder, "embed_backend": m.extra.get("embed_backend", "torch"),
                  "created_at": m.created_at, "dense": m.files.get(m.dense_file)},
        "prompts": {"closed_book": closed_book_messages("{question}"),
                    "open_book": open_book_messages("{question}", [], cfg.passage_max_chars)},
        "k": cfg.k, "search_mode": cfg.search_mode, "passage_max_chars": cfg.passage_max_chars,
        "max_new_tokens": cfg.max_new_tokens, "stop": list(cfg.stop), "decoding": "greedy",
        "correct": "a gold answer contained in the normalised answer (expertrag.answers.contains_answer)",
    }
