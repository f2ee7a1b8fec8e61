"""`bench generate --backends`: one short round on the real SmolLM2 through native and transformers."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_backends_bench_reports_every_phase_and_compares_outputs(smollm2_dir):
    from expertrag.bench.backends import run

    # 8 new tokens, not the command's 24: the phases and the greedy comparison are the same, decoding is 3x shorter
    r = run(["native", "transformers"], threads=[1], rounds=1, new_tokens=8)
    assert r["new_tokens"] == 8
    for name in ("native", "transformers"):
        b = r["backends"][name]
        assert b["threads"] == 1 and b["open_book_s"] > b["closed_book_s"] > 0
        assert b["prefill_tok_s"] > 0 and b["decode_tok_s"] > 0
    assert 600 <= r["prompt_tokens"]["open"] <= 900 and 30 <= r["prompt_tokens"]["closed"] <= 80
    assert r["best_closed_book_speedup_vs_native"] >= 1.0 and r["best_open_book_time_ratio_vs_native"] > 0
    assert r["greedy_identical_to_native"] == {"transformers": True}  # same fp32 weights, greedy


@pytest.mark.skipif(not __import__("expertrag.model.llamacpp_backend", fromlist=["available"]).available(),
                    reason="llama-cpp-python is not installed (optional: `make llamacpp`)")
def test_llamacpp_variants_and_the_raw_library_in_one_run(smollm2_dir):
    from expertrag.bench.backends import run

    r = run(["native", "llamacpp", "llamacpp+native"], threads=[1], rounds=1, new_tokens=8)
    raw = r["backends"]["llamacpp"]
    assert raw["raw_closed_book_s"] > 0 and raw["overhead_vs_raw"] > 0  # the library itself, same tokens
    routed = r["backends"]["llamacpp+native"]
    assert "raw_closed_book_s" not in routed and routed["open_book_s"] > 0
    assert set(r["greedy_identical_to_native"]) == {"llamacpp", "llamacpp+native"}
