"""Generation speed of our decoder vs transformers' `generate`, same SmolLM2 weights, greedy.

Both run the same chat prompts with the same `max_new_tokens` (each stops early only at EOS), one
prompt at a time (batch 1, as the pipeline answers questions) and all prompts as one left-padded batch.
After a warm-up, the two are interleaved round by round (alternating who goes first) so machine load
hits both alike; tokens/s = generated tokens / total seconds. Output token ids are compared.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "Who wrote the novel Pride and Prejudice?",
    "Give me a short tip for learning a new language.",
    "What does a mixture-of-experts language model do?",
    "Describe a cat to someone who has never seen one.",
]


def _hf_generate(hf: Any, ids: Any, mask: Any, max_new_tokens: int, pad_id: int, eos: list[int]) -> list[list[int]]:
    out = hf.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=pad_id, eos_token_id=eos)
    rows = []
    for seq in out[:, ids.shape[1]:].tolist():  # trim the padding after each row's EOS
        kept = []
        for t in seq:
            kept.append(t)
            if t in eos:
                break
        rows.append(kept)
    return rows


def run(max_new_tokens: int = 32, num_prompts: int = 4, rounds: int = 3) -> dict:
    import torch

    from expertrag.model.generation import encode_prompts, generate, left_pad
    from expertrag.model.loading import load_hf_model, load_model

    model, tok = load_model()
    hf = load_hf_model()
    prompts = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(num_prompts)]
    encoded = encode_prompts(tok, prompts)
    pad_id = model.args.pad_token_id if model.args.pad_token_id is not None else tok.eos_token_id
    eos = sorted({tok.eos_token_id, *([model.args.eos_token_id] if isinstance(model.args.eos_token_id, int)
                                      else model.args.eos_token_id or [])})
    singles = [left_pad([ids], pad_id) for ids in encoded]
    batch = left_pad(encoded, pad_id)

    def ours_single(i: int) -> list[int]:
        return generate(model, tok, input_ids=[encoded[i]], max_new_tokens=max_new_tokens).token_ids[0]

    def theirs_single(i: int) -> list[int]:
        return _hf_generate(hf, *singles[i], max_new_tokens, pad_id, eos)[0]

    def ours_batch() -> list[list[int]]:
        return generate(model, tok, input_ids=encoded, max_new_tokens=max_new_tokens).token_ids

    def theirs_batch() -> list[list[int]]:
        return _hf_generate(hf, *batch, max_new_tokens, pad_id, eos)

    # Warm-up (allocator, kernels, lazy imports) for both.
    ours_single(0)
    theirs_single(0)
    ours_batch()
    theirs_batch()

    t = {"ours": 0.0, "theirs": 0.0, "ours_batch": 0.0, "theirs_batch": 0.0}
    n = dict.fromkeys(t, 0)
    identical = True
    identical_batch = True

    def timed(key: str, fn: Any, *a: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*a)
        t[key] += time.perf_counter() - t0
        n[key] += sum(len(r) for r in out) if out and isinstance(out[0], list) else len(out)
        return out

    for r in range(rounds):
        for i in range(num_prompts):
            if (r + i) % 2 == 0:
                a, b = timed("ours", ours_single, i), timed("theirs", theirs_single, i)
            else:
                b, a = timed("theirs", theirs_single, i), timed("ours", ours_single, i)
            identical &= a == b
        if r % 2 == 0:
            a, b = timed("ours_batch", ours_batch), timed("theirs_batch", theirs_batch)
        else:
            b, a = timed("theirs_batch", theirs_batch), timed("ours_batch", ours_batch)
        identical_batch &= a == b

    tps = {k: n[k] / t[k] for k in t}
    return {
        "ratio_vs_transformers": tps["ours"] / tps["theirs"],
        "identical_outputs": bool(identical),
        "ours_tokens_per_s": tps["ours"],
        "transformers_tokens_per_s": tps["theirs"],
        "batched_ratio_vs_transformers": tps["ours_batch"] / tps["theirs_batch"],
        "batched_identical_outputs": bool(identical_batch),
        "ours_batched_tokens_per_s": tps["ours_batch"],
        "transformers_batched_tokens_per_s": tps["theirs_batch"],
        "generated_tokens_per_impl": n["ours"],
        "max_new_tokens": max_new_tokens,
        "num_prompts": num_prompts,
        "rounds": rounds,
        "dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
    }
