"""explain.py: the explicit pass reproduces the model, its probabilities are the literal formulas', and the figure
and JSON come out for every kind of adapter."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import adapter as A
import explain as E
import generate as G
import model as M
import whisper_model as wm
import wl_checkpoint
from prepare_data import PROMPT_TEMPLATE, build_prompt
from wl_reference import literal_whisper_kv, padded_template, reference_pth_state

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
HYPS = ["show me flights from boston to denver", "show me the flights from boston to denver",
        "show me flights from boston to them there"]


def small_model(layout="heads", variant="M", use_whisper=True, seed=0, **overrides):
    """A float64 WhisperingLLaMA with H > Hw, D > Dw and GQA, every adapter tensor moved off its init (WL-S: a W/32
    bottleneck needs W = 32, so there H = Hw)."""
    torch.manual_seed(seed)
    W, Hw = (32, 4) if variant == "S" else (16, 2)
    cfg = A.WLConfig(name="t", block_size=64, vocab_size=97, n_layer=3, n_head=4, n_query_groups=2, n_embd=64,
                     intermediate_size=128, adapter_start_layer=1, adapter_prompt_length=3, variant=variant,
                     kv_layout=layout, whisper_width=W, whisper_heads=Hw, whisper_layers=2, use_whisper=use_whisper,
                     **overrides)
    model = A.WhisperingLLaMA(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_" in name or "whisper_" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


CASES = [("heads", "M", True), ("paper", "M", True), ("heads", "L", True), ("paper", "S", True),
         ("heads", "M", False)]


@pytest.mark.parametrize("layout, variant, use_whisper", CASES)
@pytest.mark.parametrize("frames", [40, 12])  # F > D (partial identity in no row) and Dw < F < D
def test_the_explicit_pass_reproduces_every_layer_of_the_model(layout, variant, use_whisper, frames, one_thread):
    """Faithfulness: each block's output and the logits of explain.literal_pass equal the real model's (fast path,
    forward hooks on the blocks), so the probabilities it keeps are those of the computation that ran."""
    model = small_model(layout, variant, use_whisper)
    idx = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(1))
    audio = torch.randn(frames, model.config.whisper_width, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(2))
    real = []
    hooks = [b.register_forward_hook(lambda m, i, o: real.append(o)) for b in model.transformer.h]
    with torch.no_grad():
        logits = model(idx[None], audio[None])
    for h in hooks:
        h.remove()
    cap = E.literal_pass(model, idx, audio, keep_hidden=True)
    assert len(cap["hidden"]) == len(real) == 3
    for ours, theirs in zip(cap["hidden"], real):
        torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(cap["logits"], logits[0], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("layout", ["heads", "paper"])
def test_captured_audio_weights_are_the_literal_template_softmax(layout, one_thread):
    """The kept AiW probabilities equal softmax(q'' K_padᵀ/√D) built by tests/wl_reference.py (explicit template,
    explicit head-mixing loop) from each adapter layer's real input; every attention row sums to 1."""
    model = small_model(layout, "L")
    c = model.config
    T, F_ = 9, 30
    idx = torch.randint(0, 97, (T,), generator=torch.Generator().manual_seed(3))
    audio = torch.randn(F_, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    inputs = {}
    hooks = [model.transformer.h[i].attn.register_forward_pre_hook(
        lambda m, args, i=i: inputs.__setitem__(i, args[0])) for i in range(c.adapter_start_layer, c.n_layer)]
    with torch.no_grad():
        model(idx[None], audio[None])
    for h in hooks:
        h.remove()
    rows = torch.tensor([2, 5, 8])
    cap = E.literal_pass(model, idx, audio, rows=rows)
    assert cap["layers"] == [1, 2]
    H, D, Hw = c.n_head, c.head_size, c.whisper_heads
    cos, sin = M.build_rope_cache(T, D, c.rope_base)
    for n, i in enumerate(cap["layers"]):
        attn = model.transformer.h[i].attn
        q = (inputs[i] @ attn.qkv.weight.T)[..., : H * D].reshape(1, T, H, D).transpose(1, 2)
        q = M.apply_rope(q, cos, sin)
        k_hat, _ = literal_whisper_kv(attn, audio[None], layout)
        K = padded_template(k_hat, H, D)
        q1 = q @ attn.adapter_q_dim
        q2 = torch.zeros_like(q1)
        for h in range(H):
            for h2 in range(H):
                q2[:, h] += q1[:, h2] * attn.adapter_q_head[h2, h]
        expected = (q2 @ K.transpose(-1, -2) / math.sqrt(D)).softmax(-1)[0, :Hw][:, rows]  # (Hw, R, F)
        torch.testing.assert_close(cap["audio"][n], expected, atol=1e-10, rtol=1e-10)
        for p in (cap["audio"][n], cap["self"][n], cap["prefix"][n], E.listening(cap["audio"][n], layout)):
            torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1], dtype=p.dtype), atol=1e-12, rtol=0)
        assert torch.all(cap["self"][n][:, :, rows[0] + 1:][:, 0] == 0)  # causal: row 2 sees positions 0..2 only


@pytest.mark.parametrize("layout", ["heads", "paper"])
def test_key_rows_map_back_to_the_frames_they_carry(layout):
    """Oracle: features whose every number is its own frame index, split into heads by the model's own code;
    every key row then holds only the frame that frame_of_key_row names."""
    model = small_model(layout)
    F_, W, Hw = 7, 16, 2
    frame_index = torch.arange(F_, dtype=torch.float64)[:, None].expand(F_, W).contiguous()
    heads = model.transformer.h[1].attn.split_whisper_heads(frame_index[None])[0]  # (Hw, F, Dw)
    mapped = E.frame_of_key_row(F_, Hw, layout)
    assert torch.equal(heads, mapped[..., None].double().expand_as(heads))
    if layout == "paper":
        assert not torch.equal(mapped, torch.arange(F_).expand(Hw, F_))  # the reference layout does mix frames


# ----------------------------------------------------------------------------------------------------
# explain(): a tiny random LLM with SmolLM2's vocabulary, as in test_generate_wl.py
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer):
    return smol_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_smol):
    """A tiny random LLM with SmolLM2's vocabulary (saved as a checkpoint) and a tiny random Whisper (conftest)."""
    return tiny_smol


def trained_like(llm_dir, whisper, seed=1, **overrides):
    model = wl_checkpoint.build_model(llm_dir, whisper if overrides.get("use_whisper", True) else None, adapter_start_layer=1,
                          **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        for b in model.adapter_blocks():
            if model.config.use_whisper:
                b.attn.adapter_gate_whisper.fill_(3.0)  # a gate that makes the tiny model listen
    return model.eval()


def test_prompt_parts_are_exact_token_spans(tokenizer):
    """Each part's tokens decode to exactly its text, and the parts tile the prompt's ids: the boundaries
    found by encoding prefixes are real token boundaries of the whole prompt."""
    prompt = build_prompt(HYPS)
    ids = tokenizer.encode(prompt, bos=True, eos=False, special=False)
    parts = E.prompt_segments(tokenizer, HYPS, ids)
    assert [p[0] for p in parts] == ["BOS", "instruction", "hyp 1", "hyp 2", "hyp 3", "response cue"]
    assert parts[0][1] == 0 and parts[-1][2] == len(ids) and all(a[2] == b[1] for a, b in zip(parts, parts[1:]))
    assert ids[0] == tokenizer.bos_id and parts[0][1:] == (0, 1)
    texts = [tokenizer.decode(ids[a:b]) for _, a, b in parts[1:]]
    assert texts[0] == PROMPT_TEMPLATE[: PROMPT_TEMPLATE.index("{input}")]
    assert texts[1:4] == [h + "\n" for h in HYPS[:2]] + [HYPS[2]] and texts[4] == "\n\n### Response:"


@pytest.mark.parametrize("layer", [None, 2])
def test_explain_gives_the_fast_path_text_and_sums_to_one(tiny, tokenizer, tmp_path, layer, one_thread):
    llm_dir, whisper = tiny
    model = trained_like(llm_dir, whisper, variant="L")
    audio = torch.randn(60, 32, generator=torch.Generator().manual_seed(5))
    fast = G.correct(model, tokenizer, HYPS, audio, max_new_tokens=8, audio_frames=25)
    expl = G.explain_correction(model, tokenizer, HYPS, audio, audio_frames=25, max_new_tokens=8, layer=layer)
    assert expl["text"] == fast and expl["matches_model"]
    R = len(expl["tokens"])
    assert R >= 2 and tokenizer.decode(expl["token_ids"][:8]).strip().startswith(fast)
    reading = np.array(expl["reading"]["drawn"])
    assert reading.shape == (R, 2 + 3 + 2)  # BOS, instruction, 3 hypotheses, the cue, earlier output
    np.testing.assert_allclose(reading.sum(-1), 1, atol=1e-5)
    assert reading[0, -1] == 0 and np.all(reading[1:, -1] > 0)  # the first token has no earlier output
    lis = expl["listening"]
    assert (lis["frames"], lis["clip_frames"]) == (60, 25)  # full features: the clip's end is marked
    np.testing.assert_allclose(np.array(lis["drawn"]).sum(-1), 1, atol=1e-5)
    assert len(lis["after_clip"]) == R
    np.testing.assert_allclose(np.array(expl["branch_share"]["per_layer"]).sum(-1), 1, atol=1e-6)
    assert expl["layers"] == [1, 2] and len(expl["gates"]["gate_W"]) == 2
    E.write(expl, tmp_path / "x.png", mel=np.zeros((80, 3000)))
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "x.json").read_text())
    assert saved.keys() == expl.keys() and saved["tokens"] == expl["tokens"]
    np.testing.assert_allclose(saved["listening"]["drawn"], lis["drawn"], rtol=1e-5)
    np.testing.assert_allclose(saved["reading"]["per_layer"], expl["reading"]["per_layer"], rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.png"]  # no temporary file left
    with pytest.raises(E.ExplainError, match="not an adapter layer"):
        G.explain_correction(model, tokenizer, HYPS, audio, max_new_tokens=2, layer=0)



def test_likeliest_decoding_explains_the_text_it_prints(tiny, tokenizer, monkeypatch, one_thread):
    """With decode="likeliest" the explained text is the printed one; when a hypothesis beats the greedy output
    (a search error planted in the fast path), the explicit pass reads that hypothesis token by token."""
    llm_dir, whisper = tiny
    model = trained_like(llm_dir, whisper, variant="L")
    audio = torch.randn(60, 32, generator=torch.Generator().manual_seed(5))
    same = G.explain_correction(model, tokenizer, HYPS, audio, audio_frames=25, max_new_tokens=8,
                                 decode="likeliest")
    assert same["text"] == G.correct(model, tokenizer, HYPS, audio, 8, audio_frames=25, decode="likeliest")

    planted = "zq xv kk wj " * 6  # long and unlikely: the hypotheses (8 tokens or so) score higher

    def bad_greedy(model, idx, *args, **kwargs):
        return torch.cat([idx, tokenizer.encode(planted, bos=False, eos=False, special=False)])

    monkeypatch.setattr(G, "generate", bad_greedy)
    expl = G.explain_correction(model, tokenizer, HYPS, audio, audio_frames=25, max_new_tokens=8,
                                 decode="likeliest")
    assert expl["greedy_text"] == planted.strip() and expl["text"] in HYPS
    assert expl["text"] == G.correct(model, tokenizer, HYPS, audio, 8, audio_frames=25, decode="likeliest")
    want = tokenizer.encode(expl["text"], bos=False, eos=False, special=False).tolist() + [tokenizer.eos_id]
    assert expl["token_ids"] == want and expl["ended_with_eos"]
    np.testing.assert_allclose(np.array(expl["reading"]["drawn"]).sum(-1), 1, atol=1e-5)


def test_trimmed_features_follow_the_clip(tiny, tokenizer, one_thread):
    llm_dir, whisper = tiny
    model = trained_like(llm_dir, whisper, trim_audio=True)
    audio = torch.randn(1500, 32, generator=torch.Generator().manual_seed(6))
    expl = G.explain_correction(model, tokenizer, HYPS[:2], audio, audio_frames=40, max_new_tokens=4)
    assert expl["text"] == G.correct(model, tokenizer, HYPS[:2], audio, 4, audio_frames=40)
    assert expl["listening"]["frames"] == 40 and expl["listening"]["after_clip"] is None


@pytest.mark.parametrize("variant, use_whisper", [("M", True), ("S", True), ("L", True), ("M", False)])
def test_reference_pth_adapters_explain_end_to_end(tiny, tokenizer, tmp_path, variant, use_whisper, one_thread):
    """The original code's .pth files (paper layout, every variant, text-only): explain_file on a real wav writes
    the figure and the JSON, with the same text as the fast path; a text-only adapter has no listening panel."""
    llm_dir, whisper = tiny
    model = trained_like(llm_dir, whisper, kv_layout="paper", variant=variant, adapter_prompt_length=3,
                         use_whisper=use_whisper)
    ref = tmp_path / "reference.pth"
    torch.save(reference_pth_state(model), ref)
    loaded, _ = G.load_wl(ref, llm=llm_dir, whisper=whisper)
    wav = tmp_path / "clip.wav"
    t = np.arange(16000 * 2) / 16000
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    hyps = [h.replace("flights", "flight") for h in HYPS[:2]]
    record = {"file": str(wav), "nbest": [[{"text": h, "logprob": None} for h in hyps]]}
    (png,) = G.explain_file(wav, record, loaded, tokenizer, whisper, tmp_path / "why" / "clip.png", max_new_tokens=6)
    expl = json.loads(png.with_suffix(".json").read_text())
    mel = wm.log_mel_spectrogram(wm.load_audio(wav))
    feats = whisper.embed_audio(mel[None])[0].detach()
    assert expl["text"] == G.correct(loaded, tokenizer, hyps, feats, 6, audio_frames=100)
    assert expl["matches_model"] and png.read_bytes()[:4] == b"\x89PNG"
    if use_whisper:
        assert expl["kv_layout"] == "paper" and expl["listening"]["clip_frames"] == 100
    else:
        assert expl["listening"] is None and expl["gates"]["gate_W"] is None


def test_explain_with_a_manifest_of_several_files_is_refused(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"audio": f"{n}.wav", "text": "x"}) + "\n" for n in "ab"))
    with pytest.raises(SystemExit) as e:
        G.main(["--audio", str(tmp_path / "m.jsonl"), "--explain", str(tmp_path / "x.png")])
    assert e.value.code == 1 and "use --explain-dir" in capsys.readouterr().err


def test_explain_dir_names_one_figure_per_file(tmp_path):
    a, b, c = Path("x/one.wav"), Path("x/two.flac"), Path("y/one.wav")
    assert G.explain_path(tmp_path, b, [a, b]) == tmp_path / "two.png"
    assert G.explain_path(tmp_path, a, [a, b, c]) != G.explain_path(tmp_path, c, [a, b, c])


def test_cli_flags_are_checked(capsys):
    for argv, message in [(["--prompt", "x", "--explain", "a.png"], "go with --audio"),
                          (["--audio", "a.wav", "b.wav", "--explain", "a.png"], "use --explain-dir"),
                          (["--audio", "a.wav", "--explain", "a.png", "--explain-dir", "d"], "not both")]:
        with pytest.raises(SystemExit):
            G.main(argv)
        assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not (FIXTURES / "jfk.flac").is_file(), reason="../shared/fixtures/jfk.flac is absent")
def test_real_weights_explain_jfk(tmp_path, embedded_llm_dir, embedded_whisper_dir):
    """The shipped demo adapter on real speech: the CLI writes the figure and JSON, the explicit pass reproduces
    the real model's next-token choices, and the text is the one generate.py prints without --explain."""
    import subprocess
    import sys

    png = tmp_path / "jfk.png"
    common = [sys.executable, "generate.py", "--audio", str(FIXTURES / "jfk.flac"), "--whisper",
              str(embedded_whisper_dir), "--adapter", str(G.DEMO_ADAPTER), "--llm", str(embedded_llm_dir), "--json"]
    plain = subprocess.run(common, cwd=ROOT, capture_output=True, text=True, timeout=900)
    explained = subprocess.run(common + ["--explain", str(png)], cwd=ROOT, capture_output=True, text=True,
                               timeout=900)
    assert plain.returncode == 0 and explained.returncode == 0, (plain.stderr, explained.stderr)
    assert json.loads(plain.stdout) == json.loads(explained.stdout)  # --explain changes nothing of the result
    expl = json.loads(png.with_suffix(".json").read_text())
    assert expl["text"] == json.loads(plain.stdout)["corrected"] and expl["matches_model"]
    lis = np.array(expl["listening"]["drawn"])
    np.testing.assert_allclose(lis.sum(-1), 1, atol=1e-4)
    np.testing.assert_allclose(np.array(expl["reading"]["drawn"]).sum(-1), 1, atol=1e-4)
    assert png.stat().st_size > 10_000
