"""`model.backend: auto`: the fastest generator set-up that is installed here, for the packaged base model.

The order comes from measurement (RESULTS.md, "Generator backends": `expertrag bench generate --backends
...`): on a CPU, llama.cpp answers short (closed-book) prompts fastest and our fp32 decoder prefills long
(5-passage) prompts fastest, so `auto` is llama.cpp on the packaged weights re-encoded as q8_0, with long
prompts sent to native, where llama-cpp-python is installed (`make llamacpp`), else native. A config that names a backend is left alone.
"""

from __future__ import annotations

from expertrag.model.config import ModelConfig

# what `auto` becomes where llama-cpp-python is installed (see the module doc for why)
# q8_0: the packaged Q4_1 weights re-encoded once (cached); faster than Q4_1 at both phases here
LLAMACPP_SETUP = {"backend": "llamacpp", "gguf_type": "q8_0", "long_prompt_backend": "native"}


def resolve(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with `backend: auto` replaced by the set-up it stands for here."""
    if cfg.backend != "auto":
        return cfg
    from expertrag.model.llamacpp_backend import available

    if available() and cfg.checkpoint is None and cfg.path is None and cfg.adapter is None:
        return cfg.model_copy(update=LLAMACPP_SETUP)
    return cfg.model_copy(update={"backend": "native"})


def describe(cfg: ModelConfig) -> str:
    """One line saying which set-up `cfg` resolves to (for `make demo` and `serve`)."""
    r = resolve(cfg)
    if r.backend == "llamacpp":
        kind = "the packaged GGUF" if r.path is None else r.path
        gguf = "" if r.gguf_type == "as-is" else f" as {r.gguf_type}"
        long = f"; prompts of {r.long_prompt_tokens}+ tokens on {r.long_prompt_backend}" if r.long_prompt_backend else ""
        return f"llamacpp ({kind}{gguf}){long}"
    if r.backend == "native" and cfg.backend == "auto":
        return "native (llama-cpp-python is not installed: `make llamacpp` adds the faster llamacpp backend)"
    return r.backend
