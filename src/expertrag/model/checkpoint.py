"""Checkpoints of an upcycled model that hold only what differs from the base model.

A checkpoint is a folder:

    moe.json                        the commit point: format version, base model name and shape, the
                                    MoEConfig, which layers are MoE, every parameter's name/shape/group,
                                    the tensors file's name and sha256, the step
    moe-<step>.safetensors          the MoE parameters that are not the frozen pretrained FFN (routers,
                                    LoRA deltas or full-copy experts, shared expert, retrieval expert),
                                    named as in the model (`layers.3.mlp.router.weight`); fp32, or fp16 /
                                    bf16 to ship small
    training_state-<step>.pt        optional, for `--resume`: optimizer state, step, RNG states, fp32
                                    master weights when the tensors file is lower precision, extras

Files are written through `fileio.atomic_path` (temporary name, fsync, rename, fsync of the folder);
moe.json is replaced last, so a reader sees either the previous checkpoint or the new one, never half of
one. Files that moe.json no longer names are deleted afterwards. Every load problem is a `CheckpointError` naming the path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertrag.errors import ExpertRAGError
from expertrag.fileio import atomic_path, atomic_write_text, sha256_file
from expertrag.model.upcycle import delta_parameters, param_part
from expertrag.moe.config import MoEConfig, moe_layer_indices

if TYPE_CHECKING:
    import torch

    from expertrag.model.llama import LlamaLM

FORMAT = "expertrag-moe-deltas"
FORMAT_VERSION = 1
CONFIG_FILE = "moe.json"
DTYPES = ("float32", "float16", "bfloat16")
# MoEConfig fields that change the parameters' shapes or what the trained weights mean.
ARCH_FIELDS = ("num_experts", "top_k", "expert_kind", "lora_rank", "lora_alpha", "shared_expert",
               "shared_expert_intermediate_size", "retrieval_expert", "retrieval_rank", "retrieval_heads")


class CheckpointError(ExpertRAGError):
    """A missing, corrupt or mismatched checkpoint (the message names the path)."""


def _arch(model: LlamaLM) -> dict[str, int]:
    a = model.args
    return {"hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
            "num_layers": a.num_layers, "vocab_size": a.vocab_size}


def checkpoint_size(path: str | Path) -> int:
    """Bytes needed to ship the checkpoint: moe.json + the tensors file (no training state)."""
    folder = _folder(path)
    meta = read_checkpoint_config(folder)
    return (folder / CONFIG_FILE).stat().st_size + (folder / meta["tensors_file"]).stat().st_size


# --------------------------------------------------------------------------------------------- save


def save_checkpoint(
    model: LlamaLM,
    path: str | Path,
    moe_cfg: MoEConfig,
    *,
    base_model: str,
    dtype: str = "float32",
    step: int = 0,
    training_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the model's MoE deltas to folder `path` (created); returns the folder.

    dtype: of the tensors file ("float16"/"bfloat16" to ship small). training_state: anything
    `torch.save` can write with plain tensors/containers (optimizer state dict, RNG states, ...); when
    given and dtype is not the parameters' own, fp32 master copies of the deltas are added to it under
    "master" so that resuming is exact. extra: JSON-able notes stored in moe.json.
    """
    import torch
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"checkpoint dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    layers = model.moe_layers
    if not layers:
        raise ValueError("model has no MoE layers: nothing to checkpoint (upcycle it first)")
    want = moe_layer_indices(moe_cfg.layers, model.args.num_layers)
    if want != layers:
        raise ValueError(f"moe_cfg.layers={moe_cfg.layers!r} gives layers {want}, the model has {layers}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    params = delta_parameters(model)
    tdtype = getattr(torch, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        t = p.detach().to(device="cpu", dtype=tdtype).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"parameter {name} is not finite in {dtype} (overflow?); save as float32")
        tensors[name] = t
    tag = f"{step:06d}"
    tensors_file = f"moe-{tag}.safetensors"
    with atomic_path(folder / tensors_file) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})

    state_file = None
    if training_state is not None:
        state = dict(training_state)
        state["format_version"] = FORMAT_VERSION
        state["step"] = step
        state["param_names"] = list(params)
        if any(p.dtype != tdtype for p in params.values()):
            state["master"] = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
        state_file = f"training_state-{tag}.pt"
        with atomic_path(folder / state_file) as tmp:
            torch.save(state, tmp)

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "base_architecture": _arch(model),
        "moe": moe_cfg.model_dump(mode="json"),
        "layers": layers,
        "dtype": dtype,
        "tensors_file": tensors_file,
        "tensors_sha256": sha256_file(folder / tensors_file),
        "num_parameters": sum(p.numel() for p in params.values()),
        "parameters": {n: {"shape": list(p.shape), "part": param_part(n.split(".mlp.", 1)[1])}
                       for n, p in params.items()},
        "step": step,
        "training_state_file": state_file,
        "training_state_sha256": sha256_file(folder / state_file) if state_file else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "extra": dict(extra or {}),
    }
    atomic_write_text(folder / CONFIG_FILE, json.dumps(meta, indent=1) + "\n")
    keep = {tensors_file, state_file}
    for old in [*folder.glob("moe-*.safetensors"), *folder.glob("training_state-*.pt")]:
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return folder


# --------------------------------------------------------------------------------------------- load


def _folder(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file() and p.name == CONFIG_FILE:
        return p.parent
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint folder")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a checkpoint folder (expected a folder holding {CONFIG_FILE})")
    return p


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """moe.json of a checkpoint folder, checked for format and version (tensors not read)."""
    folder = _folder(path)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder ({CONFIG_FILE} missing)")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: corrupt checkpoint config (not valid JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not an expertrag MoE checkpoint config (format != {FORMAT!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: checkpoint format version {version!r}, but this expertrag reads version "
            f"{FORMAT_VERSION}; re-save it with a matching expertrag version"
        )
    required = ("base_model", "base_architecture", "moe", "layers", "dtype", "tensors_file", "tensors_sha256",
                "parameters")
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(f"{cfg_path}: corrupt checkpoint config (missing {', '.join(missing)})")
    try:
        MoEConfig.model_validate(meta["moe"])
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: corrupt checkpoint config (moe section invalid: {e})") from None
    return meta


def check_moe_config(given: MoEConfig, saved: MoEConfig | Mapping[str, Any], path: str | Path,
                     num_layers: int | None = None) -> None:
    """Raise CheckpointError if `given` would build different MoE layers than the checkpoint's config."""
    saved = saved if isinstance(saved, MoEConfig) else MoEConfig.model_validate(saved)
    diffs = [f"{f}: config {getattr(given, f)!r} vs checkpoint {getattr(saved, f)!r}"
             for f in ARCH_FIELDS if getattr(given, f) != getattr(saved, f)]
    n = num_layers or 10**6
    if moe_layer_indices(given.layers, n) != moe_layer_indices(saved.layers, n):
        diffs.append(f"layers: config {given.layers!r} vs checkpoint {saved.layers!r}")
    if diffs:
        raise CheckpointError(
            f"{path}: the MoE config does not match the checkpoint's ({'; '.join(diffs)}); "
            "leave the moe section out to use the checkpoint's own"
        )


def load_checkpoint_tensors(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(moe.json dict, name -> tensor on CPU), checking the sha256 and the parameter list."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = _folder(path)
    meta = read_checkpoint_config(folder)
    tpath = folder / meta["tensors_file"]
    if not tpath.is_file():
        raise CheckpointError(f"{tpath}: tensors file missing (named in {folder / CONFIG_FILE})")
    if sha256_file(tpath) != meta["tensors_sha256"]:
        raise CheckpointError(f"{tpath}: corrupt tensors file (sha256 differs from the one in {CONFIG_FILE})")
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{tpath}: corrupt tensors file ({e})") from None
    names = meta["parameters"]
    if set(tensors) != set(names):
        extra, lost = sorted(set(tensors) - set(names)), sorted(set(names) - set(tensors))
        raise CheckpointError(f"{tpath}: tensors do not match {CONFIG_FILE} (missing {lost[:3]}, unexpected "
                              f"{extra[:3]})")
    for n, spec in names.items():
        if list(tensors[n].shape) != list(spec["shape"]):
            raise CheckpointError(f"{tpath}: tensor {n} has shape {list(tensors[n].shape)}, "
                                  f"{CONFIG_FILE} says {spec['shape']}")
    return meta, tensors


def apply_checkpoint(model: LlamaLM, path: str | Path, *, base_model: str | None = None,
                     tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Copy the checkpoint's deltas into an upcycled `model` (same base, same MoE layers); returns moe.json.

    base_model: the base name the model was loaded from, checked against the checkpoint's when given.
    tensors: use these instead of the tensors file (e.g. the fp32 master copies of a training state).
    """
    import torch

    folder = _folder(path)
    if tensors is None:
        meta, tensors = load_checkpoint_tensors(folder)
    else:
        meta = read_checkpoint_config(folder)
    if base_model is not None and meta["base_model"] != base_model:
        raise CheckpointError(f"{folder}: checkpoint was trained on base model {meta['base_model']!r}, "
                              f"the model is {base_model!r}")
    arch = _arch(model)
    if meta["base_architecture"] != arch:
        raise CheckpointError(f"{folder}: base model mismatch: checkpoint base {meta['base_architecture']}, "
                              f"model {arch}")
    if list(meta["layers"]) != model.moe_layers:
        raise CheckpointError(f"{folder}: layer mismatch: checkpoint has MoE layers {meta['layers']}, the "
                              f"model has {model.moe_layers}")
    params = delta_parameters(model)
    if set(params) != set(tensors):
        lost, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise CheckpointError(f"{folder}: parameters do not match the model's MoE layers (missing {lost[:3]}, "
                              f"unexpected {extra[:3]}); was it saved with another MoE config?")
    for n, p in params.items():
        if tuple(tensors[n].shape) != tuple(p.shape):
            raise CheckpointError(f"{folder}: layer mismatch: {n} has shape {tuple(tensors[n].shape)} in the "
                                  f"checkpoint, {tuple(p.shape)} in the model")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(device=p.device, dtype=p.dtype))
    return meta


def load_training_state(path: str | Path) -> dict[str, Any]:
    """The training state saved with the checkpoint (for resuming), checked against moe.json."""
    import pickle

    import torch

    folder = _folder(path)
    meta = read_checkpoint_config(folder)
    name = meta.get("training_state_file")
    if not name:
        raise CheckpointError(f"{folder}: checkpoint has no training state (it was saved for shipping, "
                              "not for resuming)")
    spath = folder / name
    if not spath.is_file():
        raise CheckpointError(f"{spath}: training state file missing (named in {folder / CONFIG_FILE})")
    if meta.get("training_state_sha256") and sha256_file(spath) != meta["training_state_sha256"]:
        raise CheckpointError(f"{spath}: corrupt training state (sha256 differs from the one in {CONFIG_FILE})")
    try:
        state = torch.load(spath, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{spath}: corrupt training state ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{spath}: corrupt training state (not a dict)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{spath}: training state format version {state.get('format_version')!r} "
                              f"is not {FORMAT_VERSION}")
    if list(state.get("param_names", [])) != list(meta["parameters"]):
        raise CheckpointError(f"{spath}: training state does not match the checkpoint's parameters")
    return state
