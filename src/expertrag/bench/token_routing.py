"""Per-input vs per-token routing among domain experts, by held-out perplexity per domain.

For each expert (name, domain) of an index: its domain's public passages, split by document as
`expert train` splits them (same seed and grouping, so the held-out documents are ones its adapter never
saw). Scored on each domain's held-out blocks: the base model; per-input routing with the oracle domain
(the question's own expert's full adapter, `with_adapter`); per-token routing (`experts.token_routing`: the
adapters' MLP deltas as LoRA experts, routers trained on the training blocks of all domains mixed), before
and after router training. The oracle is an upper bound for any per-input router.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any


def run(index: str | Path, experts: list[tuple[str, str]], *, steps: int = 50, lr: float = 5e-3, top_k: int = 2,
        heldout: float = 0.1, heldout_by: str | None = None, seq_len: int = 128, max_blocks: int = 50,
        seed: int = 0, threads: int = 1) -> dict[str, Any]:
    import torch

    from expertrag.experts.adapter import mean_nll, split_by_document, with_adapter
    from expertrag.experts.token_routing import token_routed, train_router
    from expertrag.model.generator import ExpertRAGGenerator
    from expertrag.model.train.examples import corpus_blocks
    from expertrag.retrieval.index import Index

    torch.set_num_threads(threads)
    idx = Index(index, verify=False)
    try:
        splits = {}
        for _, domain in experts:
            rows = idx.store.allowed_rowids(idx.generation, domains=[domain], groups=())
            passages = sorted(idx.store.get(rows.tolist()).values(), key=lambda p: p.rowid)
            splits[domain] = split_by_document(passages, heldout, seed, heldout_by)
    finally:
        idx.close()
    gen = ExpertRAGGenerator.from_config()
    tok = gen.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    held = {d: corpus_blocks(h, tok, seq_len)[:max_blocks] for d, (_, h) in splits.items()}
    train = [b for d, (t, _) in splits.items() for b in corpus_blocks(t, tok, seq_len)]
    folders = [Path(index) / "experts" / name / "adapter" for name, _ in experts]

    def ppl(model, d):
        return round(math.exp(mean_nll(model, held[d], pad)[0]), 3)

    out: dict[str, Any] = {"experts": [n for n, _ in experts], "heldout_blocks": {d: len(b) for d, b in held.items()},
                           "router_train_blocks": len(train), "steps": steps, "lr": lr, "top_k": top_k, "threads": threads}
    rows: dict[str, dict[str, float]] = {d: {} for d in held}
    for d in held:
        rows[d]["base"] = ppl(gen.model, d)
    for (name, _), folder in zip(experts, folders, strict=True):
        with with_adapter(gen, folder):
            for d2 in held:
                rows[d2][f"adapter:{name}"] = ppl(gen.model, d2)
    for name, d in experts:
        rows[d]["per_input_oracle"] = rows[d][f"adapter:{name}"]
    routed = token_routed(copy.deepcopy(gen.model), folders, top_k=top_k)
    for d in held:
        rows[d]["per_token_untrained_router"] = ppl(routed, d)
    t = time.perf_counter()
    report = train_router(routed, train, pad, steps=steps, lr=lr, seed=seed)
    out["router_seconds"] = round(time.perf_counter() - t, 1)
    out["router_trainable_parameters"] = report["trainable_parameters"]
    for d in held:
        rows[d]["per_token"] = ppl(routed, d)
    out["perplexity"] = rows
    return out
