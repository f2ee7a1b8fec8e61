"""`bench upcycled` runs end to end on a small budget."""

import pytest


@pytest.mark.slow
def test_bench_upcycled_small(smollm2_dir):
    from expertrag.bench.upcycled import run

    r = run(max_new_tokens=4, num_prompts=1, rounds=1)
    assert r["identical_outputs"]  # untrained upcycled model == dense model
    assert r["tokens_per_s_ratio"] > 0 and r["generated_tokens_per_model"] > 0
    assert 1.0 < r["param_bytes_ratio"] < 1.2
    assert r["upcycled_trainable_bytes"] < 0.2 * r["dense_param_bytes"]
    # Measured from the written file: the fp16 deltas plus the safetensors header and moe.json.
    assert 2 * r["upcycled_trainable_params"] < r["checkpoint_bytes_fp16"] <= 20e6
