"""Issue 15 part 2 (partial): a knowledge slice and closed-book accuracy with / without its LoRA adapter.

    knowledge_slice.py prepare --questions Q.jsonl --subjects N --out DIR [--seed S]
        DIR/slice_corpus.jsonl (one fact passage per slice question, metadata.domain "slice"),
        DIR/slice_train.jsonl (the slice's questions as asked: the adapter's QA pairs),
        DIR/slice_paraphrased.jsonl (the same facts reworded: evaluation inside the slice),
        DIR/outside.jsonl (as many questions about other subjects: evaluation outside it)
    knowledge_slice.py mixed --questions Q.jsonl --subjects N --out DIR [--seed S] [--outside-train N]
        the mixed workload whose "known" half is the slice (RESULTS.md "Knowledge experts: the mixed workload"):
        DIR/kb_corpus.jsonl (one fact passage for every question of Q: the slice's facts with metadata.domain
        "slice", the others "kb"), DIR/slice_train.jsonl (the adapter's QA pairs, as `prepare`),
        DIR/gate_train.jsonl (the slice's questions as asked + --outside-train questions about other
        subjects: what a gate learns the boundary from), DIR/test.jsonl (both paraphrases of every slice
        question + twice as many questions about still other subjects), metadata.part naming each half
    knowledge_slice.py known --labels L.jsonl --questions Q.jsonl --n N --out FILE [--seed S] [--exclude D.jsonl]
        a seeded N of the questions whose label says the base model answered them closed-book (the damage
        check: does an adapter keep what the base model knew?), minus any about a subject of --exclude
    knowledge_slice.py eval --adapter ADAPTER_DIR --dataset D.jsonl [...] [--max-new-tokens 16] [--threads 1]
        closed-book (SmolLM2-135M-Instruct, native decoder, greedy) accuracy = a gold answer in the answer
        (SQuAD-normalised), without and with the adapter, question by question in one process.

The adapter itself comes from `expertrag index` + `expertrag expert train --qa` (RESULTS.md has the commands).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def prepare(args) -> None:
    from expertrag.data.knowledge_slice import knowledge_slice
    from expertrag.data.questions import load_questions

    sl = knowledge_slice(load_questions(args.questions), args.subjects, seed=args.seed, where=str(args.questions))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    q = lambda x: {"id": x.id, "question": x.question, "golden_answers": x.golden_answers, "metadata": x.metadata}  # noqa: E731
    write_jsonl(out / "slice_corpus.jsonl", [{"id": d.id, "title": d.title, "contents": d.contents,
                                              "metadata": d.metadata} for d in sl.passages])
    write_jsonl(out / "slice_train.jsonl", [q(x) for x in sl.train])
    write_jsonl(out / "slice_paraphrased.jsonl", [q(x) for x in sl.paraphrased])
    write_jsonl(out / "outside.jsonl", [q(x) for x in sl.outside])
    print(json.dumps({"subjects": len(sl.subjects), "slice_questions": len(sl.train), "outside": len(sl.outside),
                      "seed": args.seed, "out": str(out)}))


def mixed(args) -> None:
    """The mixed workload (expertrag.data.knowledge_slice.MixedWorkload) as files."""
    from expertrag.data.knowledge_slice import mixed_workload
    from expertrag.data.questions import load_questions

    w = mixed_workload(load_questions(args.questions), args.subjects, seed=args.seed, outside_train=args.outside_train,
                       where=str(args.questions))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    q = lambda x: {"id": x.id, "question": x.question, "golden_answers": x.golden_answers, "metadata": x.metadata}  # noqa: E731
    write_jsonl(out / "kb_corpus.jsonl", [{"id": d.id, "title": d.title, "contents": d.contents,
                                           "metadata": d.metadata} for d in w.passages])
    write_jsonl(out / "slice_train.jsonl", [q(x) for x in w.gate_train if x.metadata["part"] == "slice"])
    write_jsonl(out / "gate_train.jsonl", [q(x) for x in w.gate_train])
    write_jsonl(out / "test.jsonl", [q(x) for x in w.test])
    count = lambda xs, part: sum(x.metadata["part"] == part for x in xs)  # noqa: E731
    print(json.dumps({"subjects": len(w.slice.subjects), "slice_questions": len(w.slice.train),
                      "kb_passages": len(w.passages),
                      "gate_train": {"slice": count(w.gate_train, "slice"), "outside": count(w.gate_train, "outside")},
                      "test": {"slice_paraphrased": count(w.test, "slice"), "outside": count(w.test, "outside")},
                      "seed": args.seed, "out": str(out)}))


def known(args) -> None:
    import random

    from expertrag.data.questions import load_questions
    from expertrag.gate.labels import read_labels

    labels = read_labels(args.labels)
    excluded = {q.metadata.get("subject") for path in args.exclude for q in load_questions(path)} - {None}
    right = {r.id for r in labels if r.closed_correct}
    pool = [q for q in load_questions(args.questions)
            if q.id in right and q.metadata.get("subject") not in excluded]
    pick = random.Random(args.seed).sample(pool, min(args.n, len(pool)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(Path(args.out), [{"id": x.id, "question": x.question, "golden_answers": x.golden_answers,
                                  "metadata": x.metadata} for x in pick])
    print(json.dumps({"closed_correct_in_labels": len(right), "pool": len(pool), "picked": len(pick),
                      "seed": args.seed, "out": str(args.out)}))


def evaluate(args) -> None:
    import torch

    from expertrag.answers import contains_answer
    from expertrag.data.questions import load_questions
    from expertrag.experts.adapter import with_adapter
    from expertrag.model.config import ModelConfig
    from expertrag.model.generator import ExpertRAGGenerator
    from expertrag.model.prompts import closed_book_messages

    torch.set_num_threads(args.threads)
    gen = ExpertRAGGenerator.from_config(ModelConfig(backend="native"))
    result: dict = {"threads": args.threads, "max_new_tokens": args.max_new_tokens, "load_start": os.getloadavg()[0],
                    "datasets": {}}
    for path in args.dataset:
        qs = load_questions(path)[:args.limit]
        row: dict = {"questions": len(qs)}
        for label, folder in (("base", None), ("adapter", args.adapter)):
            started = time.perf_counter()
            right, examples = 0.0, []
            with with_adapter(gen, folder):
                for q in qs:
                    text = gen.generate(closed_book_messages(q.question), max_new_tokens=args.max_new_tokens,
                                        temperature=0.0).text
                    hit = contains_answer(text, q.golden_answers)
                    right += hit
                    if len(examples) < 3:
                        examples.append({"q": q.question, "answer": text, "gold": q.golden_answers[:2], "hit": hit})
            row[label] = {"accuracy": right / max(len(qs), 1), "right": right, "s": round(time.perf_counter() - started, 1),
                          "examples": examples}
        result["datasets"][str(path)] = row
    result["load_end"] = os.getloadavg()[0]
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--questions", type=Path, required=True)
    p.add_argument("--subjects", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("mixed")
    m.add_argument("--questions", type=Path, required=True)
    m.add_argument("--subjects", type=int, required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--outside-train", type=int, default=None)
    m.add_argument("--out", type=Path, required=True)
    k = sub.add_parser("known")
    k.add_argument("--labels", type=Path, required=True)
    k.add_argument("--questions", type=Path, required=True)
    k.add_argument("--n", type=int, required=True)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--exclude", type=Path, action="append", default=[])
    k.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("eval")
    e.add_argument("--adapter", type=Path, required=True)
    e.add_argument("--dataset", type=Path, action="append", required=True)
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--max-new-tokens", type=int, default=16)
    e.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    try:
        {"prepare": prepare, "mixed": mixed, "known": known, "eval": evaluate}[args.cmd](args)
    except Exception as err:  # an input error names its file/field; anything else is a bug worth its trace
        from expertrag.errors import ExpertRAGError

        if isinstance(err, ExpertRAGError):
            raise SystemExit(f"error: {err}") from None
        raise


if __name__ == "__main__":
    main()
