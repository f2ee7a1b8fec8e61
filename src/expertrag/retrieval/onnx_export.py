"""The packaged sentence-transformers model exported once to ONNX (fp32, and int8 by dynamic quantisation).

Why a hand-driven `torch.onnx.export` and not sentence-transformers' own `backend="onnx"`: that path needs
`optimum[onnxruntime]`, whose current release pins transformers < 4.58, and installing it would downgrade the
transformers 5.x the LM code runs on. The export below needs only torch (already a dependency), `onnx` and
`onnxruntime` (the `onnx` extra), reads the same packaged weights and never downloads anything.

The graph is the transformer plus the model's own pooling (mean over the attention mask, checked against
`1_Pooling/config.json`) and L2 normalisation, so it outputs exactly what `SentenceTransformer.encode(...,
normalize_embeddings=True)` returns.

Cache layout: `cache_dir()/onnx/<model>-<hash>-<variant>/{model.onnx, export.json}`, where the hash covers
the weights, the model's configs and `EXPORT_VERSION`. A variant is built in a temporary folder beside it and
renamed into place (atomic: readers see a complete folder or none); `export.json` records the model file's
sha256, so a truncated or corrupted folder is detected on load, removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

from expertrag.errors import ExpertRAGError
from expertrag.fileio import commit_dir, sha256_file
from expertrag.paths import cache_dir

EXPORT_VERSION = 1  # bump when the exported graph changes: old cache folders are then not reused
VARIANTS = ("fp32", "int8")
ONNX_HINT = "pip install 'expertrag[onnx]' (onnxruntime and onnx), or set retrieval.embed_backend: torch"
MODEL_FILE = "model.onnx"
META_FILE = "export.json"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ExpertRAGError(f"the onnx embedding backends need onnxruntime: {ONNX_HINT}") from None
    return onnxruntime


def model_fingerprint(model_dir: Path) -> str:
    """Content hash of what the export reads: weights, configs, tokenizer, and the export code's version."""
    h = hashlib.sha256(f"expertrag-onnx-export-{EXPORT_VERSION}".encode())
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors",
                                                                                 ".bin", ".txt"))
    for p in files:
        h.update(str(p.relative_to(model_dir)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()[:16]


def check_pooling(model_dir: Path) -> None:
    """The graph hard-codes mean pooling + L2 norm; refuse a model whose own config says otherwise."""
    modules_file = model_dir / "modules.json"
    if not modules_file.exists():
        raise ExpertRAGError(f"{model_dir}: no modules.json, not a sentence-transformers folder")
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k not in ("Transformer", "Pooling", "Normalize") for k in kinds):
        raise ExpertRAGError(f"{model_dir}: the onnx backend supports Transformer + Pooling (+ Normalize) models, "
                             f"this one has {kinds}; use retrieval.embed_backend: torch")
    pooling_dir = model_dir / modules[1].get("path", "1_Pooling")
    pooling = json.loads((pooling_dir / "config.json").read_text(encoding="utf-8"))
    others = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k != "pooling_mode_mean_tokens"]
    if not pooling.get("pooling_mode_mean_tokens") or others:
        raise ExpertRAGError(f"{model_dir}: the onnx backend implements mean pooling only, the model's pooling "
                             f"config asks for {others or 'no mean pooling'}; use retrieval.embed_backend: torch")


def max_seq_length(model_dir: Path) -> int:
    cfg = model_dir / "sentence_bert_config.json"
    if cfg.exists():
        value = json.loads(cfg.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    return 512


def _export_fp32(model_dir: Path, target: Path) -> None:
    import torch
    from transformers import AutoModel

    # eager attention: the SDPA kernels trace into ops the legacy exporter handles less well
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class Pooled(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            # sentence-transformers' mean pooling: sum over real tokens / their count (clamped like theirs)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    example = tuple(torch.ones(2, 8, dtype=torch.long) if n != "token_type_ids" else torch.zeros(2, 8, dtype=torch.long)
                    for n in INPUTS)
    axes = {n: {0: "batch", 1: "sequence"} for n in INPUTS} | {"sentence_embedding": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of dynamo (which needs onnxscript and writes
        # external data files); it still exports this BERT exactly and into one self-contained file
        warnings.simplefilter("ignore")
        torch.onnx.export(Pooled(model), example, str(target), input_names=list(INPUTS),
                          output_names=["sentence_embedding"], dynamic_axes=axes, opset_version=17, dynamo=False)


def _quantize_int8(fp32_model: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime logs a "consider pre-processing" hint at WARNING through the root logger: noise here
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.ERROR)
    try:
        # per-channel scales: per-tensor int8 moved MiniLM's vectors to cosine 0.959 mean (0.905 worst) vs
        # torch on wiki summaries; per-channel keeps 0.995 (0.990 worst) at the same speed (RESULTS.md)
        quantize_dynamic(str(fp32_model), str(target), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
        # the quantiser configures the root logger on import (a stderr handler): left there, it printed
        # other libraries' DEBUG records (bm25s's) for the rest of the process
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)


def _valid(folder: Path) -> bool:
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        model = folder / MODEL_FILE
        return (meta.get("export_version") == EXPORT_VERSION and model.stat().st_size == meta.get("bytes")
                and sha256_file(model) == meta.get("sha256"))
    except (OSError, ValueError, AttributeError):
        return False


def onnx_model(model_dir: Path, name: str, variant: str = "fp32") -> Path:
    """Path of the cached ONNX file for `variant`, exporting (and quantising) on first use."""
    if variant not in VARIANTS:
        raise ExpertRAGError(f"unknown ONNX variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant == "int8":
        require_onnxruntime()  # its quantiser makes the int8 file; fp32 needs only torch and onnx
    check_pooling(model_dir)
    root = cache_dir() / "onnx"
    root.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name) or "model"
    folder = root / f"{safe}-{model_fingerprint(model_dir)}-{variant}"
    if _valid(folder):
        return folder / MODEL_FILE
    if folder.exists():  # a corrupt or partial folder (e.g. a disk filled mid-copy): rebuild it
        shutil.rmtree(folder, ignore_errors=True)
    source = onnx_model(model_dir, name, "fp32") if variant == "int8" else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=root))
    try:
        target = tmp / MODEL_FILE
        if source is None:
            _export_fp32(model_dir, target)
        else:
            _quantize_int8(source, target)
        meta = {"export_version": EXPORT_VERSION, "variant": variant, "model": str(model_dir),
                "bytes": target.stat().st_size, "sha256": sha256_file(target)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        try:
            commit_dir(tmp, folder)  # fsync files and folder, rename, fsync the parent
        except OSError:
            # another process finished the same export first (the rename finds a full folder): use it if good
            if not _valid(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _valid(folder):
        raise ExpertRAGError(f"{folder}: the ONNX export did not verify after writing; remove it and retry")
    return folder / MODEL_FILE
