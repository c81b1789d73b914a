"""Whispering-LLaMA: a frozen LLaMA that reads a Whisper n-best list and listens to the audio.

Implementation of the paper:
    Whispering LLaMA: A Cross-Modal Generative Error Correction Framework for Speech Recognition
    Radhakrishnan et al., EMNLP 2023, https://arxiv.org/abs/2310.06434
which builds on LLaMA-Adapter (Zhang et al. 2023, https://arxiv.org/abs/2303.16199).

Every LLaMA block from `adapter_start_layer` on gets two small trained adapters added to its attention:

                      x (B, T, C)
                          │  frozen fused qkv, RoPE on q and k
            ┌─────────────┼───────────────────────────────┐
            ▼             ▼                               ▼
     causal self-attn   AiL: prefix P (L×C) ──RMSNorm──►   AiW: Whisper encoder output A (B, F, W)
     over the text      frozen qkv ─► k_p, v_p (no RoPE)      k = A Wk,  v = A Wv + bv   (frozen copies of
            │           softmax(q k_pᵀ/√D) v_p                 Whisper decoder block j's cross-attention)
            │             │                                  k̂ = up(silu(down(rmsnorm_k(k))))   (trained,
            │             │                                  v̂ = up(silu(down(rmsnorm_v(v))))    identity init)
            │             │                                  split into Whisper heads, pad to LLaMA's (H, F, D)
            │             │                                  q'' = mix_heads(q Q_d) Q_h          (trained,
            │             │                                  softmax(q'' K_padᵀ/√D) V_pad         identity init)
            ▼             ▼                                     ▼
            y   +   gate_L · y_prefix (gate_L = 0 at init)  +  gate_W · y_whisper (gate_W = 1 at init)
                          │
                      output projection, residual, MLP (frozen, as in LLaMA)

Padding. Whisper's heads (Hw heads of size Dw) are fewer and narrower than LLaMA's (H heads of size D).
The paper pads them into LLaMA's shape with a template: every head is the F×D matrix with ones on its
principal diagonal ([t, d] = 1 iff t == d), and the top-left [:Hw, :, :Dw] block holds k̂ (or v̂).
`whisper_attention` computes the same function without building the (B, H, F, D) template: the padding
heads in closed form, the Whisper heads with their identity tail through the fused attention kernel
(tests/wl_reference.py builds the template literally, as the oracle); where the bottleneck is narrower than a
Whisper head, the heads attend over its low-rank codes instead (`low_rank_heads`). k̂ and v̂ depend only on the audio,
so while decoding they are computed at the first step and kept with the block's KV cache, as are the prefix
keys/values (set_kv_cache starts that cache, clear_kv_cache ends it: nothing leaks into the next utterance).

Two ways to split k̂ (B, F, W) into heads exist: `heads` (correct: (B, F, Hw, Dw), heads moved forward)
and `paper` (the reference code's view of the contiguous buffer as (B, Hw, F, Dw), which mixes frames into
heads). `paper` reproduces the reference numerics and is needed to run its released adapters.

Trainable: prefix, both gates, rmsnorm_k/v, down/up, Q_d, Q_h (every name that starts with `adapter_`).
Frozen: the whole LLaMA and the Whisper key/value projections.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Block, CausalSelfAttention, Config, LLaMA, RMSNorm, attention, upcast

VARIANTS = {  # name → (rank r: the bottleneck is W // r wide, one down/up pair shared by keys and values)
    "L": (8, False),   # WL-L: separate down/up for keys and values, 26.40M trainable on 7B + large-v2
    "M": (16, True),   # WL-M: 7.97M
    "S": (32, True),   # WL-S: 4.89M
}


@dataclass
class WLConfig(Config):
    adapter_prompt_length: int = 10  # L: prefix length of AiL (the paper's "big adapter" uses 40)
    adapter_start_layer: int = 2  # blocks before this one are plain LLaMA blocks
    variant: str = "M"  # L / M / S, see VARIANTS
    kv_layout: str = "heads"  # how k̂/v̂ are split into Whisper heads: "heads" or "paper"
    adapter_norm_eps: float = 1e-5  # RMSNorm eps of the adapter norms (the reference code used 1e-5)
    # The Whisper model whose encoder features are fused (set from its dimensions).
    whisper_width: int = 1280  # W
    whisper_heads: int = 20  # Hw
    whisper_layers: int = 32  # decoder depth, for the LLaMA block → Whisper block mapping
    # Ablations (paper Table 2)
    use_whisper: bool = True  # False: text-only adapter (AiL only)
    random_audio: bool = False  # replace the audio features with standard normal noise, drawn at every forward
    # False: "no special initialisation" as the reference ran it: down/up drawn from a standard normal and the
    # padding template replaced by standard normal noise drawn at every forward; Q_d/Q_h stay identity.
    identity_init: bool = True
    # Attend only to the encoder frames that carry audio (ceil(seconds · 50); a 3 s clip fills 150 of the 1500),
    # instead of the whole 30 s window the paper uses. Saves compute and memory; changes the function.
    trim_audio: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.kv_layout not in ("heads", "paper"):
            raise ValueError(f"kv_layout must be 'heads' or 'paper', got {self.kv_layout!r}")
        if self.use_whisper and self.whisper_width % self.whisper_heads:
            raise ValueError("whisper_width must be divisible by whisper_heads")
        if self.use_whisper and (self.whisper_heads > self.n_head or self.whisper_head_size > self.head_size):
            raise ValueError(f"Whisper heads ({self.whisper_heads} × {self.whisper_head_size}) must fit into the "
                             f"LLM's heads ({self.n_head} × {self.head_size}) for the padding template")

    @property
    def whisper_head_size(self) -> int:
        return self.whisper_width // self.whisper_heads

    @property
    def adapter_rank(self) -> int:
        return VARIANTS[self.variant][0]

    @property
    def shared_down_up(self) -> bool:
        return VARIANTS[self.variant][1]

    def whisper_block(self, i: int) -> int:
        """The Whisper decoder block whose cross-attention k/v projections LLaMA block i copies."""
        return i if self.whisper_layers == self.n_layer else (i * self.whisper_layers) // self.n_layer


def prefix_attention(q, k_p, v_p):
    """AiL: every query attends to the L prefix positions, no mask.
    q (B, H, T, D); k_p, v_p (1, G, L, D), shared across the batch."""
    B = q.shape[0]
    k_p, v_p = k_p.expand(B, -1, -1, -1), v_p.expand(B, -1, -1, -1)  # views, no copy
    return attention(q, k_p, v_p)


def whisper_attention(q: torch.Tensor, k_tail: torch.Tensor, v_tail: torch.Tensor, up=None) -> torch.Tensor:
    """softmax(q K_padᵀ / √D) V_pad for all H heads, building K_pad/V_pad only for the Hw Whisper heads.
    Literally (the paper's template; tests/wl_reference.py computes it so):

        K_pad = eye(F, D) for each of the H heads;  K_pad[:, :Hw, :, :Dw] = k̂   (V_pad likewise with v̂)
        y = softmax(q K_padᵀ / √D) V_pad

    q: (B, H, T, D), already transformed by Q_d and Q_h. k_tail, v_tail: (B, Hw, F, D) from `identity_tail`,
    i.e. exactly the Whisper heads of K_pad/V_pad; or, with up = (U_k, U_v), their low-rank codes (see
    `low_rank_heads`). Returns (B, H, T, D).

    The Whisper heads go through model.attention (the fused kernel, which never materialises the (T × F) score
    matrix; on a CPU in bf16 two matmuls, faster there). The H - Hw padding heads are never built: their key for
    frame f is the unit vector e_f for f < min(F, D) and all-zero beyond, so their scores are q[..., :n] followed
    by F - n zeros (which act together like one extra score of log(F - n)), and their output column d is the
    probability of frame d."""
    B, H, T, D = q.shape
    Hw, F_ = k_tail.shape[1:3]
    y_real = attention(q[:, :Hw], k_tail, v_tail) if up is None else low_rank_heads(q[:, :Hw], k_tail, v_tail, *up)
    if H == Hw:
        return y_real
    n = min(F_, D)
    s = q[:, Hw:, :, :n] / math.sqrt(D)
    if F_ > n:
        s = torch.cat((s, s.new_full((*s.shape[:-1], 1), math.log(F_ - n))), dim=-1)
    p = s.softmax(dim=-1)[..., :n]
    return torch.cat((y_real, F.pad(p, (0, D - n))), dim=1)


def low_rank_heads(q, codes_k, codes_v, up_k, up_v):
    """The Whisper heads of whisper_attention when k̂ = s_k U_kᵀ and v̂ = s_v U_vᵀ leave a bottleneck narrower than
    a head (R < Dw; WL-M on tiny.en: R = 24, Dw = 64). With U_h head h's Dw rows of U (W, R) and E the tail:

        q K_pad,hᵀ = [q[:Dw] U_k,h | q[Dw:]] [s_k | E]ᵀ        P V_pad,h = [(P s_v) U_v,hᵀ | P E]

    so each head attends over the codes [s | E] (B, Hw, F, R + D - Dw: one tensor expanded over the heads, passed
    as one key/value group) with a query mapped to them: the same function in R + D - Dw columns instead of D (2.7×
    fewer for tiny.en WL-M)."""
    B, Hw, T, D = q.shape
    W, R = up_k.shape
    Uk, Uv = up_k.view(Hw, W // Hw, R), up_v.view(Hw, W // Hw, R)  # (Hw, Dw, R)
    q_codes = torch.cat((q[..., :W // Hw] @ Uk.to(q.dtype), q[..., W // Hw:]), dim=-1)
    y = attention(q_codes, codes_k[:, :1], codes_v[:, :1], scale=1 / math.sqrt(D))  # D: the template's head size
    return torch.cat((y[..., :R] @ Uv.transpose(1, 2).to(y.dtype), y[..., R:]), dim=-1)


def identity_tail(x: torch.Tensor, D: int, Dw=None) -> torch.Tensor:
    """(B, Hw, F, Dw) → (B, Hw, F, D): columns [Dw, D) hold the template's identity (frame f has its 1 in
    column f). Only the Whisper heads' part of the padding; the padding heads are handled in closed form.
    For low-rank codes (B, Hw, F, R) the same D - Dw columns follow the R."""
    B, Hw, F_, X = x.shape
    eye = torch.eye(F_, D, dtype=x.dtype, device=x.device)[:, Dw or X:]
    return torch.cat((x, eye.expand(B, Hw, F_, eye.shape[1])), dim=-1)


def random_template(x: torch.Tensor, H: int, D: int) -> torch.Tensor:
    """(B, Hw, F, Dw) → (B, H, F, D) for the no-special-initialisation ablation, as the reference code ran it:
    the padding template is standard normal noise (one F×D draw per example, repeated over the H heads, drawn
    afresh at every call), with [:Hw, :, :Dw] = x. Nothing is in closed form here: it is an ablation."""
    B, Hw, F_, Dw = x.shape
    noise = torch.randn(B, 1, F_, D, device=x.device).to(x.dtype).expand(B, H, F_, D)
    whisper_heads = torch.cat((x, noise[:, :Hw, :, Dw:]), dim=-1)
    return torch.cat((whisper_heads, noise[:, Hw:]), dim=1)


class AdapterAttention(CausalSelfAttention):
    """LLaMA's attention plus AiL (prefix) and AiW (Whisper) branches; see the module docstring."""

    def __init__(self, config: WLConfig, block_idx: int):
        super().__init__(config)
        self.config = config
        self.whisper_block = config.whisper_block(block_idx)  # j: the Whisper block whose k/v projections it copies
        C, H, D = config.n_embd, config.n_head, config.head_size
        # AiL: the learnable prefix and its zero-initialised gate.
        self.adapter_prefix = nn.Embedding(config.adapter_prompt_length, C)
        self.adapter_gate_prefix = nn.Parameter(torch.zeros(1))
        if config.use_whisper:
            W, r = config.whisper_width, config.adapter_rank
            # Frozen copies of Whisper's cross-attention projections (filled by build_model).
            self.whisper_key = nn.Linear(W, W, bias=False)
            self.whisper_value = nn.Linear(W, W, bias=True)
            # AiW: trained re-alignment of Whisper's keys/values (an auto-encoder with a W/r bottleneck).
            self.adapter_norm_k = RMSNorm(W, config.adapter_norm_eps)
            self.adapter_norm_v = RMSNorm(W, config.adapter_norm_eps)
            self.adapter_down_k = nn.Linear(W, W // r, bias=False)
            self.adapter_up_k = nn.Linear(W // r, W, bias=False)
            if not config.shared_down_up:  # WL-L: the values get their own pair
                self.adapter_down_v = nn.Linear(W, W // r, bias=False)
                self.adapter_up_v = nn.Linear(W // r, W, bias=False)
            # Query re-alignment: q' = q Q_d within each head, then q'' mixes heads with Q_h.
            self.adapter_q_dim = nn.Parameter(torch.empty(D, D))
            self.adapter_q_head = nn.Parameter(torch.empty(H, H))
            self.adapter_gate_whisper = nn.Parameter(torch.ones(1))
            # k̂, v̂ have rank R = W/r: below a head's Dw (tiny.en WL-M) attending over the R-wide codes is cheaper
            # (low_rank_heads). The `paper` layout and the random template mix frames into heads: they need K_pad.
            self.low_rank = config.kv_layout == "heads" and config.identity_init and W // r < config.whisper_head_size
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self):
        """The paper's initialisation: zero prefix gate, unit Whisper gate and norms, identity Q_d/Q_h and
        down/up (or, for the no-special-initialisation ablation, standard normal down/up)."""
        c = self.config
        if self.adapter_gate_prefix.is_meta:  # built without storage (storage.empty_init): values come later
            return
        # lit-llama's LLaMA-Adapter leaves the prefix at nn.Embedding's default init (its gate is 0).
        nn.init.normal_(self.adapter_prefix.weight)
        nn.init.zeros_(self.adapter_gate_prefix)
        if not c.use_whisper:
            return
        nn.init.ones_(self.adapter_gate_whisper)
        nn.init.ones_(self.adapter_norm_k.weight)
        nn.init.ones_(self.adapter_norm_v.weight)
        # Identity: ones on the principal diagonal, for the rectangular down/up too (the paper's init).
        nn.init.eye_(self.adapter_q_dim)  # identity in the paper and in every ablation of the reference code
        nn.init.eye_(self.adapter_q_head)
        for name, m in self.named_parameters():  # down/up of the keys (and of the values, for WL-L)
            if name.startswith(("adapter_down_", "adapter_up_")):  # (out, in) or (in, out): the same diagonal
                nn.init.eye_(m) if c.identity_init else nn.init.normal_(m)

    def prefix_kv(self):
        """Prefix keys/values from the block's frozen qkv applied to RMSNorm(P): (1, G, L, D) each.
        The RMSNorm has no trained scale (the reference code never trains it: its scale stays 1), and belongs
        to the WL variants only: the text-only adapter (LLaMA-Adapter v1) applies qkv to P directly."""
        p = self.adapter_prefix.weight[None]  # (1, L, C)
        if self.config.use_whisper:
            p = F.rms_norm(upcast(p), (p.shape[-1],), eps=self.config.adapter_norm_eps).to(p.dtype)
        _, k_p, v_p = self.split_heads(self.qkv(p))
        return k_p, v_p  # no RoPE: the prefix has no position

    def whisper_projections(self, audio: torch.Tensor, projected: dict):
        """k = A Wk_j and v = A Wv_j + bv_j, (B, F, W) each, RMS-normalised without the norms' trained scale (see
        whisper_kv): frozen, so they depend only on the audio and on j. Several LLaMA blocks copy the same Whisper
        block (30 SmolLM2 blocks over 4 tiny.en blocks): `projected`, a dict {j: (k, v)} that lives for one
        forward, lets them compute it once (exact: the copies are equal)."""
        if self.whisper_block not in projected:
            with torch.no_grad():  # frozen weights and features: nothing to differentiate, nothing to save
                audio = audio.to(self.whisper_key.weight.dtype)
                kv = self.whisper_key(audio), self.whisper_value(audio)
                eps = self.config.adapter_norm_eps
                projected[self.whisper_block] = tuple(F.rms_norm(upcast(x), (x.shape[-1],), eps=eps).to(x.dtype)
                                                      for x in kv)
        return projected[self.whisper_block]

    def whisper_kv(self, audio: torch.Tensor, projected=None):
        """(k, v, up) for whisper_attention from audio features (B, F, W): the Whisper heads' keys and values with
        their identity tail, (B, Hw, F, D) each, and up None; or with self.low_rank their codes [s | E]
        (B, Hw, F, R + D - Dw) and up = (U_k, U_v), the up projections' weights (see low_rank_heads)."""
        c, D, shared = self.config, self.config.head_size, self.config.shared_down_up  # WL-L: the values' own pair
        down_v, up_v = (self.adapter_down_k, self.adapter_up_k) if shared else (self.adapter_down_v, self.adapter_up_v)
        # rmsnorm_k(k) = k̃ ⊙ g_k, so down(rmsnorm_k(k)) = k̃ (down ⊙ g_k)ᵀ: k̃ (frozen) is made once per Whisper block
        k, v = self.whisper_projections(audio, {} if projected is None else projected)  # k̃, ṽ
        s_k = F.silu(F.linear(k, self.adapter_down_k.weight * self.adapter_norm_k.weight))  # (B, F, R): k̂ = up(s_k)
        s_v = F.silu(F.linear(v, down_v.weight * self.adapter_norm_v.weight))
        if self.low_rank:
            return (*(identity_tail(s[:, None], D, c.whisper_head_size).expand(-1, c.whisper_heads, -1, -1)
                      for s in (s_k, s_v)), (self.adapter_up_k.weight, up_v.weight))
        k, v = self.split_whisper_heads(self.adapter_up_k(s_k)), self.split_whisper_heads(up_v(s_v))
        if not c.identity_init:  # the no-special-initialisation ablation: a random template, all H heads
            return random_template(k, c.n_head, D), random_template(v, c.n_head, D), None
        return identity_tail(k, D), identity_tail(v, D), None

    def split_whisper_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F, W) → (B, Hw, F, Dw)."""
        B, F_, W = x.shape
        Hw, Dw = self.config.whisper_heads, self.config.whisper_head_size
        if self.config.kv_layout == "paper":
            return x.reshape(B, Hw, F_, Dw)  # the reference's reinterpretation of the (B, F, W) buffer
        return x.view(B, F_, Hw, Dw).transpose(1, 2)

    def transform_query(self, q: torch.Tensor) -> torch.Tensor:
        """q'' [b, h, t, :] = Σ_h' (q Q_d)[b, h', t, :] · Q_h[h', h]."""
        q = torch.einsum("bitd,ih->bhtd", q @ self.adapter_q_dim, self.adapter_q_head)
        return q.contiguous()  # einsum may return a strided view; the fused attention kernel needs stride 1

    def forward(self, x, cos, sin, input_pos=None, audio=None, projected=None):
        """The diagram: y = attention over the text + gate_L · AiL(q) + gate_W · AiW(q'', audio), projected.
        audio (B, F, W): Whisper encoder features (while decoding only with the first step: then cached)."""
        q, y = self.attend(x, cos, sin, input_pos)  # q with RoPE, y before the output projection
        decoding = input_pos is not None
        k_p, v_p = self.kept(decoding, "prefix_kv", self.prefix_kv)  # they depend on no input
        y = y + (self.adapter_gate_prefix * prefix_attention(q, k_p, v_p)).to(y.dtype)
        if self.config.use_whisper:
            if audio is None and not (decoding and hasattr(self.kv_cache, "whisper_kv")):
                raise ValueError("this model fuses audio: pass audio features (B, F, W) (decoding: at the first step)")
            k_w, v_w, up = self.kept(decoding, "whisper_kv", lambda: self.whisper_kv(audio, projected))  # per clip
            y_w = whisper_attention(self.transform_query(q), k_w, v_w, up)
            y = y + (self.adapter_gate_whisper * y_w).to(y.dtype)
        return self.project(y)

    def kept(self, decoding: bool, name: str, compute):
        """compute(); while decoding, computed at the first step and kept with the block's KV cache (set_kv_cache
        starts that cache, clear_kv_cache ends it: nothing of one utterance is left for the next)."""
        if not decoding:
            return compute()
        if not hasattr(self.kv_cache, name):
            setattr(self.kv_cache, name, compute())
        return getattr(self.kv_cache, name)


class AdapterBlock(Block):
    def __init__(self, config: WLConfig, block_idx: int):
        super().__init__(config)
        self.attn = AdapterAttention(config, block_idx)

    def forward(self, x, cos, sin, input_pos=None, audio=None, projected=None):
        x = x + self.attn(self.norm_1(x), cos, sin, input_pos, audio=audio, projected=projected)
        return x + self.mlp(self.norm_2(x))


class WhisperingLLaMA(LLaMA):
    """LLaMA whose blocks from `adapter_start_layer` on carry AiL and AiW."""

    def _init_weights(self, module):
        # LLaMA.__init__ applies this to every module, children first and the model itself last. LLaMA's random
        # init covers every Linear/Embedding, the adapters' too; at the end they get their own back (identity,
        # zero gate). Materialising the adapters after a meta-device build calls it the same way.
        if module is self:
            for block in self.adapter_blocks():
                block.attn.reset_adapter_parameters()
        else:
            super()._init_weights(module)

    def build_block(self, config: WLConfig, i: int) -> nn.Module:
        return AdapterBlock(config, i) if i >= config.adapter_start_layer else Block(config)

    def adapter_blocks(self):
        # By index, not isinstance: FSDP replaces each block by a wrapper around it.
        return [b for i, b in enumerate(self.transformer.h) if i >= self.config.adapter_start_layer]

    def forward(self, idx, audio=None, input_pos=None, logits_mask=None, audio_frames=None):
        """idx (B, T), audio (B, F, W) encoder features → logits (as LLaMA.forward).

        While decoding (input_pos given) pass audio with the first step only: k̂/v̂ are cached.
        audio_frames: frames that carry audio (the longest in the batch); used when config.trim_audio."""
        if audio is not None and self.config.trim_audio and audio_frames is not None:
            audio = audio[:, : max(1, int(audio_frames))]
        if audio is not None and self.config.random_audio:  # ablation: the audio carries no information
            audio = torch.randn(audio.shape, device=audio.device, dtype=torch.float32)
        x, cos, sin = self.prepare(idx, input_pos)
        projected = {}  # Whisper k/v projections of this forward, shared by the blocks that copy the same j
        for i, block in enumerate(self.transformer.h):
            if i >= self.config.adapter_start_layer:  # an AdapterBlock (possibly inside an FSDP wrapper)
                x = block(x, cos, sin, input_pos, audio=audio, projected=projected)
            else:
                x = block(x, cos, sin, input_pos)
        return self.head(x, logits_mask)


def is_adapter_param(name: str) -> bool:
    """The trained tensors: every name that starts with `adapter_` (assembly, files, loading: wl_checkpoint.py)."""
    return ".adapter_" in name or name.startswith("adapter_")
