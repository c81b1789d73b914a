"""The Whispering-LLaMA path of generate.py: correction, adapter files, the no-adapter notice."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapter as A
import generate as G
import model as M
import whisper_model as wm
from convert_checkpoint import save_checkpoint, smollm2_gguf_path
from prepare_data import build_prompt
from tokenizer import Tokenizer, gguf_to_tokenizer_json
from wl_reference import reference_pth_state

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(smollm2_gguf_path())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """A tiny random LLM with SmolLM2's vocabulary (saved as a checkpoint) and a tiny random Whisper."""
    torch.manual_seed(0)
    cfg = M.Config(name="tiny-smol", block_size=1024, vocab_size=tokenizer.vocab_size, n_layer=3, n_head=4,
                   n_query_groups=2, n_embd=64, intermediate_size=128, tie_embeddings=True)
    llm = M.LLaMA(cfg)
    llm_dir = tmp_path_factory.mktemp("llm")
    save_checkpoint(llm_dir, {k: v for k, v in llm.state_dict().items() if k != "lm_head.weight"}, cfg.to_dict())
    gguf_to_tokenizer_json(smollm2_gguf_path(), llm_dir)
    dims = wm.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                              n_vocab=51864, n_text_ctx=16, n_text_state=32, n_text_head=2, n_text_layer=2)
    whisper = wm.Whisper(dims).eval()
    return llm_dir, whisper


def trained_like(llm_dir, whisper, seed=1):
    model = A.build_model(llm_dir, whisper, adapter_start_layer=1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # stand in for training: move the adapters away from their initial values
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def literal_greedy(model, tokenizer, hypotheses, audio, max_new_tokens):
    """Greedy decoding with a full forward over the whole sequence at every step: no KV cache, no cached
    audio keys/values."""
    ids = tokenizer.encode(build_prompt(hypotheses), bos=True, eos=False)
    n_prompt = len(ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(ids[None], audio[None])[0, -1].argmax())
            if nxt == tokenizer.eos_id:
                break
            ids = torch.cat([ids, torch.tensor([nxt])])
    return tokenizer.decode(ids[n_prompt:]).strip().split("\n")[0].strip()


def test_correct_equals_uncached_greedy_and_is_deterministic(tiny, tokenizer):
    llm_dir, whisper = tiny
    model = trained_like(llm_dir, whisper)
    hyps = ["show me flights from boston to denver", "show me the flights from boston to denver"]
    audio = torch.randn(50, 32)
    out = G.correct(model, tokenizer, hyps, audio, max_new_tokens=12)
    assert out == literal_greedy(model, tokenizer, hyps, audio, 12)
    assert G.correct(model, tokenizer, hyps, audio, max_new_tokens=12) == out


def test_adapter_file_roundtrip_rebuilds_the_same_model(tiny, tokenizer, tmp_path):
    llm_dir, whisper = tiny
    model = trained_like(llm_dir, whisper)
    path = A.save_adapter(model, tmp_path / "run" / "best.safetensors", llm=llm_dir, whisper="unused")
    meta = A.read_adapter_meta(path)
    assert meta["config"]["adapter_start_layer"] == 1 and meta["config"]["variant"] == "M"
    loaded, tok = G.load_wl(path, whisper=whisper)
    for k, v in A.adapter_state_dict(model).items():
        assert torch.equal(A.adapter_state_dict(loaded)[k], v)
    idx = torch.randint(0, 1000, (1, 9))
    audio = torch.randn(1, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx, audio), model(idx, audio))
    assert G.find_latest_adapter(tmp_path) == path
    with pytest.raises(G.GenerateError, match="not found"):
        G.load_wl(tmp_path / "missing.safetensors", whisper=whisper)


def test_response_text_takes_the_first_line():
    assert G.response_text(" show me flights\nExplanation: ...") == "show me flights"
    assert G.response_text("") == ""


def test_windows_split_long_audio():
    import numpy as np

    pieces = G.windows(np.zeros(16000 * 65, dtype=np.float32))
    assert [len(p) for p in pieces] == [480000, 480000, 80000]


@pytest.mark.slow
def test_cli_without_adapter_prints_whisper_one_best(tmp_path):
    """No trained adapter: the real tiny.en 1-best and a one-line notice, never an untrained fusion."""
    import soundfile as sf

    from prepare_data import synthesize

    audio, sr = synthesize("show me the flights from boston to denver", "en-us")
    wav = tmp_path / "x.wav"
    sf.write(wav, audio, sr)
    empty_out = tmp_path / "out"
    env_code = ("import sys, generate; generate.OUT = __import__('pathlib').Path(sys.argv[1]); "
                "sys.argv = ['generate.py', '--audio', sys.argv[2], '--json']; generate.main()")
    r = subprocess.run([sys.executable, "-c", env_code, str(empty_out), str(wav)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    notices = [line for line in r.stderr.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "no trained adapter" in notices[0]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    model, tok = wm.load_whisper("tiny.en")
    mel = wm.log_mel_spectrogram(wm.load_audio(wav))[None]
    with torch.no_grad():
        expected = wm.decode_greedy(model, tok, model.embed_audio(mel))[0].strip()
    assert result["corrected"] is None and result["one_best"] == expected
    assert "boston" in expected.lower()


@pytest.mark.parametrize("variant, use_whisper", [("M", True), ("S", True), ("L", True), ("M", False)])
def test_reference_pth_and_safetensors_give_identical_corrections(tiny, tokenizer, tmp_path, variant, use_whisper):
    """A reference .pth carries no metadata: its names and shapes must set the layout ("paper"), the variant,
    the prompt length, the start layer and text-only vs WL, and its prompt form ("reference")."""
    llm_dir, whisper = tiny
    model = A.build_model(llm_dir, whisper if use_whisper else None, adapter_start_layer=1, kv_layout="paper",
                          variant=variant, adapter_prompt_length=3, use_whisper=use_whisper)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.3 * torch.randn(p.shape, generator=g))  # non-symmetric: a missed transpose shows
    model.eval()
    ours = A.save_adapter(model, tmp_path / "ours.safetensors", llm=llm_dir, whisper="unused",
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
    model = A.build_model(llm_dir, whisper, adapter_start_layer=1, variant="S")
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
    save_file({k: v.contiguous() for k, v in A.adapter_state_dict(model).items()}, str(bare))
    loaded, _ = G.load_wl(bare, llm=llm_dir, whisper=whisper, kv_layout="paper", hypotheses="reference")
    assert (loaded.config.kv_layout, loaded.config.variant, loaded.hypothesis_form) == ("paper", "S", "reference")
    assert G.load_wl(bare, llm=llm_dir, whisper=whisper)[0].config.kv_layout == "heads"
