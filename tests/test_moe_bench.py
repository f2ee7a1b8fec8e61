import torch

from expertrag.bench.moe import run


def test_bench_smoke():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = run(tokens=32, repeats=1, warmup=0)
    finally:
        torch.set_num_threads(threads)
    assert r["ratio_vs_transformers"] > 0 and r["ours_tokens_per_s"] > 0
    assert r["max_abs_output_diff"] < 1e-5  # same weights, same routing, same output
    assert (r["hidden_size"], r["intermediate_size"], r["num_experts"], r["top_k"]) == (576, 1536, 4, 2)
