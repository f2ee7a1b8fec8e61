"""An expert with vs without its LoRA adapter, on the labelled questions of its domain whose gold answer
passages all lie in the adapter's held-out documents (it never trained on them). Each question is answered
twice on the same passages and prompt, routed by the metadata hint: to EXPERT (its adapter) and to
EXPERT-base (same domain, no adapter; registered in INDEX by this script). Policy always; k and
max_new_tokens from the config; 1 torch thread. One JSON line per question on stdout, the summary last.

    OMP_NUM_THREADS=1 python results/experts/adapter_answers/run.py --index IDX --config md.yaml \
        --split-index POLIDX --questions ../shared/data/questions/lfrqa_domains.jsonl > answers.jsonl

INDEX: the index with the experts and the router, where EXPERT has its adapter (`expert add --adapter`).
--split-index: the index the adapter was trained on (`expert train --index`); its EXPERT-domain passages,
split as `expert train` split them (--heldout, --seed, --heldout-by: give the values of that run), say which
documents were held out.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from expertrag.config import ExpertRAGConfig
from expertrag.data.questions import load_questions
from expertrag.eval.expert_routing import rouge_l
from expertrag.eval.metrics import token_f1
from expertrag.experts.adapter import split_by_document
from expertrag.experts.registry import ExpertRecord, ExpertRegistry
from expertrag.pipeline.build import load_pipeline
from expertrag.retrieval.index import Index


def args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", type=Path, required=True, help="index with the experts; EXPERT carries the adapter")
    p.add_argument("--config", type=Path, required=True, help="YAML config (RESULTS.md: md.yaml)")
    p.add_argument("--split-index", type=Path, required=True, help="the index the adapter was trained on")
    p.add_argument("--questions", type=Path, required=True, help="labelled questions (metadata.domain, "
                                                                   "metadata.gold_passage_ids)")
    p.add_argument("--expert", default="technology", help="the expert with the adapter (default technology)")
    p.add_argument("--domain", default=None, help="its domain (default: the expert's name)")
    p.add_argument("--heldout", type=float, default=0.1, help="as in that `expert train` run (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="as in that `expert train` run (default 0)")
    p.add_argument("--heldout-by", default=None, help="as in that `expert train` run (default: doc_id)")
    return p.parse_args()


def main() -> None:
    a = args()
    torch.set_num_threads(1)
    domain = a.domain or a.expert
    base_name = f"{a.expert}-base"
    cfg = ExpertRAGConfig.load(a.config)
    split = Index(a.split_index, verify=False)
    rowids = split.store.allowed_rowids(split.generation, domains=[domain], groups=())
    ps = sorted(split.store.get(rowids.tolist()).values(), key=lambda p: p.rowid)
    train_p, held_p = split_by_document(ps, a.heldout, a.seed, a.heldout_by)
    held, trained = {p.doc_id for p in held_p}, {p.doc_id for p in train_p}
    qs = [q for q in load_questions(a.questions) if q.metadata.get("domain") == domain
          and set(q.metadata["gold_passage_ids"]) <= held and not set(q.metadata["gold_passage_ids"]) & trained]
    print(len(qs), f"clean {domain} questions", file=sys.stderr)
    # replace: a rerun on the same index finds the base expert from the last run
    ExpertRegistry(a.index).add([ExpertRecord(name=base_name, domain=domain)], replace=True)
    rag = load_pipeline(a.index, cfg, "always")
    rows = []
    for q in qs:
        row = {"id": q.id}
        gold = set(q.metadata["gold_passage_ids"])
        for name in (a.expert, base_name):
            t = time.perf_counter()
            ans = rag.answer(q.question, metadata={"expert": name})
            row[name] = {"f1": token_f1(ans.text, q.golden_answers),
                         "rouge_l": max(rouge_l(ans.text, g) for g in q.golden_answers),
                         "ms": (time.perf_counter() - t) * 1000, "adapter_applied": ans.routing["adapter_applied"],
                         "gold_retrieved": bool(gold & {p["id"].split("#")[0] for p in ans.passages}),
                         "text": ans.text}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def mean(k: str, n: str) -> float:
        return sum(r[n][k] for r in rows) / len(rows)

    summary: dict = {n: {"token_f1": mean("f1", n), "rouge_l": mean("rouge_l", n), "ms": mean("ms", n),
                         "gold_retrieved": mean("gold_retrieved", n), "adapter_applied": mean("adapter_applied", n)}
                     for n in (a.expert, base_name)}
    summary["n"] = len(rows)
    summary["adapter_better"] = sum(r[a.expert]["f1"] > r[base_name]["f1"] for r in rows)
    summary["base_better"] = sum(r[a.expert]["f1"] < r[base_name]["f1"] for r in rows)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
