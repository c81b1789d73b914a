import math

import pytest
import torch

import adapter as A
import model as M
import storage
import wl_checkpoint
from wl_reference import literal_forward, literal_whisper_branch, padded_template, softmax_attention

# (n_head, n_query_groups, n_embd, whisper_heads, whisper_width): H = Hw / H > Hw, D = Dw / D > Dw, GQA or not
SHAPES = {
    "H>Hw,D>Dw,gqa": (4, 2, 64, 2, 16),    # D=16, Dw=8
    "H=Hw,D=Dw,mha": (4, 4, 64, 4, 64),    # D=16, Dw=16
    "H>Hw,D=Dw,gqa": (4, 1, 64, 3, 48),    # D=16, Dw=16
    "H=Hw,D>Dw,mha": (2, 2, 32, 2, 16),    # D=16, Dw=8
}


def make_model(shape, layout="heads", variant="M", seed=0, **overrides):
    torch.manual_seed(seed)
    H, G, C, Hw, W = SHAPES[shape]
    cfg = A.WLConfig(name="t", block_size=64, vocab_size=97, n_layer=3, n_head=H, n_query_groups=G, n_embd=C,
                     intermediate_size=2 * C, adapter_start_layer=1, adapter_prompt_length=3, variant=variant,
                     kv_layout=layout, whisper_width=W, whisper_heads=Hw, whisper_layers=2, **overrides)
    model = A.WhisperingLLaMA(cfg).double()
    # Move every adapter tensor away from its initial value, so no term of the formula hides behind an
    # identity or a zero gate.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_" in name or "whisper_" in name:
                p.add_(0.3 * torch.randn_like(p))
    wl_checkpoint.mark_only_adapter_as_trainable(model)
    return model


@pytest.mark.parametrize("H,Hw,D,Dw,F", [
    (4, 2, 16, 8, 40), (4, 4, 16, 16, 40), (4, 2, 16, 8, 12), (4, 2, 16, 8, 5), (3, 3, 8, 4, 6), (5, 2, 8, 8, 3),
])
def test_fast_whisper_attention_equals_padded_template(H, Hw, D, Dw, F):
    """Covers F >= D, Dw < F < D (partial identity tail) and F < Dw."""
    torch.manual_seed(0)
    B, T = 2, 5
    q = torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True)
    k_hat = torch.randn(B, Hw, F, Dw, dtype=torch.float64, requires_grad=True)
    v_hat = torch.randn(B, Hw, F, Dw, dtype=torch.float64, requires_grad=True)
    D_ = q.shape[-1]
    fast = A.whisper_attention(q, A.identity_tail(k_hat, D_), A.identity_tail(v_hat, D_))
    slow = softmax_attention(q, padded_template(k_hat, H, D), padded_template(v_hat, H, D))
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, (q, k_hat, v_hat), g)
    grads_slow = torch.autograd.grad(slow, (q, k_hat, v_hat), g)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("H,Hw,D,Dw,R,F", [
    (4, 2, 16, 8, 3, 40), (4, 4, 16, 16, 5, 40), (4, 2, 16, 8, 2, 12), (4, 2, 16, 8, 1, 5), (3, 3, 8, 4, 2, 6),
])
def test_low_rank_heads_equal_the_padded_template_of_the_up_projection(H, Hw, D, Dw, R, F):
    """k̂ = s_k U_kᵀ (and v̂) built in full and put in the template, against the attention over the codes [s | E]."""
    torch.manual_seed(0)
    B, T = 2, 5
    q = torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True)
    s_k, s_v = (torch.randn(B, F, R, dtype=torch.float64, requires_grad=True) for _ in range(2))
    U_k, U_v = (torch.randn(Hw * Dw, R, dtype=torch.float64, requires_grad=True) for _ in range(2))
    heads = lambda x: x.view(B, F, Hw, Dw).transpose(1, 2)  # noqa: E731  (the `heads` layout)
    slow = softmax_attention(q, padded_template(heads(s_k @ U_k.T), H, D), padded_template(heads(s_v @ U_v.T), H, D))
    codes_k, codes_v = (A.identity_tail(s[:, None], D, Dw).expand(-1, Hw, -1, -1) for s in (s_k, s_v))
    fast = A.whisper_attention(q, codes_k, codes_v, up=(U_k, U_v))
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, (q, s_k, s_v, U_k, U_v), g),
                    torch.autograd.grad(slow, (q, s_k, s_v, U_k, U_v), g)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_paper_layout_mixes_frames_into_heads():
    """`paper` reinterprets the contiguous (B, F, W) buffer; `heads` splits the width. They differ."""
    model = make_model("H>Hw,D>Dw,gqa", layout="paper")
    attn = model.transformer.h[1].attn
    x = torch.arange(2 * 6 * 16, dtype=torch.float64).view(2, 6, 16)
    paper = attn.split_whisper_heads(x)
    assert torch.equal(paper[0, 0, 0], x[0, 0, :8]) and torch.equal(paper[0, 0, 1], x[0, 0, 8:])
    attn.config.kv_layout = "heads"
    heads = attn.split_whisper_heads(x)
    assert torch.equal(heads[0, 1, 0], x[0, 0, 8:]) and torch.equal(heads[0, 0, 1], x[0, 1, :8])


@pytest.mark.parametrize("layout", ["heads", "heads, K_pad in full", "paper"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_training_forward_and_grads_match_literal(shape, layout):
    model = make_model(shape, layout.split(",")[0])
    for block in model.adapter_blocks():  # R = W/16 < Dw in every shape: `heads` attends over the low-rank codes
        assert block.attn.low_rank == layout.startswith("heads")
        block.attn.low_rank &= layout == "heads"
    W = model.config.whisper_width
    idx = torch.randint(0, 97, (2, 7))
    audio = torch.randn(2, 20, W, dtype=torch.float64)
    fast = model(idx, audio)
    slow = literal_forward(model, idx, audio)
    torch.testing.assert_close(fast, slow, atol=1e-9, rtol=1e-7)
    g = torch.randn_like(fast)
    params = [p for p in model.parameters() if p.requires_grad]
    grads_fast = torch.autograd.grad(fast, params, g)
    grads_slow = torch.autograd.grad(slow, params, g)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, a, b in zip(names, grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("layout", ["heads", "paper"])
@pytest.mark.parametrize("shape", ["H>Hw,D>Dw,gqa", "H=Hw,D=Dw,mha"])
def test_cached_decoding_matches_literal(shape, layout):  # `heads`: low-rank codes cached, `paper`: K_pad
    """Prefill, then one token at a time with audio given only at the first step (k̂/v̂ cached)."""
    model = make_model(shape, layout).eval()
    idx = torch.randint(0, 97, (2, 9))
    audio = torch.randn(2, 20, model.config.whisper_width, dtype=torch.float64)
    with torch.no_grad():
        slow = literal_forward(model, idx, audio)
        model.set_kv_cache(batch_size=2, max_seq_length=16, dtype=torch.float64)
        out = [model(idx[:, :4], audio, input_pos=torch.arange(4))]
        for t in range(4, 9):
            out.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(out, 1), slow, atol=1e-9, rtol=1e-7)
    # the cache really is used: later steps read k̂ computed at the first step
    assert all(hasattr(b.attn.kv_cache, "whisper_kv") for b in model.adapter_blocks())


def test_fp32_fast_path_within_1e5_of_literal():
    model = make_model("H>Hw,D>Dw,gqa").float()
    idx = torch.randint(0, 97, (2, 7))
    audio = torch.randn(2, 30, model.config.whisper_width)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, audio), literal_forward(model, idx, audio), atol=1e-5, rtol=1e-5)


def test_wl_l_separate_down_up_matches_literal():
    model = make_model("H>Hw,D>Dw,gqa", variant="L")
    assert hasattr(model.transformer.h[1].attn, "adapter_down_v")
    idx = torch.randint(0, 97, (1, 5))
    audio = torch.randn(1, 12, 16, dtype=torch.float64)
    torch.testing.assert_close(model(idx, audio), literal_forward(model, idx, audio), atol=1e-9, rtol=1e-7)


def test_zero_gates_give_the_base_llm_exactly():
    """At initialisation gate_L = 0; with gate_W set to 0 as well the adapter is a no-op."""
    torch.manual_seed(0)
    cfg = M.Config.from_name("tiny")
    base = M.LLaMA(cfg).eval()
    wl = A.WhisperingLLaMA(wl_checkpoint.wl_config(cfg, whisper_width=32, whisper_heads=2, whisper_layers=2,
                                       adapter_start_layer=1)).eval()
    assert len(wl.adapter_blocks()) == 1
    missing = storage.load_weights(wl, base.state_dict())
    assert all("adapter_" in n or "whisper_" in n for n in missing)
    wl_checkpoint.materialise_adapters(wl)
    idx = torch.randint(0, cfg.vocab_size, (2, 11))
    audio = torch.randn(2, 50, 32)
    for b in wl.adapter_blocks():
        assert b.attn.adapter_gate_prefix.item() == 0.0 and b.attn.adapter_gate_whisper.item() == 1.0
        b.attn.whisper_key.weight.data.normal_()
    with torch.no_grad():
        assert not torch.allclose(wl(idx, audio), base(idx))  # gate_W = 1: the untrained fusion acts
        for b in wl.adapter_blocks():
            b.attn.adapter_gate_whisper.data.zero_()
        assert torch.equal(wl(idx, audio), base(idx))


def test_identity_initialisation():
    cfg = wl_checkpoint.wl_config(M.Config.from_name("tiny"), whisper_width=48, whisper_heads=3, whisper_layers=2,
                      adapter_start_layer=1)
    attn = A.WhisperingLLaMA(cfg).transformer.h[1].attn
    down = attn.adapter_down_k.weight  # (W/r, W) = (3, 48)
    assert down.shape == (3, 48) and torch.equal(down, torch.eye(3, 48))
    assert torch.equal(attn.adapter_up_k.weight, torch.eye(48, 3))
    assert torch.equal(attn.adapter_q_dim, torch.eye(16)) and torch.equal(attn.adapter_q_head, torch.eye(4))
    rnd = A.WhisperingLLaMA(wl_checkpoint.wl_config(M.Config.from_name("tiny"), whisper_width=48, whisper_heads=3,
                                        whisper_layers=2, adapter_start_layer=1,
                                        identity_init=False)).transformer.h[1].attn
    # the reference's "no special initialisation": down/up standard normal, Q_d/Q_h still identity
    assert not torch.equal(rnd.adapter_down_k.weight, torch.eye(3, 48))
    assert abs(rnd.adapter_up_k.weight.std().item() - 1) < 0.2
    assert torch.equal(rnd.adapter_q_dim, torch.eye(16)) and torch.equal(rnd.adapter_q_head, torch.eye(4))


@pytest.mark.parametrize("shape", ["H>Hw,D>Dw,gqa", "H=Hw,D>Dw,mha"])
def test_text_only_adapter_matches_literal_without_prefix_norm(shape):
    """LLaMA-Adapter v1 (the text-only and big-adapter rows) applies the frozen qkv to the prefix directly,
    as the reference's lit_llama/adapter.py does: no RMSNorm, unlike the WL variants."""
    model = make_model(shape, use_whisper=False)
    idx = torch.randint(0, 97, (2, 7))
    fast = model(idx)
    torch.testing.assert_close(fast, literal_forward(model, idx, None), atol=1e-9, rtol=1e-7)
    attn = model.transformer.h[1].attn
    p = attn.adapter_prefix.weight
    _, k_p, _ = attn.split_heads(attn.qkv(p[None]))
    torch.testing.assert_close(attn.prefix_kv()[0], k_p)  # literally qkv(P)
    with torch.no_grad():  # a prefix far from unit RMS: a norm would change the output
        attn.adapter_prefix.weight.mul_(5)
    torch.testing.assert_close(model(idx), literal_forward(model, idx, None), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("layout", ["heads", "paper"])
def test_random_init_ablation_matches_the_reference_literal(layout):
    """No special initialisation, as ablation_mini_bad_init.py ran it: the padding template is standard normal
    noise drawn afresh at every forward (one F×D draw per example repeated over the heads, keys and values
    drawn separately), so two forwards differ; the literal oracle draws the same numbers in the same order."""
    model = make_model("H>Hw,D>Dw,gqa", layout, identity_init=False)
    idx = torch.randint(0, 97, (2, 6))
    audio = torch.randn(2, 20, model.config.whisper_width, dtype=torch.float64)
    torch.manual_seed(5)
    fast = model(idx, audio)
    torch.manual_seed(5)
    slow = literal_forward(model, idx, audio)
    torch.testing.assert_close(fast, slow, atol=1e-9, rtol=1e-7)
    assert not torch.allclose(model(idx, audio), fast)  # a fresh template at every forward
    g = torch.randn_like(fast)
    torch.manual_seed(6)
    grads_fast = torch.autograd.grad(model(idx, audio), [p for p in model.parameters() if p.requires_grad], g)
    torch.manual_seed(6)
    grads_slow = torch.autograd.grad(literal_forward(model, idx, audio),
                                     [p for p in model.parameters() if p.requires_grad], g)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("variant, use_whisper, prompt_length, expected", [
    ("M", True, 10, 7_971_900),    # paper: WL-M 7.97M
    ("L", True, 10, 26_403_900),   # paper: WL-L 26.40M
    ("S", True, 10, 4_899_900),    # paper: WL-S 4.89M
    ("M", False, 10, 1_228_830),   # paper: text-only adapter 1.22M
])
def test_trainable_counts_llama7b_whisper_large_v2(variant, use_whisper, prompt_length, expected):
    cfg = wl_checkpoint.wl_config(M.Config.from_name("llama-7b"), whisper_width=1280, whisper_heads=20, whisper_layers=32,
                      variant=variant, use_whisper=use_whisper, adapter_prompt_length=prompt_length)
    with torch.device("meta"):
        model = A.WhisperingLLaMA(cfg)
    wl_checkpoint.mark_only_adapter_as_trainable(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    if use_whisper:  # the frozen Whisper projections are there too, but not trained
        assert not model.transformer.h[2].attn.whisper_key.weight.requires_grad


def test_layer_mapping():
    cfg = wl_checkpoint.wl_config(M.Config.from_name("smollm2-135m"), whisper_width=384, whisper_heads=6, whisper_layers=4)
    assert [cfg.whisper_block(i) for i in (0, 7, 8, 15, 29)] == [0, 0, 1, 2, 3]
    same = wl_checkpoint.wl_config(M.Config.from_name("llama-7b"), whisper_width=1280, whisper_heads=20, whisper_layers=32)
    assert [same.whisper_block(i) for i in range(32)] == list(range(32))


@pytest.mark.parametrize("n_layer, whisper_layers, mapping", [
    (5, 3, {1: 0, 2: 1, 3: 1, 4: 2}),  # spread evenly: j = floor(i · 3 / 5)
    (3, 3, {1: 1, 2: 2}),              # equal depths: j = i
])
def test_build_model_copies_whisper_block_j_projections_frozen(tmp_path, n_layer, whisper_layers, mapping):
    """LLaMA block i's frozen k/v projections are exact copies of Whisper decoder block j's cross-attention key
    (no bias) and value (with bias), for the j of DESIGN.md §2 written out here."""
    from dataclasses import asdict

    from convert_checkpoint import save_checkpoint
    from whisper_model import ModelDimensions, Whisper

    torch.manual_seed(0)
    cfg = M.Config.from_name("tiny", n_layer=n_layer)
    save_checkpoint(tmp_path, M.LLaMA(cfg).state_dict(), cfg.to_dict())
    dims = ModelDimensions(n_mels=80, n_audio_ctx=30, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                           n_vocab=64, n_text_ctx=8, n_text_state=32, n_text_head=2, n_text_layer=whisper_layers)
    whisper = Whisper(dims)
    with torch.no_grad():  # distinct values in every block (the value biases start at zero)
        for p in whisper.parameters():
            p.add_(torch.randn_like(p))
    model = wl_checkpoint.build_model(tmp_path, whisper, adapter_start_layer=1)
    assert [i for i, b in enumerate(model.transformer.h) if hasattr(b.attn, "whisper_key")] == list(mapping)
    for i, j in mapping.items():
        attn, cross = model.transformer.h[i].attn, whisper.decoder.blocks[j].cross_attn
        assert cross.key.bias is None and attn.whisper_key.bias is None
        assert torch.equal(attn.whisper_key.weight, cross.key.weight)
        assert torch.equal(attn.whisper_value.weight, cross.value.weight)
        assert torch.equal(attn.whisper_value.bias, cross.value.bias)
        assert not any(p.requires_grad for p in (attn.whisper_key.weight, attn.whisper_value.weight,
                                                 attn.whisper_value.bias))
        assert attn.whisper_key.weight.data_ptr() != cross.key.weight.data_ptr()  # a copy, not Whisper's tensor


@pytest.mark.parametrize("layout", ["heads", "paper"])
def test_random_audio_ablation_is_fresh_standard_normal_noise_at_every_forward(layout):
    """The random-audio row of the paper as the reference ran it: the features are replaced by a standard normal
    draw of their shape at every forward. The literal oracle draws the same numbers, and the audio given does not
    matter at all."""
    model = make_model("H>Hw,D>Dw,gqa", layout, random_audio=True)
    idx = torch.randint(0, 97, (2, 6))
    audio = torch.randn(2, 20, model.config.whisper_width, dtype=torch.float64)
    torch.manual_seed(7)
    fast = model(idx, audio)
    torch.manual_seed(7)
    noise = torch.randn(audio.shape).double()  # float32 standard normal, as drawn in the forward
    torch.testing.assert_close(fast, literal_forward(model, idx, noise), atol=1e-9, rtol=1e-7)
    torch.manual_seed(7)
    assert torch.equal(model(idx, 100 * audio + 3), fast)  # other audio, same draw: same output
    assert not torch.allclose(model(idx, audio), fast)  # the next forward draws afresh
    with torch.no_grad():
        torch.manual_seed(7)
        model.config.random_audio = False
        assert not torch.allclose(model(idx, audio), fast)  # without the ablation the audio is used


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="must fit"):
        wl_checkpoint.wl_config(M.Config.from_name("tiny"), whisper_width=96, whisper_heads=6, whisper_layers=2)
    with pytest.raises(ValueError, match="variant"):
        wl_checkpoint.wl_config(M.Config.from_name("tiny"), whisper_width=32, whisper_heads=2, variant="XL")


def test_trim_audio_uses_only_the_frames_that_carry_audio():
    model = make_model("H>Hw,D>Dw,gqa", trim_audio=True)
    idx = torch.randint(0, 97, (2, 6))
    audio = torch.randn(2, 40, model.config.whisper_width, dtype=torch.float64)
    trimmed = model(idx, audio, audio_frames=13)
    torch.testing.assert_close(trimmed, literal_forward(model, idx, audio[:, :13]), atol=1e-9, rtol=1e-7)
    assert not torch.allclose(trimmed, model(idx, audio))  # without audio_frames: all 40 frames


def test_blocks_that_copy_the_same_whisper_block_project_the_audio_once():
    """4 LLaMA blocks over a 2-block Whisper: blocks 1, 2, 3 copy Whisper blocks 0, 1, 1. Their frozen k/v
    projections are equal copies, so block 3 reuses block 2's (one projection per Whisper block per forward);
    the result equals the literal per-layer computation, values and gradients."""
    torch.manual_seed(0)
    cfg = A.WLConfig(name="t", block_size=64, vocab_size=97, n_layer=4, n_head=4, n_query_groups=2, n_embd=64,
                     intermediate_size=128, adapter_start_layer=1, adapter_prompt_length=3, whisper_width=16,
                     whisper_heads=2, whisper_layers=2)
    model = A.WhisperingLLaMA(cfg).double()
    assert [b.attn.whisper_block for b in model.adapter_blocks()] == [0, 1, 1]
    whisper_weights = {j: (torch.randn(16, 16), torch.randn(16, 16), torch.randn(16)) for j in (0, 1)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_" in name:
                p.add_(0.3 * torch.randn_like(p))
        for b in model.adapter_blocks():  # what copy_whisper_projections does: block j's weights, copied
            wk, wv, bv = whisper_weights[b.attn.whisper_block]
            b.attn.whisper_key.weight.copy_(wk)
            b.attn.whisper_value.weight.copy_(wv)
            b.attn.whisper_value.bias.copy_(bv)
    wl_checkpoint.mark_only_adapter_as_trainable(model)
    calls = []
    for b in model.adapter_blocks():
        b.attn.whisper_key.register_forward_hook(lambda *a: calls.append(1))
    idx = torch.randint(0, 97, (2, 7))
    audio = torch.randn(2, 20, 16, dtype=torch.float64)
    fast = model(idx, audio)
    assert len(calls) == 2  # one per distinct Whisper block, not one per LLaMA block
    slow = literal_forward(model, idx, audio)
    torch.testing.assert_close(fast, slow, atol=1e-9, rtol=1e-7)
    g = torch.randn_like(fast)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(fast, params, g), torch.autograd.grad(slow, params, g)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_bf16_autocast_on_cpu_matches_fp32_with_every_attention_written_out(monkeypatch):
    """train.py --precision bf16 on a CPU: frozen weights bf16, adapters fp32, bf16 autocast. Every attention (the
    text, the prefix, the frames) runs as plain bf16 matmuls there, none through the fused kernel (slower in bf16
    on a CPU); values and gradients stay close to fp32."""
    model = make_model("H>Hw,D>Dw,gqa").float()
    idx = torch.randint(0, 97, (2, 7))
    audio = torch.randn(2, 30, model.config.whisper_width)
    ref = model(idx, audio)
    g = torch.randn_like(ref)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref, params, g)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)
    fused, written_out = [], []
    sdpa, matmul_attention = torch.nn.functional.scaled_dot_product_attention, M.matmul_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: fused.append(1) or sdpa(*a, **kw))
    monkeypatch.setattr(M, "matmul_attention", lambda q, k, *a, **kw: written_out.append(k.shape[2]) or
                        matmul_attention(q, k, *a, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx, audio)
    assert fused == []
    assert set(written_out) == {7, 3, 30}  # the text, the prefix, the frames
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    for a, b in zip(torch.autograd.grad(out.float(), params, g), ref_grads):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-3
