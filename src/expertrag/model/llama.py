"""A Llama-style decoder (SmolLM2's architecture), small enough to read in one sitting.

    tokens -> embed -> [RMSNorm -> GQA attention (RoPE, KV cache) -> +res -> RMSNorm -> FFN -> +res] x L
           -> RMSNorm -> tied lm_head -> logits

Module and parameter names follow Hugging Face's Llama (`layers.3.self_attn.q_proj.weight`, ...), so a
transformers state dict loads after stripping its `model.` prefix.

The FFN of every layer is pluggable: any module with
`forward(x, passages=None, attention_mask=None) -> (y, MoEAux | None)` can replace `layers[i].mlp` (see
`LlamaLM.set_ffn`; `model.upcycle.upcycle` does it for MoE layers). Passages (`PassageMemory`) and the [B, T]
mask of the current tokens are handed unchanged to every FFN (an MoE layer keeps padding out of its router
losses with the mask); the dense FFN ignores both.

Padding is on the left. Padded key positions are never attended to; each query always sees itself,
so padded queries stay finite (their outputs are meaningless and ignored).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from expertrag.moe.types import MoEAux, PassageMemory

# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LlamaArgs:
    """Architecture hyper-parameters, read from a Hugging Face Llama config (never hard-coded)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # for non-default RoPE

    @classmethod
    def from_hf(cls, config: Any) -> LlamaArgs:
        """From a transformers LlamaConfig or the dict of its config.json (no transformers import)."""
        raw = config if isinstance(config, dict) else config.to_dict()

        def get(key: str, default: Any = None) -> Any:
            value = raw.get(key)
            return default if value is None else value

        if get("model_type") != "llama":
            raise ValueError(f"expected a llama config, got model_type={get('model_type')!r}")
        if get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {get('hidden_act')!r} (only silu)")
        rope = dict(get("rope_parameters") or get("rope_scaling") or {})
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            num_kv_heads=get("num_key_value_heads", raw["num_attention_heads"]),
            head_dim=get("head_dim", raw["hidden_size"] // raw["num_attention_heads"]),
            rms_norm_eps=raw["rms_norm_eps"],
            rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))),
            max_position_embeddings=raw["max_position_embeddings"],
            tie_word_embeddings=bool(get("tie_word_embeddings", True)),
            attention_bias=bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
            pad_token_id=get("pad_token_id"),
            eos_token_id=get("eos_token_id"),
            rope_parameters=rope,
            hf_config=raw,
        )


# ------------------------------------------------------------------------------------------ KV cache


class KVCache:
    """Pre-allocated per-layer keys/values `[B, H_kv, capacity, D]`, plus which key slots are real tokens.

    `length` slots are filled. `begin(T, mask)` reserves T more (growing if needed) before a forward;
    each layer then `update`s its slice. `positions[b]` is the RoPE position of row b's next real token.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 capacity: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, max(capacity, 1), head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.mask = torch.zeros(batch_size, shape[2], dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.has_padding = False  # any masked slot among the first `length`

    @classmethod
    def for_model(cls, model: LlamaLM, batch_size: int, capacity: int) -> KVCache:
        a = model.args
        p = model.embed_tokens.weight
        return cls(a.num_layers, batch_size, a.num_kv_heads, a.head_dim, capacity, dtype=p.dtype, device=p.device)

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)

        def grown(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = new_cap
            out = t.new_zeros(shape)
            out.narrow(dim, 0, self.length).copy_(t.narrow(dim, 0, self.length))
            return out

        self.k = [grown(t, 2) for t in self.k]
        self.v = [grown(t, 2) for t in self.v]
        self.mask = grown(self.mask, 1)

    def begin(self, num_new: int, new_mask: torch.Tensor | None) -> torch.Tensor:
        """Reserve `num_new` slots for the coming forward; return the new tokens' positions [B, T]."""
        start = self.length
        if start + num_new > self.capacity:
            self._grow(start + num_new)
        dev = self.positions.device
        if new_mask is None or bool(new_mask.all()):
            self.mask[:, start:start + num_new] = True
            pos = self.positions[:, None] + torch.arange(num_new, device=dev)
            self.positions += num_new
        else:
            new_mask = new_mask.to(torch.bool)
            self.mask[:, start:start + num_new] = new_mask
            pos = (self.positions[:, None] + new_mask.long().cumsum(1) - 1).clamp_(min=0)
            self.positions += new_mask.sum(1)
            self.has_padding = True
        self.length = start + num_new
        return pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values of `layer` (filling the slots `begin` reserved); return all so far."""
        end = self.length
        start = end - k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` slots."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length
        m = self.mask[:, :length]
        self.positions = m.sum(1)
        self.has_padding = not bool(m.all())

    def copy(self) -> KVCache:
        """An independent copy (to branch two continuations from one state)."""
        new = KVCache.__new__(KVCache)
        new.k = [t.clone() for t in self.k]
        new.v = [t.clone() for t in self.v]
        new.mask = self.mask.clone()
        new.positions = self.positions.clone()
        new.length = self.length
        new.has_padding = self.has_padding
        return new


# ---------------------------------------------------------------------------------- decode fast path

FAST_ROWS = 2  # measured on AVX2/MKL: faster for 1-2 rows, slightly slower from 4 rows on


def _unwrapped(lin: nn.Module) -> nn.Module:
    """A peft LoRA wrapper whose adapters are switched off (experts/adapter.py AdapterBank between experts)
    computes exactly its base linear: return that, so the base model keeps the fused fast path and gives
    bit-for-bit what it gave before any adapter was injected. Anything else is returned as it is."""
    base = getattr(lin, "base_layer", None)
    if type(base) is nn.Linear and getattr(lin, "disable_adapters", False) and not getattr(lin, "merged", False):
        return base
    return lin


def project(owner: nn.Module, x: torch.Tensor, *names: str) -> tuple[torch.Tensor, ...]:
    """`owner.<name>(x)` for each named nn.Linear child, all reading the same x.

    Decoding a token is little else than matrix-vector products, so for at most FAST_ROWS rows on CPU
    outside autograd they are done as ONE product with a cached contiguous [in, sum(out)] copy of the
    weights: MKL runs that layout 20-30% faster than nn.Linear's [out, in], and fusing q/k/v (gate/up)
    saves ~10% more. The copy is rebuilt whenever a weight changes (new tensor, in-place update, dtype).
    """
    linears = [_unwrapped(getattr(owner, n)) for n in names]
    # Only plain nn.Linear children: a wrapped one (a LoRA adapter injected by peft, experts/adapter.py) adds
    # to its base weight in its own forward, which the fused product would silently skip.
    if any(type(lin) is not nn.Linear for lin in linears):
        return tuple(lin(x) for lin in linears)
    w0 = linears[0].weight
    if x.numel() > FAST_ROWS * x.shape[-1] or not x.is_cpu or (w0.requires_grad and torch.is_grad_enabled()):
        return tuple(lin(x) for lin in linears)
    key = tuple((lin.weight.data_ptr(), lin.weight.dtype, None if lin.weight.is_inference() else
                 lin.weight._version) for lin in linears)
    cache = owner.__dict__.setdefault("_fused_t", {})
    hit = cache.get(names)
    if hit is None or hit[0] != key:
        w = torch.cat([lin.weight.detach() for lin in linears]).t().contiguous()
        b = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
        hit = cache[names] = (key, w, b)
    y = x @ hit[1]
    if hit[2] is not None:
        y = y + hit[2]
    return y.split([lin.out_features for lin in linears], -1)


# ------------------------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as transformers does), scale in the model dtype.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE cos/sin, looked up from a table that grows with the largest position seen."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.inv_freq, self.scale = self._inv_freq(args)
        self.cos = self.sin = torch.empty(0, device="cpu")

    @staticmethod
    def _inv_freq(args: LlamaArgs) -> tuple[torch.Tensor, float]:
        rope_type = args.rope_parameters.get("rope_type", args.rope_parameters.get("type", "default"))
        if rope_type == "default":
            d = args.head_dim
            exponent = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d
            return 1.0 / (args.rope_theta ** exponent), 1.0
        if rope_type in ("dynamic", "longrope"):
            raise NotImplementedError(f"RoPE type {rope_type!r} (sequence-length dependent) is not supported")
        from transformers import LlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # linear, llama3, yarn, ...

        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](LlamaConfig(**args.hf_config), "cpu")
        return inv_freq.float(), float(scale)

    def _build(self, n: int, device: torch.device, dtype: torch.dtype) -> None:
        n = max(n, self.args.max_position_embeddings, 2 * self.cos.shape[0])
        freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * self.scale).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * self.scale).to(device=device, dtype=dtype)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, 1, T, D] for integer positions [B, T]."""
        if self.cos.device != positions.device or self.cos.dtype != dtype or int(positions.max()) >= self.cos.shape[0]:
            self._build(int(positions.max()) + 1, positions.device, dtype)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Grouped-query self-attention: `num_heads` query heads share `num_kv_heads` key/value heads."""

    def __init__(self, args: LlamaArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.h, self.h_kv, self.d = args.num_heads, args.num_kv_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.h * self.d, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.h_kv * self.d, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.h_kv * self.d, bias=bias)
        self.o_proj = nn.Linear(self.h * self.d, args.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(self, x, "q_proj", "k_proj", "v_proj")
        q = q.view(B, T, self.h, self.d).transpose(1, 2)
        k = k.view(B, T, self.h_kv, self.d).transpose(1, 2)
        v = v.view(B, T, self.h_kv, self.d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.h != self.h_kv)
        return project(self, y.transpose(1, 2).reshape(B, T, self.h * self.d), "o_proj")[0]


class DenseFFN(nn.Module):
    """The decoder's dense SwiGLU FFN, down(silu(gate(x)) * up(x)), with the FFN-slot contract of an MoE layer:
    it returns (y, None), None standing for the MoEAux a dense layer does not have."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, passages: PassageMemory | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        gate, up = project(self, x, "gate_proj", "up_proj")
        return project(self, F.silu(gate) * up, "down_proj")[0], None


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp: nn.Module = DenseFFN(args.hidden_size, args.intermediate_size, args.mlp_bias)

    def forward(self, x, cos, sin, mask, is_causal, cache, passages, token_mask=None
                ) -> tuple[torch.Tensor, MoEAux | None]:
        """token_mask: [B, T] bool of the current tokens (None = all real), for the FFN's router losses."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        y, aux = self.mlp(self.post_attention_layernorm(x), passages=passages, attention_mask=token_mask)
        return x + y, aux


# --------------------------------------------------------------------------------------------- model


@dataclass
class LMOutput:
    logits: torch.Tensor  # [B, T_kept, V]
    cache: KVCache | None
    hidden_states: tuple[torch.Tensor, ...] | None  # (embeddings, layer 1 out, ..., norm(layer L out))
    aux: list[MoEAux | None]  # one per layer; None for dense FFNs


def attention_mask_for(cache_mask: torch.Tensor | None, T: int, S: int, device: torch.device,
                       ) -> torch.Tensor:
    """Boolean [B|1, 1, T, S] mask for T new queries over S keys (the last T of them new).

    Causal, padded keys hidden, and the diagonal always open so a padded query never sees zero keys.
    """
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    causal = k_pos <= q_pos
    if cache_mask is None:
        return causal[None, None]
    return (cache_mask[:, None, None, :S] & causal) | (k_pos == q_pos)


class LlamaLM(nn.Module):
    def __init__(self, args: LlamaArgs, *, init_embeddings: bool = True):
        super().__init__()
        self.args = args
        # init_embeddings=False skips the random init (weights are about to be loaded; on the meta
        # device that init alone costs a ~1 s import).
        skip = None if init_embeddings else torch.empty(args.vocab_size, args.hidden_size)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, _weight=skip)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(args)

    # ------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, folder: str | Path, cfg: Any = None) -> LlamaLM:
        """Build from a Hugging Face Llama folder (config.json + safetensors). `cfg`: a ModelConfig."""
        from safetensors.torch import load_file

        folder = Path(folder)
        args = LlamaArgs.from_hf(json.loads((folder / "config.json").read_text()))
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
            "model.safetensors"]
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(folder / name))
        with torch.device("meta"):  # no time spent on random init
            model = cls(args, init_embeddings=False)
        model.load_hf_state_dict(state)
        if cfg is not None:
            model.to(device=cfg.device, dtype=getattr(torch, cfg.dtype))
        return model.eval()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a transformers LlamaForCausalLM state dict (keys `model.*`, `lm_head.weight`)."""
        ours = {k.removeprefix("model."): v for k, v in state.items()}
        if self.args.tie_word_embeddings:
            ours.pop("lm_head.weight", None)
        missing, unexpected = self.load_state_dict(ours, strict=False, assign=True)
        missing = [k for k in missing if not (k == "lm_head.weight" and self.args.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if self.args.tie_word_embeddings:  # assign=True replaced the shared Parameter: tie again
            self.lm_head.weight = self.embed_tokens.weight

    # ----------------------------------------------------------------------------------- plugging

    def set_ffn(self, layer: int, module: nn.Module) -> None:
        """Replace layer `layer`'s FFN by any module with
        `forward(x, passages=None, attention_mask=None) -> (y, aux)`."""
        self.layers[layer].mlp = module

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if not isinstance(layer.mlp, DenseFFN)]

    # ----------------------------------------------------------------------------------- passages

    def encode_passages(self, passage_ids: Sequence[Sequence[int]]) -> PassageMemory:
        """PassageMemory from one token-id list per batch row (several passages may be concatenated;
        an empty list = no passages for that row), embedded with the model's own token embeddings."""
        P = max((len(p) for p in passage_ids), default=0) or 1
        dev = self.embed_tokens.weight.device
        ids = torch.zeros(len(passage_ids), P, dtype=torch.long, device=dev)
        mask = torch.zeros(len(passage_ids), P, dtype=torch.bool, device=dev)
        for b, p in enumerate(passage_ids):
            if len(p):
                ids[b, :len(p)] = torch.as_tensor(list(p), dtype=torch.long)
                mask[b, :len(p)] = True
        return PassageMemory(states=self.embed_tokens(ids), mask=mask)

    # ------------------------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        passages: PassageMemory | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> LMOutput:
        """input_ids [B, T] (left-padded). attention_mask: [B, T] for these tokens, or [B, past+T] (only
        its last T columns are read; the cache remembers the past). position_ids default to the count
        of real tokens before each one. logits_to_keep=n computes logits for the last n positions only."""
        B, T = input_ids.shape
        new_mask = None
        if attention_mask is not None:
            new_mask = attention_mask[:, -T:].to(torch.bool)
            if bool(new_mask.all()):
                new_mask = None
        if cache is not None:
            past = cache.length
            pos = cache.begin(T, new_mask)
            S = cache.length
            key_mask = cache.mask if cache.has_padding else None
        else:
            past, S = 0, T
            if new_mask is None:
                pos = torch.arange(T, device=input_ids.device).expand(B, T)
            else:
                pos = (new_mask.long().cumsum(1) - 1).clamp_(min=0)
            key_mask = new_mask
        if position_ids is not None:
            pos = position_ids[:, -T:]

        # The mask is built once per forward and shared by every layer.
        if key_mask is None and past == 0:
            mask, is_causal = None, T > 1  # plain causal prefill
        elif key_mask is None and T == 1:
            mask, is_causal = None, False  # one new token sees every cached one
        else:
            mask, is_causal = attention_mask_for(key_mask, T, S, input_ids.device), False

        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(pos, x.dtype)
        hidden = [x] if output_hidden_states else None
        aux: list[MoEAux | None] = []
        for layer in self.layers:
            x, a = layer(x, cos, sin, mask, is_causal, cache, passages, new_mask)
            aux.append(a)
            if hidden is not None:
                hidden.append(x)
        if hidden is not None:  # as transformers: the last entry is after the final norm
            x = hidden[-1] = self.norm(x)
        elif logits_to_keep:
            x = self.norm(x[:, -logits_to_keep:])
        else:
            x = self.norm(x)
        logits = project(self, x[:, -logits_to_keep:] if logits_to_keep else x, "lm_head")[0]
        return LMOutput(logits=logits, cache=cache, hidden_states=tuple(hidden) if hidden else None, aux=aux)
