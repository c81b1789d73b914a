"""Full definition of a LLaMA-family language model, all of it in this single file.

LLaMA-1/2/3, TinyLlama and SmolLM2 share one architecture:

    tokens ─► embedding ─► n_layer × Block ─► RMSNorm ─► lm_head ─► logits
    Block:  x = x + Attention(RMSNorm(x))      rotary positions, grouped-query attention, KV cache
            x = x + MLP(RMSNorm(x))            SwiGLU: proj(silu(fc_1 x) * fc_2 x)

References: LLaMA (Touvron et al. 2023, arXiv 2302.13971), LLaMA 2 (arXiv 2307.09288), RoFormer
(Su et al., arXiv 2104.09864), GQA (Ainslie et al., arXiv 2305.13245).

Conventions that the rest of the project relies on:
- Rotary embeddings use Meta's *interleaved* layout: dimensions (2i, 2i+1) of a head form one rotating
  pair. Meta checkpoints and GGUF files store q/k weights in this layout; Hugging Face permutes them
  (convert_checkpoint.py undoes that).
- One fused projection `attn.qkv` produces [all query heads; all key groups; all value groups].
  The adapter (adapter.py) reuses exactly this projection for its prefix keys and values.
"""
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from storage import empty_init, load_weights, read_json_config, read_safetensors


@dataclass
class Config:
    name: str = ""
    block_size: int = 2048  # longest sequence (sizes the rotary cache)
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_embd: int = 4096
    n_query_groups: Optional[int] = None  # key/value heads; None → n_head (plain multi-head attention)
    intermediate_size: Optional[int] = None  # SwiGLU hidden size; None → LLaMA's 2/3·4C rounded to 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # lm_head shares the embedding matrix (SmolLM2)
    # LLaMA-3.1 long-context frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for every other model.
    rope_scaling: Optional[dict] = None

    def __post_init__(self):
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.intermediate_size is None:
            hidden = int(2 * (4 * self.n_embd) / 3)
            self.intermediate_size = 256 * math.ceil(hidden / 256)
        assert self.n_embd % self.n_head == 0, "n_embd must be divisible by n_head"
        assert self.n_head % self.n_query_groups == 0, "n_head must be a multiple of n_query_groups"

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        if name not in configs:
            raise ValueError(f"unknown model config {name!r}; known: {', '.join(configs)}")
        return cls(name=name, **{**configs[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


# Shapes from the papers / released config files.
configs = {
    # LLaMA-1 (norm eps 1e-6)
    "llama-7b": dict(n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, norm_eps=1e-6),
    "llama-13b": dict(n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824, norm_eps=1e-6),
    "llama-30b": dict(n_layer=60, n_head=52, n_embd=6656, intermediate_size=17920, norm_eps=1e-6),
    "llama-65b": dict(n_layer=80, n_head=64, n_embd=8192, intermediate_size=22016, norm_eps=1e-6),
    # LLaMA-2 (70B uses grouped-query attention with 8 key/value groups)
    "llama-2-7b": dict(block_size=4096, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
    "llama-2-13b": dict(block_size=4096, n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
    "llama-2-70b": dict(block_size=4096, n_layer=80, n_head=64, n_embd=8192, n_query_groups=8,
                        intermediate_size=28672),
    # LLaMA-3 / 3.1 (128k vocabulary, θ = 500000; 3.1 adds frequency scaling for long context)
    "llama-3-8b": dict(block_size=8192, vocab_size=128256, n_layer=32, n_head=32, n_embd=4096, n_query_groups=8,
                       intermediate_size=14336, rope_base=500000.0),
    "llama-3.1-8b": dict(block_size=131072, vocab_size=128256, n_layer=32, n_head=32, n_embd=4096,
                         n_query_groups=8, intermediate_size=14336, rope_base=500000.0,
                         rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "tinyllama-1.1b": dict(n_layer=22, n_head=32, n_embd=2048, n_query_groups=4, intermediate_size=5632),
    # SmolLM2 (tied embeddings, 49152-token byte-level BPE)
    "smollm2-135m": dict(block_size=8192, vocab_size=49152, n_layer=30, n_head=9, n_embd=576, n_query_groups=3,
                         intermediate_size=1536, rope_base=100000.0, tie_embeddings=True),
    "smollm2-360m": dict(block_size=8192, vocab_size=49152, n_layer=32, n_head=15, n_embd=960, n_query_groups=5,
                         intermediate_size=2560, rope_base=100000.0, tie_embeddings=True),
    "smollm2-1.7b": dict(block_size=8192, vocab_size=49152, n_layer=24, n_head=32, n_embd=2048,
                         n_query_groups=32, intermediate_size=8192, rope_base=130000.0, tie_embeddings=True),
    # For tests: small enough to run anywhere, with GQA so every code path is exercised.
    "tiny": dict(block_size=256, vocab_size=512, n_layer=2, n_head=4, n_embd=64, n_query_groups=2,
                 intermediate_size=128),
}


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32: norms and rotations in 16-bit lose too much precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight, computed in (at least) float32 for stability."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # one fused kernel; bf16/fp16 inputs computed in fp32
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rope_frequencies(head_size: int, base: float, scaling: Optional[dict] = None) -> torch.Tensor:
    """θ_i = base^(-2i/D) for i in [0, D/2), optionally with LLaMA-3.1's scaling of low frequencies."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size))
    if scaling:
        # Wavelengths longer than the original context are slowed by `factor`; short ones are kept;
        # the band in between is interpolated smoothly (Meta's llama3 reference scheme).
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        band = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(band, interpolated, inv_freq)
    return inv_freq.float()


def build_rope_cache(seq_len: int, head_size: int, base: float, scaling=None, device=None):
    """cos and sin of position·θ_i, each (seq_len, head_size // 2), float32."""
    inv_freq = rope_frequencies(head_size, base, scaling).to(device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of every head by its angle. x: (B, n_heads, T, D);
    cos, sin: (T, D/2)."""
    x32 = upcast(x)
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def attention(q, k, v, mask=None, causal=False, scale=None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v, scale 1/√D by default; q (B, H, T, D), k and v (B or 1, G, S, D): query head
    h reads key/value group h // (H/G); mask (broadcast to (B, H, T, S)) is True where attending is allowed. On a
    CPU in bf16 the fused kernel is slower than plain matmuls (bench/attention.py), so there it is written out."""
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if q.device.type == "cpu" and (q.dtype == torch.bfloat16 or autocast_bf16):
        return matmul_attention(q, k, v, mask, causal, scale)
    if k.shape[1] == 1 < q.shape[1]:  # one key/value set for every head: views, no grouped-query kernel needed
        k, v = k.expand(-1, q.shape[1], -1, -1), v.expand(-1, q.shape[1], -1, -1)
    return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def matmul_attention(q, k, v, mask=None, causal=False, scale=None) -> torch.Tensor:
    """`attention` written out. The H/G query heads of a group are stacked along the rows, so each group takes one
    matmul against its keys (G = 1: all heads in one matmul). The softmax runs in the scores' dtype: for bf16 the
    kernel accumulates in fp32 (its outputs equal fp32's rounded to bf16), at half the memory traffic."""
    (B, H, T, D), G, S = q.shape, k.shape[1], k.shape[2]
    q = q.reshape(B, G, H // G * T, D) * (scale or 1 / math.sqrt(D))
    s = (q @ k.transpose(-1, -2)).view(B, H, T, S)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril() if causal else mask  # causal: T = S
    if mask is not None:  # added, not masked_fill: the backward of an addition costs nothing
        s = s + torch.zeros(mask.shape, dtype=s.dtype, device=s.device).masked_fill_(~mask, float("-inf"))
    return (s.softmax(dim=-1).view(B, G, H // G * T, S) @ v).view(B, H, T, v.shape[-1])


class KVCache(nn.Module):
    """Preallocated keys and values for incremental decoding: (B, G, max_seq_length, D) each."""

    def __init__(self, k_shape, v_shape, device=None, dtype=None):
        super().__init__()
        self.register_buffer("k", torch.zeros(k_shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(v_shape, device=device, dtype=dtype), persistent=False)

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, G, T, D) at positions input_pos (T,) and return the cache up to the last
        written position, which is all any query in this step may attend to."""
        self.k, self.v = self.k.to(k.dtype), self.v.to(v.dtype)  # follow the step's dtype (autocast); no-op if equal
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        end = int(input_pos.max()) + 1
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.n_head, self.n_query_groups, self.head_size = config.n_head, config.n_query_groups, config.head_size
        # One fused projection: [H query heads; G key groups; G value groups], each D wide.
        qkv_size = (config.n_head + 2 * config.n_query_groups) * config.head_size
        self.qkv = nn.Linear(config.n_embd, qkv_size, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def split_heads(self, qkv: torch.Tensor):
        """(B, T, (H + 2G)·D) → q (B, H, T, D), k and v (B, G, T, D)."""
        B, T, _ = qkv.shape
        H, G, D = self.n_head, self.n_query_groups, self.head_size
        return tuple(x.view(B, T, -1, D).transpose(1, 2) for x in qkv.split((H * D, G * D, G * D), dim=-1))

    def attend(self, x, cos, sin, input_pos):
        """Causal self-attention before the output projection: the RoPE'd queries and the output, both (B, H, T, D)
        (the adapter adds its branches to the output and reuses the queries)."""
        q, k, v = self.split_heads(self.qkv(x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is None:
            return q, attention(q, k, v, causal=True)
        if self.kv_cache is None:
            raise RuntimeError("call model.set_kv_cache(...) before decoding with input_pos")
        k, v = self.kv_cache(input_pos, k, v)
        return q, attention(q, k, v, torch.arange(k.shape[2], device=k.device) <= input_pos[:, None])  # p sees 0..p

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) → (B, T, C) through the output projection."""
        B, H, T, D = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))

    def forward(self, x, cos, sin, input_pos=None):
        return self.project(self.attend(x, cos, sin, input_pos)[1])


class MLP(nn.Module):
    """SwiGLU feed-forward: proj(silu(fc_1 x) · fc_2 x)."""

    def __init__(self, config: Config):
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)  # gate
        self.fc_2 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)  # up
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class Block(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, input_pos=None):
        x = x + self.attn(self.norm_1(x), cos, sin, input_pos)
        return x + self.mlp(self.norm_2(x))


class LLaMA(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList(self.build_block(config, i) for i in range(config.n_layer)),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        self._rope = None  # (cos, sin), built lazily so meta-device construction costs nothing

    def build_block(self, config: Config, i: int) -> nn.Module:
        """Block i of the stack; adapter.py overrides this to put adapters into the upper blocks."""
        return Block(config)

    @staticmethod
    def _init_weights(module):
        # Only matters for randomly initialised models (tests); real weights are loaded over these.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def rope_cache(self, device):
        if self._rope is None or self._rope[0].device != device:
            c = self.config
            self._rope = build_rope_cache(c.block_size, c.head_size, c.rope_base, c.rope_scaling, device)
        return self._rope

    def set_kv_cache(self, batch_size: int, max_seq_length: Optional[int] = None, device=None, dtype=None):
        """Allocate every block's KV cache; decoding then passes `input_pos`."""
        c, w = self.config, self.lm_head.weight
        shape = (batch_size, c.n_query_groups, max_seq_length or c.block_size, c.head_size)
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(shape, shape, device or w.device, dtype or w.dtype)

    def clear_kv_cache(self):
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def prepare(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor]):
        """Embeddings and rotary tables for a forward pass over idx (B, T) (at positions input_pos, decoding)."""
        T = idx.shape[1]
        if input_pos is None and T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        cos, sin = self.rope_cache(idx.device)
        cos, sin = (cos[:T], sin[:T]) if input_pos is None else (cos[input_pos], sin[input_pos])
        return self.transformer.wte(idx), cos, sin

    def head(self, x: torch.Tensor, logits_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final norm and lm_head. With logits_mask (B, T) bool, only those positions are scored and
        the result is (N, vocab) for the N selected positions: training needs logits only where there
        are labels, which skips most of the (large) lm_head matmul."""
        if logits_mask is not None:
            x = x[logits_mask]
        return self.lm_head(self.transformer.ln_f(x))

    def forward(self, idx, input_pos=None, logits_mask=None):
        """idx (B, T) → logits (B, T, vocab), or (N, vocab) with logits_mask. With input_pos (T,) the tokens
        are written into the KV cache at those positions (decoding)."""
        x, cos, sin = self.prepare(idx, input_pos)
        for block in self.transformer.h:
            x = block(x, cos, sin, input_pos)
        return self.head(x, logits_mask)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir, device=None, dtype=None, **model_kwargs):
        """Load a converted checkpoint folder (config.json + model.safetensors)."""
        checkpoint_dir = Path(checkpoint_dir)
        config_path, weights_path = checkpoint_dir / "config.json", checkpoint_dir / "model.safetensors"
        for p in (config_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found; convert a checkpoint with convert_checkpoint.py")
        config = read_json_config(config_path, Config.from_dict, "an LLM config")
        with empty_init():
            model = cls(config, **model_kwargs)
        state = read_safetensors(weights_path, device=device or "cpu")  # one-line error for a damaged file
        missing = load_weights(model, state, where=weights_path)
        if missing:
            raise ValueError(f"{weights_path} lacks {len(missing)} tensors (first: {missing[0]!r}): "
                             "does it match config.json?")
        return model if dtype is None else model.to(dtype)
