import math

import pytest
import torch
import torch.nn.functional as F

import model as M


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = M.RMSNorm(8, eps=1e-6)
    norm.weight.data = torch.randn(8)
    x = torch.randn(3, 5, 8)
    expected = torch.empty_like(x)
    for i in range(3):
        for j in range(5):
            v = x[i, j]
            rms = math.sqrt(sum(float(a) ** 2 for a in v) / 8 + 1e-6)
            expected[i, j] = v / rms * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-5)


def test_rope_matches_complex_rotation():
    """Meta's reference: view consecutive pairs as complex numbers and multiply by e^{i·pos·θ_k}."""
    torch.manual_seed(0)
    B, H, T, D, base = 2, 3, 7, 16, 10000.0
    x = torch.randn(B, H, T, D)
    cos, sin = M.build_rope_cache(T, D, base)
    out = M.apply_rope(x, cos, sin)
    expected = torch.empty_like(x)
    for t in range(T):
        for k in range(D // 2):
            theta = base ** (-2 * k / D)
            rot = complex(math.cos(t * theta), math.sin(t * theta))
            z = torch.complex(x[:, :, t, 2 * k].double(), x[:, :, t, 2 * k + 1].double()) * rot
            expected[:, :, t, 2 * k], expected[:, :, t, 2 * k + 1] = z.real.float(), z.imag.float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_llama31_rope_scaling_matches_reference_rule():
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    ours = M.rope_frequencies(128, 500000.0, scaling)
    for i in range(64):
        f = 500000.0 ** (-2 * i / 128)
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            want = f
        elif wavelen > 8192 / 1.0:
            want = f / 8.0
        else:
            s = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want = (1 - s) * f / 8.0 + s * f
        assert ours[i].item() == pytest.approx(want, rel=1e-5)


def test_kv_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    config = M.Config.from_name("tiny")
    model = M.LLaMA(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2, max_seq_length=20)
        # a prompt chunk, then one token at a time
        steps = [model(idx[:, :5], input_pos=torch.arange(5))]
        for t in range(5, 12):
            steps.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model equals an MHA model whose k/v weights repeat each group for its H/G query heads."""
    torch.manual_seed(0)
    gqa_cfg = M.Config.from_name("tiny", n_query_groups=2)
    mha_cfg = M.Config.from_name("tiny", n_query_groups=4)
    gqa, mha = M.LLaMA(gqa_cfg).eval(), M.LLaMA(mha_cfg).eval()
    state = gqa.state_dict()
    H, G, D = 4, 2, gqa_cfg.head_size
    for i in range(gqa_cfg.n_layer):
        w = state[f"transformer.h.{i}.attn.qkv.weight"]
        q, k, v = w.split((H * D, G * D, G * D))
        rep = lambda t: t.view(G, D, -1).repeat_interleave(H // G, dim=0).reshape(H * D, -1)
        state[f"transformer.h.{i}.attn.qkv.weight"] = torch.cat((q, rep(k), rep(v)))
    mha.load_state_dict(state)
    idx = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx), atol=1e-5, rtol=1e-5)


def complex_rope(x, base):
    """Meta's reference RoPE: pairs (2i, 2i+1) of x (B, H, T, D) as complex numbers times e^{i·t·base^(-2i/D)}."""
    B, H, T, D = x.shape
    z = torch.view_as_complex(x.double().reshape(B, H, T, D // 2, 2).contiguous())
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rotation = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.outer(torch.arange(T).double(), theta))
    return torch.view_as_real(z * rotation).reshape(B, H, T, D)


def test_attention_matches_literal_softmax():
    """q, k, v from the rows of the fused qkv weight ([H query heads; G key groups; G value groups]), rotated by
    the complex-number RoPE, one head at a time with its group h // (H/G), causal softmax; then the output
    projection."""
    torch.manual_seed(0)
    config = M.Config.from_name("tiny")
    attn = M.CausalSelfAttention(config)
    B, T, H, G, D = 2, 6, config.n_head, config.n_query_groups, config.head_size
    x = torch.randn(B, T, config.n_embd)
    W = attn.qkv.weight.detach().double()
    rows = lambda start, n: (x.double() @ W[start * D:(start + n) * D].T).view(B, T, n, D).transpose(1, 2)
    q = complex_rope(rows(0, H), config.rope_base)
    k = complex_rope(rows(H, G), config.rope_base)
    v = rows(H + G, G)
    expected = torch.empty(B, H, T, D, dtype=torch.float64)
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for h in range(H):
        g = h // (H // G)
        scores = (q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(D)).masked_fill(causal, float("-inf"))
        expected[:, h] = scores.softmax(-1) @ v[:, g]
    cos, sin = M.build_rope_cache(T, D, config.rope_base)
    with torch.no_grad():
        q_out, y = attn.attend(x, cos, sin, None)
        out = attn(x, cos, sin)
    torch.testing.assert_close(q_out.double(), q, atol=1e-5, rtol=1e-5)  # the queries the adapter reuses
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    proj = expected.transpose(1, 2).reshape(B, T, H * D) @ attn.proj.weight.detach().double().T
    torch.testing.assert_close(out.double(), proj, atol=1e-5, rtol=1e-5)


def literal_attention(q, k, v, allowed, scale):
    """One head at a time: head h reads group h // (H/G); allowed (T, S) bool."""
    B, H, T, _ = q.shape
    G = k.shape[1]
    out = []
    for h in range(H):
        g = h // (H // G)
        scores = (q[:, h] @ k[:, g].transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        out.append(scores.softmax(-1) @ v[:, g])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("B,Bkv,H,G,T,S,D,Dv,how", [
    (2, 2, 4, 2, 6, 6, 8, 8, "causal"),     # training: GQA, causal over the sequence
    (2, 2, 4, 4, 7, 7, 8, 8, "causal"),     # plain multi-head attention
    (2, 2, 6, 3, 2, 9, 8, 8, "mask"),       # decoding: an explicit mask over a cache
    (3, 1, 6, 1, 5, 4, 8, 8, "none"),       # the prefix: one key/value set for the whole batch, G = 1
    (2, 2, 6, 1, 5, 11, 5, 7, "scale"),     # the low-rank codes: G = 1, a head size other than the scale's
])
def test_matmul_attention_matches_literal_softmax(B, Bkv, H, G, T, S, D, Dv, how):
    """matmul_attention (the CPU bf16 path) is the same function as the literal per-head softmax, values and
    gradients, in float64; and attention() takes the fused kernel outside CPU bf16, with the same result."""
    torch.manual_seed(0)
    q = torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(Bkv, G, S, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(Bkv, G, S, Dv, dtype=torch.float64, requires_grad=True)
    allowed = torch.ones(T, S, dtype=torch.bool)
    kw = {}
    if how == "causal":
        allowed, kw = allowed.tril(), {"causal": True}
    elif how == "mask":
        allowed = torch.rand(T, S) < 0.6
        allowed[:, 0] = True
        kw = {"mask": allowed[None, None]}
    scale = 0.3 if how == "scale" else 1 / math.sqrt(D)
    if how == "scale":
        kw = {"scale": scale}
    expected = literal_attention(q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), allowed, scale)
    g = torch.randn_like(expected)
    ref_grads = torch.autograd.grad(expected, (q, k, v), g)
    for fn in (M.matmul_attention, M.attention):  # float64: attention() calls the fused kernel
        y = fn(q, k, v, **kw)
        torch.testing.assert_close(y, expected)
        for a, b in zip(torch.autograd.grad(y, (q, k, v), g), ref_grads):
            torch.testing.assert_close(a, b)


def test_attention_on_cpu_in_bf16_is_written_out(monkeypatch):
    """In bf16 on a CPU (bf16 tensors, or bf16 autocast) attention() never calls the fused kernel; in fp32 it does."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    M.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        M.attention(q, k, v, causal=True)
    assert calls == []
    M.attention(q, k, v, causal=True)
    with torch.autocast("cpu", dtype=torch.float16):  # not bf16: the fused kernel
        M.attention(q, k, v, causal=True)
    assert calls == [1, 1]


def unit_variance(model):
    """Unit-variance activations at every layer (GPT-style 0.02 makes a random model nearly constant)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(std=1.0 if "wte" in name else p.shape[1] ** -0.5)
    return model


def test_bf16_forward_and_kv_cache_stay_within_bf16_rounding_of_fp32():
    """The bf16 path (generate.py --dtype bfloat16, train.py's frozen weights): the same function as fp32 on the
    same (bf16-rounded) weights, up to bf16 rounding of the activations (rms 0.006 here, logits of unit scale);
    the KV cache is held in bf16 and cached decoding gives the full forward's logits."""
    torch.manual_seed(0)
    model = unit_variance(M.LLaMA(M.Config.from_name("tiny"))).eval()
    model.to(torch.bfloat16).float()  # weights that bf16 holds exactly
    idx = torch.randint(0, 512, (2, 120))
    with torch.no_grad():
        fp32 = model(idx)
        model.to(torch.bfloat16)
        bf16 = model(idx)
        model.set_kv_cache(batch_size=2, max_seq_length=120)
        steps = [model(idx[:, :100], input_pos=torch.arange(100))]
        steps += [model(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(100, 120)]
    assert bf16.dtype == torch.bfloat16 and model.transformer.h[0].attn.kv_cache.k.dtype == torch.bfloat16
    assert fp32.std() > 0.5
    torch.testing.assert_close(bf16.float(), fp32, atol=0.06, rtol=0.02)
    torch.testing.assert_close(torch.cat(steps, 1).float(), bf16.float(), atol=0.06, rtol=0.02)


def test_a_sequence_longer_than_the_context_is_a_clear_error():
    model = M.LLaMA(M.Config.from_name("tiny", block_size=16)).eval()
    with pytest.raises(ValueError, match="sequence of 17 tokens exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    assert model(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, 512)  # the context itself is fine


def test_logits_mask_selects_positions():
    torch.manual_seed(0)
    model = M.LLaMA(M.Config.from_name("tiny")).eval()
    idx = torch.randint(0, 512, (2, 8))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 3:] = True
    mask[1, 6:] = True
    with torch.no_grad():
        torch.testing.assert_close(model(idx, logits_mask=mask), model(idx)[mask])


def test_tied_embeddings_share_storage():
    model = M.LLaMA(M.Config.from_name("tiny", tie_embeddings=True))
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("name, published", [
    ("llama-7b", 6_738_415_616),       # "6.7B" in the LLaMA paper; Meta's released 7B has this many
    ("llama-2-70b", 68_976_648_192),   # LLaMA-2-70B (GQA, 8 groups)
    ("llama-3-8b", 8_030_261_248),
    ("tinyllama-1.1b", 1_100_048_384),
    ("smollm2-135m", 134_515_008),
])
def test_parameter_counts_on_meta_device(name, published):
    with torch.device("meta"):
        model = M.LLaMA(M.Config.from_name(name))
    assert next(model.parameters()).is_meta
    assert sum(p.numel() for p in model.parameters()) == published


def test_from_checkpoint_roundtrip_and_mismatch(tmp_path):
    from convert_checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = M.Config.from_name("tiny", tie_embeddings=True)
    model = M.LLaMA(config).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_checkpoint(tmp_path / "ok", state, config.to_dict())
    loaded = M.LLaMA.from_checkpoint(tmp_path / "ok").eval()
    idx = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx))
    bad = dict(config.to_dict(), n_embd=32)
    save_checkpoint(tmp_path / "bad", state, bad)
    with pytest.raises(ValueError, match="shape"):
        M.LLaMA.from_checkpoint(tmp_path / "bad")
    del state["transformer.ln_f.weight"]
    save_checkpoint(tmp_path / "missing", state, config.to_dict())
    with pytest.raises(ValueError, match="lacks"):
        M.LLaMA.from_checkpoint(tmp_path / "missing")


def test_empty_init_builds_every_model_without_values_and_without_importing_dynamo(tmp_path):
    """storage.empty_init: the LLM, Whisper and Whispering-LLaMA are built with every parameter on the meta
    device, the encoder's sinusoids still computed (a formula, not a weight), and torch._dynamo never imported:
    `torch.device("meta")` alone imports it through the init draws (1.2 s of every generate.py start). A fresh
    interpreter, since other tests import torch._dynamo into this one."""
    import subprocess
    import sys
    from pathlib import Path

    from convert_checkpoint import save_checkpoint

    config = M.Config.from_name("tiny", tie_embeddings=True)
    state = {k: v for k, v in M.LLaMA(config).state_dict().items() if k != "lm_head.weight"}
    save_checkpoint(tmp_path / "llm", state, config.to_dict())
    script = f"""
import sys, torch
import model as M, whisper_model as wm
from adapter import WhisperingLLaMA, WLConfig
from storage import empty_init
llm = M.LLaMA.from_checkpoint({str(tmp_path / 'llm')!r})
assert not any(p.is_meta for p in llm.parameters())
dims = wm.ModelDimensions(n_audio_state=32, n_audio_head=2, n_text_state=32, n_text_head=2, n_audio_layer=1,
                          n_text_layer=1)
with empty_init():
    w = wm.Whisper(dims)
    wl = WhisperingLLaMA(WLConfig.from_name("tiny", whisper_width=32, whisper_heads=2, whisper_layers=1))
assert all(p.is_meta for p in list(w.parameters()) + list(wl.parameters()))
assert torch.equal(w.encoder.positional_embedding, wm.sinusoids(1500, 32))
print("torch._dynamo" in sys.modules)
"""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False"]
