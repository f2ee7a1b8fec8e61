"""LoRA adapters of domain experts, in the peft format, on our native decoder.

peft's own machinery does the work (`inject_adapter_in_model`, `get/set_peft_model_state_dict`): our
decoder's module names are Hugging Face Llama's without the `model.` prefix (model/llama.py), so an adapter
is saved under the names a `PeftModel` over `LlamaForCausalLM` uses (`base_model.model.model.layers.3.
self_attn.q_proj.lora_A.weight`) and loads there with `PeftModel.from_pretrained(hf_model, folder)`; our
loader strips the same prefix. A folder holds `adapter_config.json` + `adapter_model.safetensors` (+ our
`expertrag_adapter.json`: how it was trained), written as a whole with fileio.commit_dir.

At run time an adapter is attached to and detached from the generator's model (`with_adapter`): detaching
puts the original nn.Linear modules back, so the base model afterwards is exactly what it was. That costs
~0.8 s per attach, so the pipeline keeps adapters instead (`AdapterBank`): each is injected once under its
own peft adapter name, and a generation switches the active one (or none: the base model) under a lock.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from expertrag.errors import ExpertRAGError, InputError
from expertrag.fileio import atomic_write_json, commit_dir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
INFO_FILE = "expertrag_adapter.json"
ADAPTER_NAME = "default"  # peft's name for the one adapter of a folder
# How a PeftModel over transformers' LlamaForCausalLM names a key: PeftModel.base_model (LoraModel) .model
# (LlamaForCausalLM) .model (LlamaModel) . layers...
HF_PREFIX = "base_model.model.model."
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterError(ExpertRAGError):
    """An adapter folder that is missing, incomplete or does not fit the model (named in the message)."""


def target_regex(targets: Sequence[str]) -> str:
    """peft's target_modules as one regex over full module names: only the decoder layers' own projections,
    never same-named linears elsewhere (an upcycled MoE layer's experts), in our names and in HF's."""
    bad = sorted(set(targets) - set(PROJECTIONS))
    if bad or not targets:
        raise InputError(f"LoRA targets must be among {', '.join(PROJECTIONS)}; got {', '.join(bad) or 'none'}")
    attn = [t for t in targets if t in PROJECTIONS[:4]]
    mlp = [t for t in targets if t in PROJECTIONS[4:]]
    alts = [f"self_attn\\.({'|'.join(attn)})"] if attn else []
    alts += [f"mlp\\.({'|'.join(mlp)})"] if mlp else []
    return rf"(.*\.)?layers\.\d+\.({'|'.join(alts)})"


def lora_config(rank: int = 8, alpha: float | None = None, targets: Sequence[str] = PROJECTIONS,
                dropout: float = 0.0, base: str = "smollm2-135m-instruct"):
    from peft import LoraConfig

    if rank <= 0:
        raise InputError(f"LoRA rank must be positive, got {rank}")
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                      target_modules=target_regex(targets), lora_dropout=dropout, bias="none",
                      task_type="CAUSAL_LM", base_model_name_or_path=base)


def attach(model: nn.Module, config: Any, *, seed: int) -> nn.Module:
    """Inject a fresh LoRA adapter (B = 0: the model computes what it did) and freeze everything else.

    A is drawn at random by peft; it is drawn from `seed` (in a forked RNG, the caller's torch state left
    as it was) so that the same `expert train` command gives the same adapter: two runs of the knowledge
    slice's recipe once differed because A came from whatever the global generator held. `seed` has no
    default on purpose: with one, two adapters meant to differ (one per domain) silently started from the
    same A, and a routing test lost its margin that way."""
    from peft import inject_adapter_in_model

    if has_adapter(model):
        raise AdapterError("the model already carries an adapter; detach it first")
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def has_adapter(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def detach(model: nn.Module) -> None:
    """Remove the adapter: every LoRA-wrapped linear is replaced by its untouched base layer."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, m in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the HF/peft names of a saved adapter (see HF_PREFIX)."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: we never adapt embeddings, and "auto" would look up the base model's config
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    return {HF_PREFIX + k: v.detach().contiguous().clone() for k, v in state.items()}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(model: nn.Module, folder: str | os.PathLike[str], *, info: dict[str, Any] | None = None) -> Path:
    """Write the model's adapter to `folder` (replacing an older one whole: readers see the old folder or
    the new one). The safetensors metadata `format: pt` is what transformers/peft expect."""
    from safetensors.torch import save_file

    folder = Path(folder)
    config = getattr(model, "peft_config", {}).get(ADAPTER_NAME)
    if config is None:
        raise AdapterError("the model carries no adapter to save")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        cfg = config.to_dict()
        cfg["target_modules"] = config.target_modules  # to_dict turns a regex into a set-like list otherwise
        atomic_write_json(tmp / CONFIG_FILE, json.loads(json.dumps(cfg, default=_jsonable)))
        save_file(adapter_state(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if info is not None:
            atomic_write_json(tmp / INFO_FILE, info)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        old = None
        if folder.exists():  # moved aside, not deleted first: a crash leaves the old adapter recoverable
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{time.time_ns()}")
            os.replace(folder, old)
        commit_dir(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _jsonable(x: Any) -> Any:
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    if hasattr(x, "value"):  # enums (task_type, peft_type)
        return x.value
    return str(x)


def read_adapter(folder: str | os.PathLike[str]) -> tuple[Any, dict[str, torch.Tensor]]:
    """(LoraConfig, tensors with the saved HF names) of an adapter folder."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise AdapterError(f"{folder / name}: missing; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{folder / CONFIG_FILE}: not JSON ({e.msg}, line {e.lineno})") from None
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{folder / CONFIG_FILE}: field 'peft_type' is {raw.get('peft_type')!r}, expected 'LORA'")
    known = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in raw.items() if k in known})
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise AdapterError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({e})") from None
    return config, tensors


def read_native_adapter(folder: str | os.PathLike[str]) -> tuple[Any, dict[str, torch.Tensor]]:
    """(LoraConfig, tensors under our decoder's module names) of an adapter folder: the saved HF names with
    HF_PREFIX stripped. A tensor without the prefix is not a Llama adapter's, so the folder is refused."""
    config, tensors = read_adapter(folder)
    state = {}
    for k, v in tensors.items():
        if not k.startswith(HF_PREFIX):
            raise AdapterError(f"{Path(folder) / WEIGHTS_FILE}: tensor {k!r} is not named like a Llama adapter "
                               f"(expected the prefix {HF_PREFIX!r})")
        state[k.removeprefix(HF_PREFIX)] = v
    return config, state


def load_adapter(model: nn.Module, folder: str | os.PathLike[str]) -> nn.Module:
    """Attach the adapter saved in `folder` to `model` (ours), exactly as saved."""
    from peft import set_peft_model_state_dict

    config, state = read_native_adapter(folder)
    attach(model, config, seed=0)  # A is overwritten by the saved weights below
    try:
        result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise AdapterError(f"{Path(folder) / WEIGHTS_FILE}: does not fit this model (unexpected "
                               f"{result.unexpected_keys[:3]}, missing {missing[:3]})")
    except (RuntimeError, AdapterError) as e:  # a shape mismatch (another base model) is a RuntimeError
        detach(model)
        if isinstance(e, AdapterError):
            raise
        raise AdapterError(f"{Path(folder) / WEIGHTS_FILE}: does not fit this model ({str(e).splitlines()[0]})") from None
    model.eval()
    return model


@contextlib.contextmanager
def with_adapter(generator: Any, folder: str | os.PathLike[str] | None) -> Iterator[Any]:
    """Generate with the adapter in `folder` for the duration of the block (None: the base model), then
    put the base model back. For the native backend (`ExpertRAGGenerator`, whose `.model` is our decoder).

    Not safe to use from two threads on one generator at once: the adapter lives in the shared model."""
    if folder is None:
        yield generator
        return
    model = getattr(generator, "model", None)
    if not isinstance(model, nn.Module) or not hasattr(model, "layers"):
        raise AdapterError(f"adapters need the native backend; this generator is "
                           f"{getattr(generator.capabilities, 'backend', type(generator).__name__)}")
    load_adapter(model, folder)
    try:
        yield generator
    finally:
        detach(model)


# ------------------------------------------------------------------------------- kept for answering


class AdapterBank:
    """Domain adapters kept on one generator's model, for answering (the pipeline's per-expert adapters).

    Each adapter folder is injected once (peft multi-adapter: every LoRA-wrapped linear holds one A/B pair
    per adapter name) and kept; `use(key)` makes that adapter the only active one, `use(None)` disables
    them all, which leaves the LoRA layers calling their base linears untouched (the base model's outputs
    are bit-exact: peft's forward skips the adapters entirely when they are disabled).

    The model is shared, so which adapter is active is shared state: `use` holds a lock for the whole
    block, and every generation on this model must run inside a `use` block (the pipeline does), else one
    thread's adapter would leak into another's answer. A folder whose weights file changed (a retrained
    adapter) is loaded again under a new name and the old copy deleted."""

    def __init__(self, model: nn.Module):
        import threading

        self.model = model
        self._lock = threading.RLock()  # re-entrant: a probe inside a block of the same question
        self._names: dict[str, tuple[tuple, str]] = {}  # folder -> (weights file signature, peft name)
        self._count = 0
        self.loads = 0  # how many times a folder was read and injected (kept ones are not counted again)

    @staticmethod
    def _signature(folder: Path) -> tuple:
        try:
            st = os.stat(folder / WEIGHTS_FILE)
        except FileNotFoundError:
            raise AdapterError(f"{folder / WEIGHTS_FILE}: missing; an adapter folder holds {CONFIG_FILE} and "
                               f"{WEIGHTS_FILE}") from None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _layers(self) -> list:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def load(self, folder: str | os.PathLike[str]) -> str:
        """The key of the adapter in `folder` (its resolved path), injecting it on first use."""
        import warnings

        from peft import inject_adapter_in_model, set_peft_model_state_dict

        folder = Path(folder).resolve()
        key = str(folder)
        with self._lock:
            sig = self._signature(folder)
            known = self._names.get(key)
            if known is not None and known[0] == sig:
                return key
            config, state = read_native_adapter(folder)
            self._count += 1
            name = f"expert{self._count}"  # peft names are module keys: no dots or slashes from the path
            try:
                with warnings.catch_warnings():  # peft warns that the model gets several adapters: the point
                    warnings.simplefilter("ignore")
                    inject_adapter_in_model(config, self.model, adapter_name=name)
                result = set_peft_model_state_dict(self.model, state, adapter_name=name)
                missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
                if result.unexpected_keys or missing:
                    raise AdapterError(f"{folder / WEIGHTS_FILE}: does not fit this model (unexpected "
                                       f"{result.unexpected_keys[:3]}, missing {missing[:3]})")
            except (RuntimeError, ValueError, AdapterError) as e:  # shape mismatch; targets not in this model
                self._delete(name)
                if isinstance(e, AdapterError):
                    raise
                raise AdapterError(f"{folder}: does not fit this model ({str(e).splitlines()[0]})") from None
            if known is not None:
                self._delete(known[1])
            self._names[key] = (sig, name)
            self.loads += 1
            self._activate(None)
            self.model.eval()
            return key

    def _delete(self, name: str) -> None:
        for layer in self._layers():
            if name in layer.lora_A:
                layer.delete_adapter(name)
        cfg = getattr(self.model, "peft_config", None)
        if isinstance(cfg, dict):
            cfg.pop(name, None)

    def _activate(self, key: str | None) -> None:
        name = None if key is None else self._names[key][1]
        for layer in self._layers():
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(name)  # a layer this adapter does not wrap skips it (peft checks lora_A)

    @contextlib.contextmanager
    def use(self, key: str | None) -> Iterator[None]:
        """Run the block with the adapter `key` (from `load`) active, or the base model for None."""
        with self._lock:
            if key is not None and key not in self._names:
                raise AdapterError(f"adapter {key} is not loaded")
            self._activate(key)
            try:
                yield
            finally:
                self._activate(None)  # between blocks the model is the base model


def bank_for(generator: Any) -> AdapterBank | None:
    """An AdapterBank on the generator's model, or None when its backend cannot apply adapters (only the
    native backend, whose `.model` is our decoder, can)."""
    model = getattr(generator, "model", None)
    if not getattr(generator.capabilities, "adapters", False) or not isinstance(model, nn.Module):
        return None
    return AdapterBank(model)


# ------------------------------------------------------------------------------------------ training


def mean_nll(model: nn.Module, examples: Sequence[Any], pad_id: int, batch_size: int = 8) -> tuple[float, int]:
    """Token-weighted mean negative log-likelihood of the examples' labelled tokens, and the token count."""
    from expertrag.model.train.batches import collate

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = collate(examples[i:i + batch_size], pad_id, model.embed_tokens.weight.device)
            logits = model(b.ids, attention_mask=b.mask).logits[:, :-1].float()
            labels = b.labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
    model.train(was_training)
    return (total / count if count else float("nan")), count


def train_adapter(model: nn.Module, train: Sequence[Any], heldout: Sequence[Any], pad_id: int, *, steps: int,
                  lr: float = 2e-4, batch_size: int = 4, seed: int = 0, log_every: int = 0,
                  log: Any = None) -> dict[str, Any]:
    """Fit the attached adapter on `train` examples (model.train.examples.Example: labels -100 where no
    loss), base frozen; held-out perplexity before and after. The model must carry an adapter (`attach`)."""
    from expertrag.model.train.batches import collate, stream_indices

    if not has_adapter(model):
        raise AdapterError("attach an adapter before training")
    if not train:
        raise InputError("no training examples (the expert's domain has no passages and no QA pairs were given)")
    params = [p for p in model.parameters() if p.requires_grad]
    before, tokens_out = mean_nll(model, heldout, pad_id) if heldout else (float("nan"), 0)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    device = model.embed_tokens.weight.device
    for step in range(steps):
        idx = stream_indices(len(train), seed, step * batch_size, batch_size)
        b = collate([train[i] for i in idx], pad_id, device)
        logits = model(b.ids, attention_mask=b.mask).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None and log_every and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.4f}")
    seconds = time.perf_counter() - t0
    model.eval()
    after, _ = mean_nll(model, heldout, pad_id) if heldout else (float("nan"), 0)
    window = max(1, min(10, steps // 4 or 1))
    return {
        "steps": steps, "seconds": round(seconds, 2), "trainable_parameters": trainable_parameters(model),
        "train_examples": len(train), "heldout_examples": len(heldout), "heldout_tokens": tokens_out,
        "loss_start": _mean(losses[:window]), "loss_end": _mean(losses[-window:]),
        "heldout_nll_before": _r(before), "heldout_nll_after": _r(after),
        "perplexity_before": _r(math.exp(before)) if heldout else None,
        "perplexity_after": _r(math.exp(after)) if heldout else None,
    }


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def _r(x: float) -> float | None:
    return None if x != x else round(x, 4)  # NaN -> None (strict JSON)


# ------------------------------------------------------------------------------- an expert's documents


def split_by_document(passages: list, heldout: float, seed: int, by: str | None = None) -> tuple[list, list]:
    """(train, held out) with every passage of a document on one side, so held-out perplexity is measured
    on documents the adapter never saw (not on neighbours of its training passages). `by`: a metadata field
    that groups passages instead of their doc_id (PubMedQA's sections of one paper share `pubid`)."""
    docs = sorted({document_group(p, by) for p in passages})
    random.Random(seed).shuffle(docs)
    n_out = max(1, round(len(docs) * heldout)) if heldout > 0 and len(docs) > 1 else 0
    out_docs = set(docs[:n_out])
    return ([p for p in passages if document_group(p, by) not in out_docs], [p for p in passages if document_group(p, by) in out_docs])


def document_group(p, by: str | None) -> str:
    return str(p.metadata.get(by, p.doc_id)) if by else p.doc_id
