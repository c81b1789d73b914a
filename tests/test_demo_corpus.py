"""Tests for demo_corpus.py: eSpeak NG synthesis, the grammar, splits, rendering, the held-out set."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo_corpus  # noqa: E402
import prepare_data  # noqa: E402
from demo_corpus import SynthesisError, synthesize  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# Synthesis
# ----------------------------------------------------------------------------------------------------


def test_synthesize_returns_int16_speech():
    audio, sr = synthesize("Show me the flights from Boston to Denver.", voice="en-us+m3")
    assert sr == 22050
    assert audio.dtype == np.int16 and audio.ndim == 1
    assert 0.5 < len(audio) / sr < 10
    # speech, not silence: a good share of 10 ms frames carry energy well above the quietest frames
    frames = audio[: len(audio) // 220 * 220].astype(np.float64).reshape(-1, 220)
    rms = np.sqrt((frames**2).mean(1))
    assert rms.max() > 1000
    assert (rms > 0.1 * rms.max()).mean() > 0.3


def test_synthesize_duration_grows_with_text():
    short, sr = synthesize("Boston.")
    longer, _ = synthesize("Boston to Denver on Monday.")
    longest, _ = synthesize("Show me all the flights from Boston to Denver on Monday morning after nine a m.")
    assert len(short) < len(longer) < len(longest)
    # rate is words per minute: speaking twice as fast gives clearly shorter audio
    slow, _ = synthesize("Show me all the flights from Boston to Denver.", rate=120)
    fast, _ = synthesize("Show me all the flights from Boston to Denver.", rate=240)
    assert len(fast) < 0.7 * len(slow)


def test_synthesize_is_deterministic_whatever_came_before():
    text = "Which airlines fly from Atlanta to Dallas?"
    first, _ = synthesize(text, voice="en-us+f2", rate=160, pitch=60)
    # other calls in between must not change the next result (eSpeak keeps wave-generator state in statics)
    synthesize("Something else entirely, spoken first.", voice="en-us+m3", rate=200)
    synthesize("And another one.", voice="en+klatt4")
    second, _ = synthesize(text, voice="en-us+f2", rate=160, pitch=60)
    np.testing.assert_array_equal(first, second)
    # the parameters do matter
    other_pitch, _ = synthesize(text, voice="en-us+f2", rate=160, pitch=30)
    assert len(other_pitch) != len(first) or not np.array_equal(other_pitch, first)


def test_synthesize_bad_input_is_a_clear_error():
    with pytest.raises(SynthesisError, match="unknown eSpeak voice"):
        synthesize("hello", voice="no-such-voice")
    with pytest.raises(SynthesisError, match="empty"):
        synthesize("   ")


# ----------------------------------------------------------------------------------------------------
# Demo corpus: grammar, splits, rendering
# ----------------------------------------------------------------------------------------------------


def test_grammar_is_deterministic_and_large_enough():
    a = demo_corpus.demo_sentences(3000, seed=0)
    assert a == demo_corpus.demo_sentences(3000, seed=0)
    assert len(a) == len(set(a)) == 3000
    assert demo_corpus.demo_sentences(3000, seed=1) != a
    for s in a:
        assert s[0].isupper() and s[-1] in ".?", s
        assert "{" not in s and "}" not in s and ".." not in s and "  " not in s, s
    # real vocabulary from every slot family shows up
    text = " ".join(a)
    for word in ("Boston", "O'Hare", "Delta", "Monday", "a.m.", "first class", "breakfast", "taxi", "$",
                 "flight"):
        assert word in text, word


def test_split_by_sentence_without_leakage():
    sentences = demo_corpus.demo_sentences(3000, seed=0)
    splits = demo_corpus.split_sentences(sentences, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2400, "dev": 300, "test": 300}
    train, dev, test = (set(splits[k]) for k in ("train", "dev", "test"))
    assert not (train & dev) and not (train & test) and not (dev & test)
    assert train | dev | test == set(sentences)
    # deterministic, and independent of the order the sentences come in
    assert demo_corpus.split_sentences(list(reversed(sentences)), seed=0) == splits
    with pytest.raises(ValueError):
        demo_corpus.split_sentences(["a", "a", "b"])


def test_speakable_rewrites_prices_only():
    assert demo_corpus.speakable("Fares under $450 from Boston.") == "Fares under 450 dollars from Boston."
    assert demo_corpus.speakable("Flight 450 at 8 a.m.") == "Flight 450 at 8 a.m."


def test_demo_rendering_adds_noise_at_the_requested_snr():
    import soxr

    text = "Show me the flights from Denver to Atlanta on Monday."
    settings = dict(demo_corpus.demo_utterance_settings("train-00007", seed=0), snr_db=20.0, noise="white")
    assert settings == dict(demo_corpus.demo_utterance_settings("train-00007", seed=0), snr_db=20.0,
                            noise="white")
    audio = demo_corpus.render_demo_utterance(text, settings)
    assert audio.dtype == np.float32 and np.abs(audio).max() <= 1.0
    # rebuild the clean signal independently and measure the SNR of what was added
    speech, sr = synthesize(text, settings["voice"], settings["rate"], settings["pitch"])
    clean = soxr.resample(speech.astype(np.float32) / 32768.0, sr, 16000).astype(np.float64)
    lead = int(settings["lead_s"] * 16000)
    assert len(audio) == lead + len(clean) + int(settings["tail_s"] * 16000)
    scale = 1.0
    if np.abs(audio).max() >= 0.99 - 1e-6:  # the renderer scaled the mix down to avoid clipping
        scale = np.dot(audio[lead:lead + len(clean)], clean) / np.dot(clean, clean)
    noise = audio / scale
    noise[lead:lead + len(clean)] -= clean
    snr = 10 * np.log10(np.mean(clean**2) / np.mean(noise**2))
    assert abs(snr - 20.0) < 0.3


def test_build_demo_corpus_writes_16k_audio_and_manifest(tmp_path):
    import soundfile as sf

    manifest = demo_corpus.build_demo_corpus(tmp_path, n=3000, seed=0, limit=2, progress=False)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["split"] for r in rows] == ["train", "train", "dev", "dev", "test", "test"]
    splits = demo_corpus.split_sentences(demo_corpus.demo_sentences(3000, 0), 0)
    assert [r["text"] for r in rows[:2]] == splits["train"][:2]
    info = sf.info(str(tmp_path / rows[0]["audio"]))
    assert info.samplerate == 16000 and info.channels == 1 and info.duration > 1
    first = (tmp_path / rows[0]["audio"]).read_bytes()
    # a rerun keeps the existing files and writes the same manifest; a fresh folder gets the same audio
    assert demo_corpus.build_demo_corpus(tmp_path, 3000, 0, 2, progress=False).read_text() == manifest.read_text()
    again = demo_corpus.build_demo_corpus(tmp_path / "again", 3000, 0, 2, progress=False)
    assert (again.parent / rows[0]["audio"]).read_bytes() == first
    # another corpus size names other sentences with the same ids: refused
    with pytest.raises(prepare_data.InputError, match="demo corpus built with"):
        demo_corpus.build_demo_corpus(tmp_path, 3500, 0, 2, progress=False)


def test_heldout_sentences_are_new_to_the_grammar_and_the_voice_unseen():
    grammar = set(demo_corpus.demo_sentences(3000, 0))
    assert len(set(demo_corpus.HELDOUT_SENTENCES)) == len(demo_corpus.HELDOUT_SENTENCES) >= 20
    assert not grammar & set(demo_corpus.HELDOUT_SENTENCES)
    # not even a template's opening words: no held-out sentence starts like a template does (2 words or more)
    starts = {t.split("{")[0].strip() for t in demo_corpus.TEMPLATES if len(t.split("{")[0].split()) >= 2}
    assert not [s for s in demo_corpus.HELDOUT_SENTENCES if any(s.startswith(p + " ") for p in starts)]
    assert demo_corpus.HELDOUT_VOICE not in demo_corpus.DEMO_VOICES
