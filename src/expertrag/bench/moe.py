"""Forward+backward throughput of our MoELayer vs transformers' MixtralSparseMoeBlock, same shapes/weights.

Both layers get identical router and expert weights (copied from the Mixtral block), so they route the
same tokens to the same experts; the outputs are compared as a sanity check. The block is timed twice: as
built standalone (transformers' eager per-expert loop, `ratio_vs_transformers_loop`) and with its
`grouped_mm` experts backend (`ratio_vs_transformers_grouped_mm`). Timings are interleaved
(ours, theirs, ours, ...) after warm-up, and the median per-repeat time is used.
"""

from __future__ import annotations

import statistics
import time

import torch

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 576, 1536, 4, 2  # SmolLM2-135M FFN shape


def _mixtral_block(experts_implementation: str | None = None) -> torch.nn.Module:
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        router_jitter_noise=0.0,
    )
    # A standalone block has no experts implementation set -> transformers' eager per-expert loop
    # (and a warning); set it explicitly to keep that default and silence the warning.
    cfg._experts_implementation = experts_implementation or "eager"
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block


def _ours_from(block: torch.nn.Module) -> torch.nn.Module:
    from expertrag.moe import MoEConfig, MoELayer

    layer = MoELayer(MoEConfig(num_experts=EXPERTS, top_k=TOP_K), HIDDEN, INTERMEDIATE)
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        # Same layout as Mixtral: gate_up [E, 2I, H] (gate rows first), down [E, H, I].
        layer.experts.gate_up.copy_(block.experts.gate_up_proj)
        layer.experts.down.copy_(block.experts.down_proj)
    return layer


def _step(fn, x: torch.Tensor, grad: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    for p in params:
        p.grad = None
    x.grad = None
    t0 = time.perf_counter()
    out = fn(x)
    out.backward(grad)
    return time.perf_counter() - t0


def run(tokens: int = 2048, repeats: int = 10, warmup: int = 2, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    theirs = _mixtral_block()
    theirs_grouped = _mixtral_block("grouped_mm")
    theirs_grouped.load_state_dict(theirs.state_dict())
    ours = _ours_from(theirs)
    x = torch.randn(1, tokens, HIDDEN, requires_grad=True)
    grad = torch.randn(1, tokens, HIDDEN)

    def f_ours(h):
        return ours(h)[0]

    with torch.no_grad():
        diff = (f_ours(x) - theirs(x)).abs().max().item()

    runs = {
        "ours": (f_ours, list(ours.parameters())),
        "transformers": (theirs, list(theirs.parameters())),
        "transformers_grouped_mm": (theirs_grouped, list(theirs_grouped.parameters())),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + repeats):
        names = list(runs) if i % 2 == 0 else list(reversed(runs))  # alternate order against drift
        for name in names:
            fn, params = runs[name]
            t = _step(fn, x, grad, params)
            if i >= warmup:
                times[name].append(t)
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    return {
        "tokens": tokens,
        "repeats": repeats,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_experts": EXPERTS,
        "top_k": TOP_K,
        "threads": torch.get_num_threads(),
        "ours_tokens_per_s": tps["ours"],
        "transformers_tokens_per_s": tps["transformers"],
        "transformers_grouped_mm_tokens_per_s": tps["transformers_grouped_mm"],
        # "transformers" is the block as built standalone: its eager per-expert loop.
        "ratio_vs_transformers_loop": tps["ours"] / tps["transformers"],
        "ratio_vs_transformers_grouped_mm": tps["ours"] / tps["transformers_grouped_mm"],
        "max_abs_output_diff": diff,
    }
