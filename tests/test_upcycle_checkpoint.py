"""Checkpoints hold only the MoE deltas, round-trip exactly, ship small, and fail clearly."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from expertrag.errors import ExpertRAGError
from expertrag.model.checkpoint import (
    CheckpointError,
    apply_checkpoint,
    check_moe_config,
    checkpoint_size,
    load_training_state,
    read_checkpoint_config,
    save_checkpoint,
)
from expertrag.model.llama import LlamaArgs, LlamaLM
from expertrag.model.upcycle import DEMO_MOE, delta_parameters, upcycle
from expertrag.moe import MoEConfig

CFG = MoEConfig(num_experts=4, top_k=2, layers="all", expert_kind="lora", lora_rank=4, retrieval_expert=True,
                retrieval_rank=8, retrieval_heads=2)


def trained(tiny_llama, cfg: MoEConfig = CFG, seed: int = 1) -> LlamaLM:
    """An upcycled copy whose deltas have been moved away from their init."""
    model = upcycle(copy.deepcopy(tiny_llama), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def fresh(tiny_llama, cfg: MoEConfig = CFG) -> LlamaLM:
    torch.manual_seed(123)  # a different expert init than the trained one
    return upcycle(copy.deepcopy(tiny_llama), cfg)


def test_round_trip_fp32_exact(tiny_llama, tmp_path):
    src = trained(tiny_llama)
    save_checkpoint(src, tmp_path / "ck", CFG, base_model="tiny", step=7)
    meta = read_checkpoint_config(tmp_path / "ck")
    assert meta["layers"] == [0, 1] and meta["step"] == 7 and meta["base_model"] == "tiny"
    assert MoEConfig.model_validate(meta["moe"]) == CFG
    names = set(meta["parameters"])
    assert names == set(delta_parameters(src))
    assert not any("base_" in n for n in names)  # the frozen shared FFN is not shipped
    assert {v["part"] for v in meta["parameters"].values()} == {"routers", "experts", "retrieval"}
    dst = fresh(tiny_llama)
    assert not torch.equal(dst.layers[0].mlp.router.weight, src.layers[0].mlp.router.weight)
    apply_checkpoint(dst, tmp_path / "ck", base_model="tiny")
    for (n, a), b in zip(delta_parameters(src).items(), delta_parameters(dst).values(), strict=True):
        assert torch.equal(a, b), n
    ids = torch.randint(2, 128, (1, 10))
    pm = src.encode_passages([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(src(ids, passages=pm).logits, dst(ids, passages=pm).logits)


def test_fp16_is_half_the_size_and_close(tiny_llama, tmp_path):
    src = trained(tiny_llama)
    save_checkpoint(src, tmp_path / "a", CFG, base_model="tiny")
    save_checkpoint(src, tmp_path / "b", CFG, base_model="tiny", dtype="float16")
    ta = (tmp_path / "a" / read_checkpoint_config(tmp_path / "a")["tensors_file"]).stat().st_size
    tb = (tmp_path / "b" / read_checkpoint_config(tmp_path / "b")["tensors_file"]).stat().st_size
    assert tb < 0.6 * ta
    dst = fresh(tiny_llama)
    apply_checkpoint(dst, tmp_path / "b")
    for a, b in zip(delta_parameters(src).values(), delta_parameters(dst).values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    assert b.dtype == torch.float32


def test_resave_replaces_old_files(tiny_llama, tmp_path):
    src = trained(tiny_llama)
    save_checkpoint(src, tmp_path, CFG, base_model="tiny", step=1, training_state={"x": torch.ones(2)})
    save_checkpoint(src, tmp_path, CFG, base_model="tiny", step=2, training_state={"x": torch.ones(2)})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["moe-000002.safetensors", "moe.json", "training_state-000002.pt"]
    assert load_training_state(tmp_path)["step"] == 2


def _saved(tiny_llama, tmp_path):
    save_checkpoint(trained(tiny_llama), tmp_path / "ck", CFG, base_model="tiny", training_state={})
    return tmp_path / "ck"


def test_load_errors_name_the_path(tiny_llama, tiny_llama_config, tmp_path):
    ck = _saved(tiny_llama, tmp_path)
    model = fresh(tiny_llama)
    meta = json.loads((ck / "moe.json").read_text())

    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'}: no such checkpoint folder"):
        apply_checkpoint(model, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="moe.json missing"):
        apply_checkpoint(model, tmp_path / "empty")
    # base mismatch: by name, and by shape
    with pytest.raises(CheckpointError, match="base model 'tiny', the model is 'smollm2"):
        apply_checkpoint(model, ck, base_model="smollm2-135m-instruct")
    other = LlamaLM(LlamaArgs.from_hf({**tiny_llama_config, "hidden_size": 48, "head_dim": 12}))
    with pytest.raises(CheckpointError, match="base model mismatch"):
        apply_checkpoint(upcycle(other, CFG), ck)
    # layer mismatch
    with pytest.raises(CheckpointError, match=r"layer mismatch: checkpoint has MoE layers \[0, 1\]"):
        apply_checkpoint(fresh(tiny_llama, CFG.model_copy(update={"layers": "1"})), ck)
    with pytest.raises(CheckpointError, match="parameters do not match"):
        apply_checkpoint(fresh(tiny_llama, CFG.model_copy(update={"retrieval_expert": False})), ck)
    with pytest.raises(CheckpointError, match="layer mismatch: .* has shape"):
        apply_checkpoint(fresh(tiny_llama, CFG.model_copy(update={"lora_rank": 2})), ck)
    with pytest.raises(CheckpointError, match=r"does not match the checkpoint's \(lora_rank"):
        check_moe_config(CFG.model_copy(update={"lora_rank": 2}), meta["moe"], ck)
    check_moe_config(CFG.model_copy(update={"aux_loss_coef": 0.1, "layers": "0,1"}), meta["moe"], ck, 2)

    # version mismatch
    (ck / "moe.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match=f"{ck / 'moe.json'}: checkpoint format version 99"):
        apply_checkpoint(model, ck)
    # corrupt config
    (ck / "moe.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint config"):
        apply_checkpoint(model, ck)
    (ck / "moe.json").write_text(json.dumps(meta))
    # corrupt tensors (one flipped byte), and a missing tensors file
    tfile = ck / meta["tensors_file"]
    raw = bytearray(tfile.read_bytes())
    raw[-3] ^= 0xFF
    tfile.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{tfile}: corrupt tensors file"):
        apply_checkpoint(model, ck)
    tfile.unlink()
    with pytest.raises(CheckpointError, match=f"{tfile}: tensors file missing"):
        apply_checkpoint(model, ck)
    # training state
    (ck / meta["training_state_file"]).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt training state"):
        load_training_state(ck)
    assert issubclass(CheckpointError, ExpertRAGError)


def test_save_refuses_dense_and_overflow(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="no MoE layers"):
        save_checkpoint(copy.deepcopy(tiny_llama), tmp_path, CFG, base_model="tiny")
    model = trained(tiny_llama)
    with torch.no_grad():
        model.layers[0].mlp.router.weight[0, 0] = 1e6
    with pytest.raises(ValueError, match="not finite in float16"):
        save_checkpoint(model, tmp_path, CFG, base_model="tiny", dtype="float16")


@pytest.mark.slow
def test_demo_checkpoint_ships_small(smollm2, tmp_path):
    """Default demo config on SmolLM2 (LoRA r=8, 4 experts, top-2, every other layer, retrieval on)."""
    model, _ = smollm2
    up = upcycle(copy.deepcopy(model), DEMO_MOE)
    save_checkpoint(up, tmp_path / "fp16", DEMO_MOE, base_model="smollm2-135m-instruct", dtype="float16")
    save_checkpoint(up, tmp_path / "fp32", DEMO_MOE, base_model="smollm2-135m-instruct")
    size16, size32 = checkpoint_size(tmp_path / "fp16"), checkpoint_size(tmp_path / "fp32")
    print(f"demo checkpoint: fp16 {size16 / 1e6:.2f} MB, fp32 {size32 / 1e6:.2f} MB")
    assert size16 <= 20e6
    assert 1.9 < size32 / size16 < 2.1
