import math

import pytest
import torch

from expertrag.bench.moe import run


def test_bench_smoke():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = run(tokens=32, repeats=1, warmup=0)
    finally:
        torch.set_num_threads(threads)
    # Each ratio is ours over its own baseline: the per-expert loop, and the grouped_mm backend.
    pairs = {"ratio_vs_transformers_loop": "transformers_tokens_per_s",
             "ratio_vs_transformers_grouped_mm": "transformers_grouped_mm_tokens_per_s"}
    for ratio_key, theirs_key in pairs.items():
        assert math.isfinite(r[ratio_key]) and math.isfinite(r[theirs_key]) and r[theirs_key] > 0
        assert r[ratio_key] == pytest.approx(r["ours_tokens_per_s"] / r[theirs_key], rel=1e-12)
    assert "ratio_vs_transformers" not in r  # the old name did not say which baseline
    assert r["max_abs_output_diff"] < 1e-5  # same weights, same routing, same output
    assert (r["hidden_size"], r["intermediate_size"], r["num_experts"], r["top_k"]) == (576, 1536, 4, 2)
