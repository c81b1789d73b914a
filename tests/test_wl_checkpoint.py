"""Tests for wl_checkpoint.py: the adapter tensors saved and loaded, and the reference code's .pth adapters."""
import pytest
import torch

import adapter as A
import wl_checkpoint
from test_adapter import make_model
from test_whisper import SMALL, random_model
from wl_reference import literal_forward, reference_pth_state


def test_adapter_state_roundtrip(tmp_path):
    model = make_model("H>Hw,D>Dw,gqa", layout="paper").float()
    state = wl_checkpoint.adapter_state_dict(model)
    assert state and all("adapter_" in k for k in state)
    assert not any("whisper_key" in k or "qkv" in k for k in state)
    fresh = make_model("H>Hw,D>Dw,gqa", layout="paper", seed=1).float()
    wl_checkpoint.load_adapter_state(fresh, state)
    for k, v in wl_checkpoint.adapter_state_dict(fresh).items():
        assert torch.equal(v, state[k])
    with pytest.raises(ValueError, match="does not match"):
        wl_checkpoint.load_adapter_state(make_model("H>Hw,D>Dw,gqa", variant="L"), state)


@pytest.mark.parametrize("variant", ["M", "L"])
def test_reference_pth_gives_the_logits_of_the_same_adapter_from_safetensors(tmp_path, variant):
    """A .pth in the reference code's names and shapes (written out literally in wl_reference.py, not derived
    from wl_checkpoint.REFERENCE_NAMES) loads into the same function as our .safetensors of the same adapter."""
    model = make_model("H>Hw,D>Dw,gqa", layout="paper", variant=variant).eval()
    with torch.no_grad():  # values a .safetensors (float32) holds exactly
        for p in model.parameters():
            p.copy_(p.float())
    attn = model.transformer.h[1].attn
    # non-symmetric square matrices and distinct values everywhere: a wrong transpose or a swapped name shows
    assert not torch.equal(attn.adapter_q_dim, attn.adapter_q_dim.T)
    assert not torch.equal(attn.adapter_q_head, attn.adapter_q_head.T)
    torch.save(reference_pth_state(model), tmp_path / "reference.pth")
    wl_checkpoint.save_adapter(model, tmp_path / "ours.safetensors")
    idx = torch.randint(0, 97, (2, 7))
    audio = torch.randn(2, 20, model.config.whisper_width, dtype=torch.float64)
    logits = {}
    for i, name in enumerate(("reference.pth", "ours.safetensors")):
        other = make_model("H>Hw,D>Dw,gqa", layout="paper", variant=variant, seed=2 + i).eval()
        other.load_state_dict({k: v for k, v in model.state_dict().items() if not A.is_adapter_param(k)},
                              strict=False)  # the same frozen LLM and Whisper projections, other adapters
        wl_checkpoint.load_adapter_file(other, tmp_path / name)
        with torch.no_grad():
            logits[name] = other(idx, audio)
    with torch.no_grad():
        expected = literal_forward(model, idx, audio)
    torch.testing.assert_close(logits["reference.pth"], logits["ours.safetensors"], atol=0, rtol=0)
    torch.testing.assert_close(logits["reference.pth"], expected, atol=1e-9, rtol=1e-7)


def test_cross_attention_kv_returns_copies_of_block_weights():
    model = random_model()
    Wk, Wv, bv = wl_checkpoint.cross_attention_kv(model, 1)
    attn = model.decoder.blocks[1].cross_attn
    assert Wk.shape == Wv.shape == (SMALL.n_text_state, SMALL.n_text_state) and bv.shape == (SMALL.n_text_state,)
    a = torch.randn(1, 5, SMALL.n_audio_state)
    torch.testing.assert_close(a @ Wk.T, attn.key(a))
    torch.testing.assert_close(a @ Wv.T + bv, attn.value(a))
    Wk.zero_()
    assert attn.key.weight.abs().sum() > 0 and not Wk.requires_grad
    with pytest.raises(IndexError):
        wl_checkpoint.cross_attention_kv(model, SMALL.n_text_layer)
