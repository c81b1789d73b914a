"""A literal, slow implementation of DESIGN.md §2 — the oracle for adapter.py's fast path.

Everything the fast path avoids is done here on purpose: the (B, H, F, D) padding template is built
for keys and values, Whisper k/v are recomputed from the audio at every call, heads are mixed with
explicit loops, attention is an explicit softmax with repeated k/v heads. Only model.apply_rope is
shared with the code under test (it has its own test against the complex-number formula).
"""
import math

import torch

from model import apply_rope, build_rope_cache


def rms(x, weight=None, eps=1e-5):
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    y = x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + eps)
    return (y * weight.to(y.dtype) if weight is not None else y).to(x.dtype)


def softmax_attention(q, k, v, causal_offset=None):
    """q (B, H, T, D); k, v (B, H, S, D). causal_offset: absolute position of q's first row, keys from 0."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal_offset is not None:
        T, S = q.shape[2], k.shape[2]
        qpos = torch.arange(T)[:, None] + causal_offset
        scores = scores.masked_fill(torch.arange(S)[None, :] > qpos, float("-inf"))
    return scores.softmax(-1) @ v


def padded_template(k_hat, H, D):
    """K_pad (B, H, F, D): the F×D identity in every head, with [:Hw, :, :Dw] = k̂."""
    B, Hw, F, Dw = k_hat.shape
    pad = torch.eye(F, D, dtype=k_hat.dtype).expand(B, H, F, D).clone()
    pad[:, :Hw, :, :Dw] = k_hat
    return pad


def literal_whisper_kv(attn, audio, layout):
    c = attn.config
    W, Hw = c.whisper_width, c.whisper_heads
    Dw = W // Hw
    down_k, up_k = attn.adapter_down_k.weight, attn.adapter_up_k.weight
    down_v = down_k if c.shared_down_up else attn.adapter_down_v.weight
    up_v = up_k if c.shared_down_up else attn.adapter_up_v.weight
    k = audio @ attn.whisper_key.weight.T
    v = audio @ attn.whisper_value.weight.T + attn.whisper_value.bias
    # down ∈ R^{W × W/r}, up ∈ R^{W/r × W} as right-multiplied matrices (nn.Linear stores the transpose)
    k = torch.nn.functional.silu(rms(k, attn.adapter_norm_k.weight) @ down_k.T) @ up_k.T
    v = torch.nn.functional.silu(rms(v, attn.adapter_norm_v.weight) @ down_v.T) @ up_v.T
    B, F, _ = k.shape
    if layout == "paper":
        split = lambda x: x.contiguous().view(B, Hw, F, Dw)
    else:
        split = lambda x: torch.stack([x[:, :, h * Dw:(h + 1) * Dw] for h in range(Hw)], dim=1)
    return split(k), split(v)


def random_padded_template(k_hat, H, D):
    """The reference's no-special-initialisation ablation (ablation_mini_bad_init.py): per example one F×D
    standard normal draw, repeated in every head, with [:Hw, :, :Dw] = k̂. Draws torch.randn(B, 1, F, D)."""
    B, Hw, F, Dw = k_hat.shape
    pad = torch.randn(B, 1, F, D).to(k_hat.dtype).repeat(1, H, 1, 1)
    pad[:, :Hw, :, :Dw] = k_hat
    return pad


def literal_whisper_branch(attn, q, audio):
    """y_w for RoPE'd queries q (B, H, T, D) and audio (B, F, W), per DESIGN.md §2 step 3 (with the random
    template of the no-special-initialisation ablation when config.identity_init is False: keys' template
    drawn first, then the values')."""
    c = attn.config
    B, H, T, D = q.shape
    k_hat, v_hat = literal_whisper_kv(attn, audio, c.kv_layout)
    template = padded_template if c.identity_init else random_padded_template
    K = template(k_hat, H, D)
    V = template(v_hat, H, D)
    q1 = q @ attn.adapter_q_dim
    q2 = torch.zeros_like(q1)
    for h in range(H):
        for h2 in range(H):
            q2[:, h] = q2[:, h] + q1[:, h2] * attn.adapter_q_head[h2, h]
    return softmax_attention(q2, K, V)


def literal_forward(model, idx, audio):
    """Logits (B, T, V) of a WhisperingLLaMA, computed literally over the whole sequence."""
    c = model.config
    B, T = idx.shape
    H, G, D = c.n_head, c.n_query_groups, c.head_size
    cos, sin = build_rope_cache(T, D, c.rope_base, c.rope_scaling)
    x = model.transformer.wte.weight[idx]
    for block in model.transformer.h:
        attn = block.attn
        h_in = rms(x, block.norm_1.weight, c.norm_eps)
        qkv = h_in @ attn.qkv.weight.T
        q, k, v = qkv.split((H * D, G * D, G * D), dim=-1)
        heads = lambda t, n: t.reshape(B, -1, n, D).transpose(1, 2)
        q, k, v = heads(q, H), heads(k, G), heads(v, G)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = H // G
        y = softmax_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), causal_offset=0)
        if hasattr(attn, "adapter_prefix"):
            p = attn.adapter_prefix.weight
            if c.use_whisper:  # the WL variants normalise the prefix; the text-only adapter does not
                p = rms(p, None, c.adapter_norm_eps)
            p = p @ attn.qkv.weight.T  # (L, (H+2G)D)
            _, kp, vp = p.split((H * D, G * D, G * D), dim=-1)
            kp = kp.reshape(1, -1, G, D).transpose(1, 2).repeat_interleave(rep, 1).expand(B, -1, -1, -1)
            vp = vp.reshape(1, -1, G, D).transpose(1, 2).repeat_interleave(rep, 1).expand(B, -1, -1, -1)
            y = y + attn.adapter_gate_prefix * softmax_attention(q, kp, vp)
            if c.use_whisper:
                y = y + attn.adapter_gate_whisper * literal_whisper_branch(attn, q, audio)
        x = x + y.transpose(1, 2).reshape(B, T, H * D) @ attn.proj.weight.T
        m = rms(x, block.norm_2.weight, c.norm_eps)
        mlp = block.mlp
        x = x + (torch.nn.functional.silu(m @ mlp.fc_1.weight.T) * (m @ mlp.fc_2.weight.T)) @ mlp.proj.weight.T
    return rms(x, model.transformer.ln_f.weight, c.norm_eps) @ model.lm_head.weight.T


def reference_pth_state(model) -> dict:
    """The adapter of `model` as the reference research code saves it, written out from its lit_llama/WL_*.py:
    its own tensor names (adapter_state_from_state_dict keeps every name with "adapter_wte", "gating_factor" or
    "projection") and its own shapes, which it uses as right-multiplied matrices (x @ M):

        adapter_wte = nn.Embedding(L, C)                           adapter_wte.weight               (L, C)
        gating_factor = Parameter(zeros(1))                                                          (1,)
        projection_gating_factor = Parameter(ones(1))                                                (1,)
        projection_rms_key / projection_rms_value = RMSNorm(W)     projection_rms_*.scale           (W,)
        projection_key_matrix_down = Parameter((W, W // r))        key @ down                       (W, W/r)
        projection_key_matrix_up = Parameter((W // r, W))          silu(...) @ up                   (W/r, W)
        projection_value_matrix_down / _up (WL-L only)             the same shapes
        projection_query_matrix_128to128 = Parameter((D, D))       q @ M                            (D, D)
        projection_query_matrix_32to32 = Parameter((H, H))         q.permute(0, 2, 3, 1) @ M        (H, H)

    nn.Linear stores (out, in) and computes x Wᵀ, so down/up are the transposes of our weights; Q_d and Q_h are
    right-multiplied in both codes, so they are copied as they are."""
    c = model.config
    L, C, H, D = c.adapter_prompt_length, c.n_embd, c.n_head, c.head_size
    state = {}
    for i in range(c.adapter_start_layer, c.n_layer):
        a = model.transformer.h[i].attn
        p = f"transformer.h.{i}.attn."
        state[p + "adapter_wte.weight"] = a.adapter_prefix.weight.detach().clone()
        state[p + "gating_factor"] = a.adapter_gate_prefix.detach().clone()
        expected = {"adapter_wte.weight": (L, C), "gating_factor": (1,)}
        if c.use_whisper:
            W, r = c.whisper_width, c.adapter_rank
            state[p + "projection_gating_factor"] = a.adapter_gate_whisper.detach().clone()
            state[p + "projection_rms_key.scale"] = a.adapter_norm_k.weight.detach().clone()
            state[p + "projection_rms_value.scale"] = a.adapter_norm_v.weight.detach().clone()
            state[p + "projection_key_matrix_down"] = a.adapter_down_k.weight.detach().t().clone()
            state[p + "projection_key_matrix_up"] = a.adapter_up_k.weight.detach().t().clone()
            if c.variant == "L":
                state[p + "projection_value_matrix_down"] = a.adapter_down_v.weight.detach().t().clone()
                state[p + "projection_value_matrix_up"] = a.adapter_up_v.weight.detach().t().clone()
                expected.update(projection_value_matrix_down=(W, W // r), projection_value_matrix_up=(W // r, W))
            state[p + "projection_query_matrix_128to128"] = a.adapter_q_dim.detach().clone()
            state[p + "projection_query_matrix_32to32"] = a.adapter_q_head.detach().clone()
            expected.update({"projection_gating_factor": (1,), "projection_rms_key.scale": (W,),
                             "projection_rms_value.scale": (W,), "projection_key_matrix_down": (W, W // r),
                             "projection_key_matrix_up": (W // r, W), "projection_query_matrix_128to128": (D, D),
                             "projection_query_matrix_32to32": (H, H)})
        assert {k[len(p):]: tuple(v.shape) for k, v in state.items() if k.startswith(p)} == expected
    return state
