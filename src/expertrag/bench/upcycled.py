"""Cost of upcycling: memory and greedy generation speed of the upcycled MoE model vs the dense model.

Both are SmolLM2-135M-Instruct in one process: the dense model, and a copy upcycled with the demo layout
(4 LoRA experts of rank 8, top-2, every other layer, retrieval expert on but idle without passages), or
the model of a trained checkpoint. Same chat prompts, greedy, batch 1; after a warm-up the two are
interleaved prompt by prompt (alternating who goes first) so machine load hits both alike. Untrained,
the upcycled model computes the dense function, so their greedy outputs should be identical.
"""

from __future__ import annotations

import copy
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from expertrag.bench.generate import PROMPTS


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def run(max_new_tokens: int = 32, num_prompts: int = 4, rounds: int = 2,
        checkpoint: str | Path | None = None) -> dict[str, Any]:
    import torch

    from expertrag.model.checkpoint import checkpoint_size, save_checkpoint
    from expertrag.model.config import ModelConfig
    from expertrag.model.generation import encode_prompts, generate
    from expertrag.model.loading import load_model
    from expertrag.model.upcycle import DEMO_MOE, delta_parameters, parameter_bytes, upcycle

    rss0 = _rss()
    dense, tok = load_model()
    rss_dense = _rss()
    if checkpoint is not None:
        from expertrag.model.checkpoint import apply_checkpoint, read_checkpoint_config
        from expertrag.moe.config import MoEConfig

        moe_cfg = MoEConfig.model_validate(read_checkpoint_config(checkpoint)["moe"])
        moe = upcycle(copy.deepcopy(dense), moe_cfg)
        apply_checkpoint(moe, checkpoint, base_model="smollm2-135m-instruct")
    else:
        moe_cfg = DEMO_MOE
        torch.manual_seed(0)
        moe = upcycle(copy.deepcopy(dense), moe_cfg)
    rss_moe = _rss()
    deltas = delta_parameters(moe)
    delta_numel = sum(p.numel() for p in deltas.values())
    with tempfile.TemporaryDirectory() as tmp:  # what an fp16 checkpoint of these deltas takes on disk
        save_checkpoint(moe, tmp, moe_cfg, base_model=ModelConfig().base, dtype="float16")
        checkpoint_bytes_fp16 = checkpoint_size(tmp)
    for p in moe.parameters():
        p.requires_grad_(False)
    moe.eval()

    prompts = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(num_prompts)]
    encoded = encode_prompts(tok, prompts)

    def gen(model: Any, i: int) -> list[int]:
        return generate(model, tok, input_ids=[encoded[i]], max_new_tokens=max_new_tokens).token_ids[0]

    with torch.inference_mode():
        gen(dense, 0)  # warm-up
        gen(moe, 0)
        t = {"dense": 0.0, "moe": 0.0}
        n = {"dense": 0, "moe": 0}
        identical = True
        for r in range(rounds):
            for i in range(num_prompts):
                order = ("dense", "moe") if (r + i) % 2 == 0 else ("moe", "dense")
                outs = {}
                for key in order:
                    t0 = time.perf_counter()
                    outs[key] = gen(dense if key == "dense" else moe, i)
                    t[key] += time.perf_counter() - t0
                    n[key] += len(outs[key])
                identical &= outs["dense"] == outs["moe"]
    tps = {k: n[k] / t[k] for k in t}
    dense_bytes, moe_bytes = parameter_bytes(dense), parameter_bytes(moe)
    return {
        "tokens_per_s_ratio": tps["moe"] / tps["dense"],
        "upcycled_tokens_per_s": tps["moe"],
        "dense_tokens_per_s": tps["dense"],
        "identical_outputs": bool(identical),
        "param_bytes_ratio": moe_bytes / dense_bytes,
        "dense_param_bytes": dense_bytes,
        "upcycled_param_bytes": moe_bytes,
        "upcycled_trainable_params": delta_numel,
        "upcycled_trainable_bytes": sum(p.numel() * p.element_size() for p in deltas.values()),
        "dense_trainable_bytes": dense_bytes,  # full fine-tuning trains everything
        "checkpoint_bytes_fp16": checkpoint_bytes_fp16,  # moe.json + tensors file, as written
        "rss_dense_load_bytes": rss_dense - rss0,
        "rss_upcycled_copy_bytes": rss_moe - rss_dense,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "moe_layers": len(moe.moe_layers),
        "moe": moe_cfg.model_dump(mode="json"),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "generated_tokens_per_model": n["dense"],
        "max_new_tokens": max_new_tokens,
        "num_prompts": num_prompts,
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
    }
