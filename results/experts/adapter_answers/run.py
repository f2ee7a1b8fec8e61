"""Technology expert with vs without its LoRA adapter, on the LFRQA technology questions whose gold answer
passage is in the adapter's held-out documents (it never trained on them). Routed by the metadata hint
(both experts own the technology domain), policy always, k=5, 48 new tokens, 1 thread."""
import json, sys, time
import torch
torch.set_num_threads(1)
from expertrag.config import ExpertRAGConfig
from expertrag.experts.registry import ExpertRecord, ExpertRegistry
from expertrag.eval.metrics import token_f1
from expertrag.eval.expert_routing import rouge_l
from expertrag.pipeline.build import load_pipeline
from expertrag.retrieval.index import Index
from expertrag.experts.adapter import split_by_document

idx_dir = "/tmp/e2/idxB"
cfg = ExpertRAGConfig.load("/tmp/e2/md.yaml")
idx = Index("/tmp/e2/polidx_copy", verify=False)
rowids = idx.store.allowed_rowids(idx.generation, domains=["technology"], groups=())
ps = sorted(idx.store.get(rowids.tolist()).values(), key=lambda p: p.rowid)
train_p, held_p = split_by_document(ps, 0.1, 0, None)
held = {p.doc_id for p in held_p}; trained = {p.doc_id for p in train_p}
qs = [json.loads(l) for l in open("/work/shared/data/questions/lfrqa_domains.jsonl")]
qs = [q for q in qs if q["metadata"]["domain"] == "technology" and set(q["metadata"]["gold_passage_ids"]) <= held
      and not set(q["metadata"]["gold_passage_ids"]) & trained]
print(len(qs), "clean technology questions", file=sys.stderr)
reg = ExpertRegistry(idx_dir)
snap = reg.snapshot()
reg.add([ExpertRecord(name="technology-base", domain="technology")])
rag = load_pipeline(idx_dir, cfg, "always")
rows = []
for q in qs:
    row = {"id": q["id"]}
    for name in ("technology", "technology-base"):
        t = time.perf_counter()
        a = rag.answer(q["question"], metadata={"expert": name})
        row[name] = {"f1": token_f1(a.text, q["golden_answers"]), "rouge_l": max(rouge_l(a.text, g) for g in q["golden_answers"]),
                     "ms": (time.perf_counter() - t) * 1000, "adapter_applied": a.routing["adapter_applied"],
                     "gold_retrieved": bool(set(q["metadata"]["gold_passage_ids"]) & {p["id"].split("#")[0] for p in a.passages}),
                     "text": a.text}
    rows.append(row)
    print(json.dumps(row), flush=True)
def mean(k, n): return sum(r[n][k] for r in rows) / len(rows)
summary = {n: {"token_f1": mean("f1", n), "rouge_l": mean("rouge_l", n), "ms": mean("ms", n),
               "gold_retrieved": mean("gold_retrieved", n), "adapter_applied": mean("adapter_applied", n)}
           for n in ("technology", "technology-base")}
summary["n"] = len(rows)
summary["adapter_better"] = sum(r["technology"]["f1"] > r["technology-base"]["f1"] for r in rows)
summary["base_better"] = sum(r["technology"]["f1"] < r["technology-base"]["f1"] for r in rows)
print(json.dumps(summary))
