"""What an expert's LoRA adapter costs and changes at run time: attach/detach time, decoding speed with it
attached (unmerged) vs the base model, interleaved so load changes hit both alike, and optionally perplexity
on passages of another corpus (what the adapter does off its domain)."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from expertrag.errors import InputError


def run(adapter: str | Path, *, corpus: str | Path | None = None, passages: int = 60, blocks: int = 50,
        tokens: int = 32, rounds: int = 3, switches: int = 5, threads: int = 1) -> dict[str, Any]:
    import torch

    from expertrag.experts.adapter import detach, load_adapter, mean_nll, read_adapter, with_adapter
    from expertrag.model.generator import ExpertRAGGenerator
    from expertrag.model.train.examples import corpus_blocks

    torch.set_num_threads(threads)
    read_adapter(adapter)  # a bad folder fails before the model loads
    gen = ExpertRAGGenerator.from_config()
    prompt = [{"role": "user", "content": "What is the most common treatment for type 2 diabetes?"}]
    gen.generate(prompt, max_new_tokens=4)  # warm-up
    att, det = [], []
    for _ in range(switches):
        t = time.perf_counter()
        load_adapter(gen.model, adapter)
        att.append(time.perf_counter() - t)
        t = time.perf_counter()
        detach(gen.model)
        det.append(time.perf_counter() - t)
    rates: dict[str, list[float]] = {"base": [], "adapter": []}
    for _ in range(rounds):
        for kind in ("base", "adapter"):
            with with_adapter(gen, adapter if kind == "adapter" else None):
                t = time.perf_counter()
                g = gen.generate(prompt, max_new_tokens=tokens, stop=[])
                rates[kind].append(len(g.token_ids) / (time.perf_counter() - t))
    out: dict[str, Any] = {
        "adapter": str(adapter), "threads": threads, "attach_ms_median": round(statistics.median(att) * 1000, 1),
        "detach_ms_median": round(statistics.median(det) * 1000, 1),
        "tokens_per_s_base": round(statistics.median(rates["base"]), 2),
        "tokens_per_s_adapter": round(statistics.median(rates["adapter"]), 2),
    }
    if corpus is not None:
        path = Path(corpus)
        if not path.is_file():
            raise InputError("no such corpus file", path=path)
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if len(rows) >= passages:
                    break
                try:
                    r = json.loads(line)
                    rows.append(SimpleNamespace(title=r.get("title", ""), contents=r["contents"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InputError("not a corpus row with `contents`", path=path, line=n) from None
        tok = gen.tokenizer
        ex = corpus_blocks(rows, tok, 128)[:blocks]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        before, n_tok = mean_nll(gen.model, ex, pad)
        with with_adapter(gen, adapter):
            after, _ = mean_nll(gen.model, ex, pad)
        out.update(corpus=str(path), corpus_blocks=len(ex), corpus_tokens=n_tok,
                   corpus_perplexity_base=round(math.exp(before), 3),
                   corpus_perplexity_adapter=round(math.exp(after), 3))
    return out
