"""`bench generate --backends`: the generator backends on the same prompts, per phase, interleaved.

Two prompts through each backend's own `generate` (the pipeline's call, greedy, no stop strings): a
closed-book chat prompt (~50 tokens) and an open-book one with 5 passages (~700 tokens), 24 new tokens.
Per backend and thread count: end-to-end seconds per answer (the 24-token call); prefill tokens/s from a
1-token call (prompt tokens / its time: the prompt forward plus one sampling step); decode tokens/s =
23 / (t_24 - t_1), both on the open-book prompt, where prefill dominates t_1. After a warm-up, rounds
interleave the backends (alternating who goes first) so machine load hits each alike. Peak RSS is read
from /proc (VmRSS after loading each backend, over the process's baseline; VmHWM of the whole run): one
process holds every backend, so per-backend peaks are upper bounds of their own. Greedy outputs are
compared token for token with the native backend's.

A backend may be named with a llama.cpp file type, `llamacpp:q8_0` (see `model.gguf_type`), to compare
re-encodings of the same GGUF, and with an engine for long prompts, `llamacpp:q8_0+native`
(`model.long_prompt_backend`: the 5-passage prompt runs there, the closed-book one on llama.cpp). llama.cpp reuses the cached prefix of the previous prompt, which would make
repeated prompts free: its cache is dropped before every timed call, so each pays its full prefill as the
other backends do. For llamacpp the run also times llama-cpp-python's own `create_completion` on the same
tokens (greedy, same length): `overhead_vs_raw` is our call's time over the library's.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

from expertrag.model.prompts import closed_book_messages, open_book_messages
from expertrag.retrieval.types import Hit

QUESTION = "Who designed the Eiffel Tower, and when was it finished?"
_PASSAGE = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
            "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
            "Locally nicknamed the Iron Lady, it was constructed as the centrepiece of the 1889 World's Fair, "
            "and to crown the centennial anniversary of the French Revolution. Although initially criticised by "
            "some of France's leading artists and intellectuals for its design, it has since become a global "
            "cultural icon of France and one of the most recognisable structures in the world. Passage {n}.")
HITS = [Hit(f"p{n}", f"Eiffel Tower ({n})", _PASSAGE.format(n=n), 1.0 / n) for n in range(1, 6)]
NEW_TOKENS = 24


def backend_update(name: str) -> dict[str, Any]:
    """`native`, `llamacpp:q8_0` (a llama.cpp file type) or `llamacpp:q8_0+native` (long prompts to native:
    model.long_prompt_backend) -> the model-section fields that name it."""
    engine, _, long = name.partition("+")
    kind, _, gguf_type = engine.partition(":")
    update: dict[str, Any] = {"backend": kind}
    if gguf_type:
        update["gguf_type"] = gguf_type
    if long:
        update["long_prompt_backend"] = long
    return update


def _rss_mb(field: str = "VmRSS") -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(backends: Sequence[str], threads: Sequence[int] = (1, 2), rounds: int = 3, config: Any = None,
        new_tokens: int = NEW_TOKENS) -> dict:
    """`new_tokens`: the answer length timed (the command's is NEW_TOKENS; a test needs only a few)."""
    import torch

    from expertrag.pipeline.build import PipelineSections, load_generator

    base = config or PipelineSections()
    closed = closed_book_messages(QUESTION)
    opened = open_book_messages(QUESTION, HITS, 10_000)
    gens: dict[str, Any] = {}
    rss: dict[str, float | None] = {}
    for name in backends:
        before = _rss_mb()
        update = backend_update(name)
        model = base.model.model_copy(update=update)
        gens[name] = load_generator(PipelineSections(base.retrieval, model, base.gate, base.pipeline))
        after = _rss_mb()
        rss[name] = None if before is None or after is None else after - before

    def fresh(name: str) -> None:
        forget = getattr(gens[name], "forget_cache", None)  # llamacpp: drop the cached prompt prefix
        if forget is not None:
            forget()

    def call(name: str, prompt: Any, n: int):
        fresh(name)
        t = time.perf_counter()
        g = gens[name].generate(prompt, max_new_tokens=n, stop=[], temperature=0.0)
        return time.perf_counter() - t, g

    def raw(name: str, prompt: Any, n: int) -> float | None:
        """llama-cpp-python's own completion of the same tokens (the library without us)."""
        g = gens[name]
        if not hasattr(g, "llm"):
            return None
        ids = g.encode(prompt)
        fresh(name)
        t = time.perf_counter()
        out = g.llm.create_completion(ids, max_tokens=n, temperature=0.0, top_k=1)
        dt = time.perf_counter() - t
        if out["usage"]["completion_tokens"] != n:  # it stopped at EOS: not the same work
            return None
        return dt

    per: dict[int, dict[str, dict[str, list]]] = {}
    outputs: dict[str, dict[str, list[int]]] = {n: {} for n in backends}
    prompt_tokens: dict[str, int] = {}
    for th in threads:
        torch.set_num_threads(th)
        for name in backends:
            set_threads = getattr(gens[name], "set_threads", None)  # llama.cpp keeps its own thread pool
            if set_threads is not None:
                set_threads(th)
        for name in backends:  # warm-up at this thread count
            call(name, closed, 2)
            call(name, opened, 2)
        acc = {name: {"closed": [], "open": [], "open1": [], "raw_closed": [], "raw_open": []} for name in backends}
        for r in range(rounds):
            order = list(backends) if r % 2 == 0 else list(reversed(backends))
            for name in order:
                t, g = call(name, closed, new_tokens)
                acc[name]["closed"].append(t)
                outputs[name]["closed"] = g.token_ids
                t, g = call(name, opened, new_tokens)
                acc[name]["open"].append(t)
                outputs[name]["open"] = g.token_ids
                prompt_tokens["open"] = g.prompt_tokens
                t, g1 = call(name, opened, 1)
                acc[name]["open1"].append(t)
                for key, prompt in (("raw_closed", closed), ("raw_open", opened)):
                    t_raw = raw(name, prompt, new_tokens)
                    if t_raw is not None:
                        acc[name][key].append(t_raw)
        per[th] = acc
    prompt_tokens["closed"] = call(backends[0], closed, 1)[1].prompt_tokens

    table: dict[str, dict[int, dict[str, float]]] = {}
    for name in backends:
        table[name] = {}
        for th in threads:
            a = per[th][name]
            c, o, o1 = (statistics.median(a[k]) for k in ("closed", "open", "open1"))
            table[name][th] = {
                "closed_book_s": c, "open_book_s": o, "prefill_tok_s": prompt_tokens["open"] / o1,
                "decode_tok_s": (new_tokens - 1) / max(o - o1, 1e-9),
            }
            if a["raw_closed"] and a["raw_open"]:
                rc, ro = statistics.median(a["raw_closed"]), statistics.median(a["raw_open"])
                table[name][th].update({"raw_closed_book_s": rc, "raw_open_book_s": ro,
                                        "overhead_vs_raw": (c + o) / (rc + ro)})
    best = {name: min(threads, key=lambda th, n=name: table[n][th]["closed_book_s"] + table[n][th]["open_book_s"])
            for name in backends}
    summary = {name: {**table[name][best[name]], "threads": best[name], "rss_after_load_mb": rss[name]}
               for name in backends}
    ref = summary.get("native")
    out: dict[str, Any] = {"backends": summary,
                           "by_threads": {name: {str(th): v for th, v in table[name].items()} for name in backends}}
    if ref is not None:
        others = {n: ref["closed_book_s"] / s["closed_book_s"] for n, s in summary.items()}
        fastest = max(others, key=others.get)
        out["best_closed_book_speedup_vs_native"] = others[fastest]
        out["best_closed_book_backend"] = fastest
        out["best_open_book_time_ratio_vs_native"] = summary[fastest]["open_book_s"] / ref["open_book_s"]
        out["greedy_identical_to_native"] = {n: outputs[n] == outputs["native"] for n in backends if n != "native"}
    out.update({
        "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "rounds": rounds, "threads_measured": list(threads),
        "peak_rss_mb_process": _rss_mb("VmHWM"), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "dtype": base.model.dtype,
    })
    return out
