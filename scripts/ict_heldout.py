"""ICT's own task on pairs the training never saw: for held-out (sentence, rest-of-passage) pairs, the rank
of each sentence's own passage among all held-out passages, base MiniLM vs an ICT model.

usage: ict_heldout.py MODEL_DIR CORPUS... [--skip N] [--n N] [--seed S]
The pairs are `ict_pairs(corpus, seed=S)[skip:skip+n]`: with the seed and --max-pairs of the training run as
--seed and --skip they are disjoint from the training pairs (one pair per record, so also from its records)."""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import numpy as np
    import torch

    from expertrag.data.readers import iter_documents
    from expertrag.retrieval.embedder import Embedder
    from expertrag.retrieval.ict import ict_pairs

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("corpus", nargs="+")
    ap.add_argument("--skip", type=int, default=3200)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = ict_pairs(iter_documents(args.corpus), seed=args.seed)[args.skip:args.skip + args.n]
    out = {"pairs": len(pairs), "skip": args.skip, "seed": args.seed, "threads": args.threads,
           "load_start": os.getloadavg()[0]}
    for name in ("all-MiniLM-L6-v2", args.model):
        started = time.perf_counter()
        emb = Embedder(name)
        q = emb.encode([p.query for p in pairs])
        d = emb.encode([p.positive for p in pairs])
        scores = q @ d.T
        own = np.diag(scores)
        rank = (scores > own[:, None]).sum(1)  # 0 = its own passage first
        out[name] = {"top1": float((rank == 0).mean()), "top5": float((rank < 5).mean()),
                     "mrr": float((1.0 / (rank + 1)).mean()), "s": round(time.perf_counter() - started, 1)}
    out["load_end"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
