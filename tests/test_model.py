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


def test_attention_matches_literal_softmax():
    torch.manual_seed(0)
    config = M.Config.from_name("tiny")
    attn = M.CausalSelfAttention(config)
    x = torch.randn(2, 6, config.n_embd)
    cos, sin = M.build_rope_cache(6, config.head_size, config.rope_base)
    q, y = attn.attend(x, cos, sin, None, None)
    _, k, v = attn.split_heads(attn.qkv(x))
    k = M.apply_rope(k, cos, sin).repeat_interleave(2, dim=1)
    v = v.repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(config.head_size)
    scores = scores.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf"))
    torch.testing.assert_close(y, scores.softmax(-1) @ v, atol=1e-5, rtol=1e-5)


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
