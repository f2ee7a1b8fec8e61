from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RetrievalConfig(BaseModel):
    """Sparse, dense and hybrid retrieval settings."""

    model_config = ConfigDict(extra="forbid")
    embedder: str = Field("all-MiniLM-L6-v2", description="name recorded in the manifest; loaded offline")
    embed_batch_size: int = Field(64, gt=0)
    # torch is the default so existing indexes and configs keep their meaning. auto follows an existing
    # index's backend; for a new index it is openvino, else onnx-int8, else torch, as installed (embedder.py)
    embed_backend: Literal["auto", "torch", "onnx", "onnx-int8", "openvino"] = Field(
        "torch", description="embedding runtime: torch, onnx (fp32), onnx-int8, openvino, or auto (see resolve_backend)")
    dense_index: Literal["flat", "ivf", "ivfpq", "hnsw"] = "flat"
    ivf_nlist: int = Field(256, gt=0)
    # ivfpq: bytes per vector (sub-quantisers of 8 bits); must divide the embedding width (384: 8..384)
    ivf_pq_m: int = Field(48, gt=0)
    # ivf/ivfpq are trained on this many vectors spread evenly over the corpus (by rowid), not on the first
    ivf_train_size: int = Field(65536, gt=0)
    ivf_nprobe: int = Field(16, gt=0)
    hnsw_m: int = Field(32, gt=0)
    hnsw_ef_search: int = Field(64, gt=0)
    bm25_k1: float = 1.5
    bm25_b: float = 0.75
    bm25_stemmer: bool = True
    rrf_k: int = Field(60, gt=0, description="reciprocal-rank-fusion constant")
    weight_bm25: float = Field(1.0, ge=0)
    weight_dense: float = Field(1.0, ge=0)
    candidates: int = Field(50, gt=0, description="hits taken from each retriever before fusion")
    default_k: int = Field(5, gt=0)
