"""train.py on a tiny random LLM + tiny random Whisper + a tiny prepared set written here in the prepared format.

Oracles: literal cross-entropies over full logits written in the tests, a batch of 8 computed in one piece,
an uninterrupted run against an interrupted + resumed one, a single process against two."""
import argparse
import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adapter as A
import wl_checkpoint
import prepare_data as P
import train as T
from convert_checkpoint import save_checkpoint
from model import LLaMA, Config
from tokenizer import GPT2_PATTERN, Tokenizer, bytes_to_unicode
from whisper_model import ModelDimensions, Whisper

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

ROOT = Path(__file__).resolve().parent.parent
N_FRAMES, WIDTH = 20, 32  # tiny "encoder output": 20 frames of a 32-wide Whisper (2 heads of 16)

SENTENCES = [
    "show me flights to boston", "list fares from denver to dallas on monday", "is there a morning flight",
    "what is the cheapest fare to oakland tomorrow evening", "book two seats", "which airline flies to atlanta",
    "show ground transport in pittsburgh", "i need a return flight on friday night from baltimore",
    "what meals are served", "flights after six pm", "how long is the flight to philadelphia",
    "show me the first class fares from san francisco to washington", "any nonstop flights",
    "give me the departure times", "coach fares please", "what aircraft is used on the evening flight",
    "cheapest flight to miami", "from boston to denver on tuesday", "list all flights leaving after noon",
    "dinner flights to new york",
]


def train_bpe(texts, n_merges):
    """A byte-level BPE vocab + merges learnt from `texts` (most frequent adjacent pair first), so that the
    prompt template takes a few dozen tokens instead of ~450 bytes: the tests stay fast."""
    import regex

    words = {}
    for text in texts:
        for piece in regex.findall(GPT2_PATTERN, text):
            key = tuple(bytes([b]) for b in piece.encode())
            words[key] = words.get(key, 0) + 1
    merges = []
    for _ in range(n_merges):
        pairs = {}
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], p))
        merges.append((a, b))
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges


def tokenizer_files(merges):
    """tokenizer.json: the 256 bytes, then one token per merge (ids in merge order), then <s> and </s>."""
    alphabet = bytes_to_unicode()

    def show(t: bytes):
        return "".join(alphabet[c] for c in t)

    vocab = {alphabet[b]: b for b in range(256)}
    for a, b in merges:
        vocab.setdefault(show(a + b), len(vocab))
    tok = {"model": {"type": "BPE", "vocab": vocab, "merges": [f"{show(a)} {show(b)}" for a, b in merges]},
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
           "added_tokens": [{"id": len(vocab), "content": "<s>"}, {"id": len(vocab) + 1, "content": "</s>"}]}
    files = [("tokenizer.json", json.dumps(tok)),
             ("tokenizer_config.json", json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))]
    return files, len(vocab) + 2


def misspell(text, rng):
    """The text with one word cut short: a plausible ASR hypothesis."""
    words = text.split()
    i = int(rng.integers(len(words)))
    words[i] = words[i][:-1] or "a"
    return " ".join(words)


def write_split(root, split, tok, sentences, rng):
    feats, lines = [], []
    for row, text in enumerate(sentences):
        hyps = [misspell(text, rng), misspell(text, rng)]
        ids, labels = P.tokenize_example(tok, hyps, text)
        lines.append({"id": f"{split}{row}", "split": split, "text": text, "hypotheses": hyps, "one_best": hyps[0],
                      "oracle": hyps[0], "oracle_wer": 0.2, "duration": 1.0, "n_frames": N_FRAMES,
                      "ids": ids.tolist(), "prompt_len": int((labels == P.IGNORE_INDEX).sum()), "shard": 0,
                      "row": row})
        feats.append(rng.standard_normal((N_FRAMES, WIDTH)))
    for line in lines:
        line.update(chunk=0, chunk_lines=len(lines))
    P._commit_chunk(root / split, 0, np.stack(feats).astype(np.float16), lines)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    files, vocab_size = tokenizer_files(train_bpe([P.build_prompt(SENTENCES)] * 20 + SENTENCES, 300))
    cfg = Config.from_name("tiny", vocab_size=vocab_size, n_layer=4)
    llm = LLaMA(cfg)
    with torch.no_grad():  # unit-variance activations, so that what the adapters change reaches the logits
        for name, p in llm.named_parameters():
            if p.dim() == 2:
                p.normal_(std=1.0 if "wte" in name else p.shape[1] ** -0.5)
    llm_dir = save_checkpoint(base / "llm", llm.state_dict(), cfg.to_dict(), files)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=WIDTH, n_audio_head=2, n_audio_layer=1,
                           n_vocab=64, n_text_ctx=16, n_text_state=WIDTH, n_text_head=2, n_text_layer=2)
    whisper_dir = save_checkpoint(base / "whisper", Whisper(dims).state_dict(), asdict(dims))
    data = base / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"llm": str(llm_dir), "feature_model": str(whisper_dir),
                                                "hypotheses": "reference"}))
    tok = Tokenizer.from_dir(llm_dir)
    rng = np.random.default_rng(0)
    write_split(data, "train", tok, SENTENCES[:16], rng)
    write_split(data, "dev", tok, SENTENCES[16:], rng)
    return {"llm": llm_dir, "whisper": whisper_dir, "data": data, "tok": tok, "base": base}


def args(tiny, out, *extra):
    # fp32 unless a test asks otherwise: the CPU default is chosen by a quick matmul timing (train.resolve_precision)
    precision = [] if "--precision" in extra else ["--precision", "32"]
    return ["--data", str(tiny["data"]), "--llm", str(tiny["llm"]), "--out", str(out), "--batch", "4",
            "--micro-batch", "2", "--dev-limit", "0", "--accelerator", "cpu", *precision, *extra]


def read_log(out):
    with open(Path(out) / "log.csv") as f:
        return list(csv.DictReader(f))


def train_losses(out):
    return [r["loss"] for r in read_log(out) if r["loss"]]


def load_adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def tiny_model(tiny, **overrides):
    torch.manual_seed(0)
    return wl_checkpoint.build_model(tiny["llm"], Whisper.from_checkpoint(tiny["whisper"]), **overrides)


def items(tiny, n, split="train"):
    ds = P.PreparedDataset(tiny["data"], split)
    return [ds[i] for i in range(n)]


# ------------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------------


def literal_losses(model, examples, mask_prompt=True):
    """Per-token cross-entropies, one example at a time over full logits: position t predicts token t+1; with
    masking only the response (from prompt_len on, EOS included) is predicted."""
    losses = []
    for ex in examples:
        ids = ex["ids"]
        logits = model(ids[None], ex["audio_features"][None])[0]  # (L, V)
        first = ex["meta"]["prompt_len"] if mask_prompt else 1
        for t in range(first - 1, len(ids) - 1):
            losses.append(-torch.log_softmax(logits[t].double(), -1)[ids[t + 1]])
    return torch.stack(losses)


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_loss_covers_the_response_only_unless_no_mask(tiny, mask_prompt):
    model = tiny_model(tiny)
    examples = items(tiny, 3)
    with torch.no_grad():
        total, n = T.micro_batch_loss(model, T.make_batch(examples, mask_prompt))
        expected = literal_losses(model, examples, mask_prompt)
    assert n == len(expected)
    torch.testing.assert_close(total.double() / n, expected.mean(), rtol=1e-5, atol=1e-6)
    if mask_prompt:  # the prompt is most of the sequence: masking changes the count a lot
        assert n < sum(len(e["ids"]) for e in examples) / 4


def test_logits_at_labelled_positions_give_the_full_logits_loss(tiny):
    model = tiny_model(tiny)
    batch = T.make_batch(items(tiny, 4))  # different lengths: padding included
    with torch.no_grad():
        total, n = T.micro_batch_loss(model, batch)
        logits = model(batch["ids"][:, :-1], batch["audio_features"])  # (B, T-1, V): every position
        full = F.cross_entropy(logits.flatten(0, 1).double(), batch["labels"][:, 1:].flatten(),
                               ignore_index=P.IGNORE_INDEX, reduction="sum")
    assert n == int((batch["labels"][:, 1:] != P.IGNORE_INDEX).sum())
    torch.testing.assert_close(total.double(), full, rtol=1e-5, atol=1e-5)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_4x2_equals_a_batch_of_8(tiny):
    from lightning_fabric import Fabric

    examples = items(tiny, 8)
    # Oracle: the batch of 8 in one piece, the mean over all its labelled tokens.
    model = tiny_model(tiny)
    batch = T.make_batch(examples)
    logits = model(batch["ids"][:, :-1], batch["audio_features"])
    F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=P.IGNORE_INDEX).backward()
    expected = grads(model)

    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    wrapped = fabric.setup_module(tiny_model(tiny))
    micro = [T.make_batch(examples[i: i + 2]) for i in range(0, 8, 2)]
    loss, n_tokens = T.accumulate_gradients(fabric, wrapped, micro)
    got = grads(wrapped.module)
    assert n_tokens == sum(len(e["ids"]) for e in examples)
    with torch.no_grad():
        assert loss == pytest.approx(float(F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                            ignore_index=P.IGNORE_INDEX)), rel=1e-5)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)

    # The test can fail: averaging the 4 micro-batch means instead (they hold different token counts) differs.
    model = tiny_model(tiny)
    for b in micro:
        logits = model(b["ids"][:, :-1], b["audio_features"])
        loss = F.cross_entropy(logits.flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=P.IGNORE_INDEX)
        (loss / 4).backward()
    naive = grads(model)
    assert any(not torch.allclose(naive[n], expected[n], rtol=1e-4, atol=1e-6) for n in expected)


def test_linear_lr_decay():
    lrs = [1e-3 * T.lr_factor(s, 11, 1e-3, 1e-5) for s in range(11)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5)
    assert np.allclose(np.diff(lrs), (1e-5 - 1e-3) / 10)


# ------------------------------------------------------------------------------------------------------
# Runs of the command line
# ------------------------------------------------------------------------------------------------------


def train_set_loss(tiny, adapter_file=None):
    model = tiny_model(tiny)
    if adapter_file:
        wl_checkpoint.load_adapter_file(model, adapter_file)
    with torch.no_grad():
        total, n = T.micro_batch_loss(model, T.make_batch(items(tiny, 16)))
    return total.item() / n


def test_training_makes_the_loss_go_down(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    T.main(args(tiny, out, "--max-steps", "16", "--lr", "3e-2", "--min-lr", "3e-2"))
    losses = [float(x) for x in train_losses(out)]
    assert len(losses) == 16
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3, losses
    # measured apart from the training loop: the loss over the whole train split, before and after
    before, after = train_set_loss(tiny), train_set_loss(tiny, out / "last.safetensors")
    assert after < before - 0.5, (before, after)
    printed = capsys.readouterr().out
    assert "tokens/s" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["variant"] == "M" and config["model"]["whisper_width"] == WIDTH
    assert config["run"]["whisper"] == str(tiny["whisper"])  # from the data's meta.json
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # epoch ends (every 4 steps) were evaluated: val loss logged, best kept
    evals = [r for r in read_log(out) if r["val_loss"]]
    assert [int(r["step"]) for r in evals] == [4, 8, 12, 16]
    assert set(load_adapter(out / "best.safetensors")) == set(load_adapter(out / "last.safetensors"))


def test_dev_wer_and_best_checkpoint(tiny, tmp_path):
    """Each epoch decodes the first --dev-limit dev utterances (generate.correct, greedy); the logged WER is
    jiwer's over them, and best.safetensors holds the adapters of the lowest one."""
    import jiwer

    from generate import correct

    out = tmp_path / "run"
    T.main(args(tiny, out, "--max-steps", "8", "--lr", "3e-2", "--dev-limit", "2"))
    evals = [r for r in read_log(out) if r["val_loss"]]
    assert [int(r["step"]) for r in evals] == [4, 8] and all(r["dev_wer"] for r in evals)
    wers = [float(r["dev_wer"]) for r in evals]
    best = evals[int(np.argmin(wers))]  # the first of equal scores
    meta = wl_checkpoint.read_adapter_meta(out / "best.safetensors")
    assert meta["step"] == best["step"] and meta["config"]["variant"] == "M"
    assert meta["hypotheses"] == "reference"  # the data's n-best form travels with the adapter
    # provenance: the command line, the code's commit, the data and its summary
    assert meta["command"].startswith("python train.py --data ") and "--max-steps 8" in meta["command"]
    assert meta["commit"] and meta["data"] == str(Path(tiny["data"]).resolve())
    summary = json.loads(meta["data_summary"])
    assert summary["train"]["utterances"] == len(P.PreparedDataset(tiny["data"], "train"))
    assert Path(meta["whisper"]) == tiny["whisper"] and Path(meta["llm"]) == tiny["llm"]
    model = tiny_model(tiny)
    wl_checkpoint.load_adapter_file(model, out / "best.safetensors")
    model.eval()
    dev = items(tiny, 2, "dev")
    hyps = [correct(model, tiny["tok"], d["meta"]["hypotheses"], d["audio_features"]) for d in dev]
    assert float(best["dev_wer"]) == pytest.approx(jiwer.wer([d["meta"]["text"] for d in dev], hyps), abs=1e-9)


def test_early_stopping_keeps_the_best(tiny, tmp_path, monkeypatch, capsys):
    """Scripted dev WERs (the training itself does not depend on them): with patience 2 the run stops at the
    second evaluation without improvement, and best.safetensors holds the adapters of the best one."""
    reference = tmp_path / "ref"
    T.main(args(tiny, reference, "--max-steps", "8"))  # the adapters after step 8
    scripted = iter([(5.0, 0.5), (4.0, 0.4), (3.0, 0.45), (2.0, 0.41), (1.0, 0.1)])
    monkeypatch.setattr(T, "validate", lambda *a, **k: next(scripted))
    out = tmp_path / "run"
    T.main(args(tiny, out, "--patience", "2"))
    printed = capsys.readouterr().out
    assert "early stopping" in printed
    assert [int(r["step"]) for r in read_log(out) if r["dev_wer"]] == [4, 8, 12, 16]
    assert len(train_losses(out)) == 16
    best, ref = load_adapter(out / "best.safetensors"), load_adapter(reference / "last.safetensors")
    assert all(torch.equal(best[k], ref[k]) for k in ref)
    assert wl_checkpoint.read_adapter_meta(out / "best.safetensors")["dev_wer"] == "0.4"
    T.main(args(tiny, out, "--resume"))  # a finished run has nothing left to do
    assert "nothing to do" in capsys.readouterr().out and len(train_losses(out)) == 16


# --random-audio: the forward pass draws noise, so the RNG state must be restored exactly too.
RESUMABLE = ("--random-audio", "--eval-every", "3", "--epochs", "3")  # 4 steps per epoch


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """9 steps in one go: the oracle of the resume tests. On one thread like the tests themselves (a module
    fixture runs before `one_thread`): the comparisons are bit-exact, and float sums depend on the thread count."""
    whole, threads = tmp_path_factory.mktemp("whole"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        T.main(args(tiny, whole, *RESUMABLE, "--max-steps", "9"))
    finally:
        torch.set_num_threads(threads)
    return whole


def test_resume_equals_an_uninterrupted_run(tiny, tmp_path, uninterrupted):
    common = RESUMABLE
    whole, parts = uninterrupted, tmp_path / "parts"
    T.main(args(tiny, parts, *common, "--max-steps", "5"))  # interrupted mid-epoch, between evaluations
    assert len(train_losses(parts)) == 5
    T.main(args(tiny, parts, "--resume", "--max-steps", "9"))  # the recipe comes from the saved run
    assert train_losses(parts) == train_losses(whole)  # exact (the full float repr is logged)
    assert [r["val_loss"] for r in read_log(parts)] == [r["val_loss"] for r in read_log(whole)]
    for name in ("last", "best"):
        a, b = load_adapter(whole / f"{name}.safetensors"), load_adapter(parts / f"{name}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the adapters did move
    init = {n: p for n, p in tiny_model(tiny).named_parameters() if A.is_adapter_param(n)}
    assert any(not torch.equal(init[k], a[k]) for k in a)


def test_resume_after_a_crash_between_checkpoints_equals_an_uninterrupted_run(tiny, tmp_path, monkeypatch,
                                                                                 uninterrupted):
    """Checkpoints at steps 3, 4 (epoch end), 6, 8, 9; a crash in the middle of step 8, after step 7 was done:
    --resume restarts from step 6, with the adapters, optimizer, schedule, data order, log and RNG of step 6, and
    ends exactly where an uninterrupted run ends."""
    common = RESUMABLE
    whole, parts = uninterrupted, tmp_path / "parts"
    real, steps = T.accumulate_gradients, []

    def crash_in_step_8(*a, **k):
        steps.append(1)
        if len(steps) == 8:
            real(*a, **k)  # the forward/backward happen, the optimizer step never does
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(T, "accumulate_gradients", crash_in_step_8)
    with pytest.raises(SystemExit) as stopped:  # main() turns the interrupt into exit status 130
        T.main(args(tiny, parts, *common, "--max-steps", "9"))
    assert stopped.value.code == 130
    monkeypatch.undo()
    assert wl_checkpoint.read_adapter_meta(parts / "last.safetensors")["step"] == "6"
    assert len(train_losses(parts)) == 6  # the log as of the last checkpoint
    T.main(args(tiny, parts, "--resume", "--max-steps", "9"))
    assert train_losses(parts) == train_losses(whole)
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert timeless(read_log(parts)) == timeless(read_log(whole))  # losses, lr, val loss, epochs: all equal
    for name in ("last", "best"):
        a, b = load_adapter(whole / f"{name}.safetensors"), load_adapter(parts / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    good = tmp_path / "good"
    T.main(args(tiny, good, "--eval-every", "2", "--max-steps", "2"))

    real, calls = T.micro_batch_loss, []

    def nan_at_step_3(model, batch, use_audio=True):
        loss, n = real(model, batch, use_audio)
        if torch.is_grad_enabled():  # training calls only (2 micro-batches per step)
            calls.append(1)
            if len(calls) == 5:
                loss = loss * float("nan")
        return loss, n

    monkeypatch.setattr(T, "micro_batch_loss", nan_at_step_3)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        T.main(args(tiny, out, "--eval-every", "2", "--max-steps", "6"))
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the loss is nan at step 3") and "last.safetensors (step 2)" in err[-1]
    a, b = load_adapter(out / "last.safetensors"), load_adapter(good / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) and torch.isfinite(a[k]).all() for k in a)
    assert len(train_losses(out)) == 2


def test_bf16_keeps_the_small_updates_that_bf16_true_loses(tiny, tmp_path, monkeypatch):
    """--precision bf16 stores the frozen weights in bf16 but trains fp32 adapters: an AdamW step of ~lr = 1e-3
    moves the identity-initialised diagonal of Q_d and gate_W (= 1). In pure bf16 (bf16-true) 1 ± 1e-3 rounds
    back to 1, so those never move: why bf16-true is not the default. The bf16 run also decodes a dev utterance
    (generate.correct under bf16 autocast, with bf16 frozen weights and fp32 adapters)."""
    built, real_build = {}, T.build
    monkeypatch.setattr(T, "build", lambda run, fabric, precision, width: built.setdefault(
        precision, real_build(run, fabric, precision, width)))
    diag_moved = {}
    for mode in ("32", "bf16", "bf16-true"):
        dev = ["--eval-every", "2", "--dev-limit", "1"] if mode == "bf16" else []
        T.main(args(tiny, tmp_path / mode, "--max-steps", "2", "--precision", mode, *dev))
        a = load_adapter(tmp_path / mode / "last.safetensors")
        q_dim = [v for k, v in a.items() if k.endswith("adapter_q_dim")]
        gates = [v for k, v in a.items() if k.endswith("adapter_gate_whisper")]
        diag_moved[mode] = all((q.diagonal() != 1).all() for q in q_dim) and all((g != 1).all() for g in gates)
    assert diag_moved == {"32": True, "bf16": True, "bf16-true": False}
    fp32, bf16 = (np.array(train_losses(tmp_path / m), dtype=float) for m in ("32", "bf16"))
    np.testing.assert_allclose(bf16, fp32, rtol=1e-2)  # same run, bf16 rounding apart
    # what each mode trained: bf16 = frozen weights bf16 (the LLM and the Whisper projections), adapters fp32
    model, _ = built["bf16"]
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    assert model.adapter_blocks()[0].attn.whisper_key.weight.dtype == torch.bfloat16
    assert {p.dtype for p in built["32-true"][0].parameters()} == {torch.float32}
    evals = [r for r in read_log(tmp_path / "bf16") if r["val_loss"]]
    assert [int(r["step"]) for r in evals] == [2] and 0 <= float(evals[0]["dev_wer"])


def test_clear_errors(tiny, tmp_path, capsys):
    def error_of(argv):
        with pytest.raises(SystemExit) as e:
            T.main(argv)
        assert e.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
        return err

    assert "prepare_data.py" in error_of(args(tiny, tmp_path / "a", "--data", str(tmp_path / "nowhere")))
    assert "holds no converted checkpoint" in error_of(args(tiny, tmp_path / "b", "--llm", str(tmp_path / "nollm")))
    assert not (tmp_path / "b").exists()  # a failed start leaves no output folder behind
    # an adapter checkpoint of another variant
    s_model = tiny_model(tiny, variant="S")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in wl_checkpoint.adapter_state_dict(s_model).items()}, str(tmp_path / "s.safetensors"))
    msg = error_of(args(tiny, tmp_path / "c", "--variant", "L", "--adapter", str(tmp_path / "s.safetensors")))
    assert "does not match" in msg
    assert "nothing to resume" in error_of(args(tiny, tmp_path / "d", "--resume"))
    assert "multiple of" in error_of(args(tiny, tmp_path / "e", "--batch", "6", "--micro-batch", "4"))


def test_resume_refuses_a_different_recipe_and_a_used_folder(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    T.main(args(tiny, out, "--max-steps", "1"))
    capsys.readouterr()
    for extra, what in ((["--resume", "--variant", "S"], "--variant S differs"),
                        ([], "already holds a run")):
        with pytest.raises(SystemExit):
            T.main(args(tiny, out, "--max-steps", "2", *extra))
        assert what in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_with_accumulation_equals_one_process(tiny, tmp_path):
    """Batch 4 in micro-batches of 1: one process accumulates 4, each of two processes accumulates 2 without
    synchronising the first (no_backward_sync) and normalises by the token count of all 4, so both take the same
    steps (up to float rounding). The two-process run is then resumed on one process (--devices is not part of
    the recipe: a step's examples do not depend on the number of processes) and still matches."""
    one, two = tmp_path / "one", tmp_path / "two"
    T.main(args(tiny, one, "--micro-batch", "1", "--max-steps", "4"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"),
                           *args(tiny, two, "--micro-batch", "1", "--max-steps", "3", "--devices", "2",
                                 "--strategy", "ddp")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens/s" in proc.stdout
    assert json.loads((one / "config.json").read_text())["accumulation_steps"] == 4
    config = json.loads((two / "config.json").read_text())
    assert config["world_size"] == 2 and config["accumulation_steps"] == 2
    losses = lambda out: [float(x) for x in train_losses(out)]
    np.testing.assert_allclose(losses(two), losses(one)[:3], rtol=1e-5)
    T.main(args(tiny, two, "--resume", "--max-steps", "4"))  # step 4 on one process
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    a, b = load_adapter(one / "last.safetensors"), load_adapter(two / "last.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_a_step_cuts_its_examples_into_micro_batches_of_similar_length(tiny):
    """The step takes the same examples as before (the next batch_size of the epoch's order, this process's
    slice), but its micro-batches group similar lengths, so less of each is padding."""
    ds = P.PreparedDataset(tiny["data"], "train")
    order = T.epoch_order(len(ds), 1337, 0)
    for rank, world in ((0, 1), (1, 2)):
        micro = T.step_micro_batches(ds, order, 0, 4, 2, rank, world)
        per_rank = 4 // world
        taken = order[rank * per_rank:(rank + 1) * per_rank]
        lengths = sorted(len(ds.entries[i]["ids"]) for i in taken)
        got = sorted(m["id"] for b in micro for m in b["meta"])
        assert got == sorted(ds.entries[i]["id"] for i in taken)  # the same examples
        real = [b["n_tokens"] for b in micro]
        assert real == [sum(lengths[j: j + 2]) for j in range(0, len(lengths), 2)]  # shortest first, in pairs


def test_dev_loss_over_length_sorted_micro_batches_is_the_literal_mean(tiny):
    """dev_loss groups the dev examples by length (less padding); its sum and count are still those of every
    response token of the split, one example at a time over full logits."""
    from lightning_fabric import Fabric

    dev = P.PreparedDataset(tiny["data"], "dev")
    model = tiny_model(tiny).eval()
    run = argparse.Namespace(micro_batch_size=2, no_whisper=False)
    with torch.no_grad():
        total, n = T.dev_loss(Fabric(accelerator="cpu", devices=1), model, dev, run)
        expected = literal_losses(model, [dev[i] for i in range(len(dev))])
    assert int(n) == len(expected)
    torch.testing.assert_close(total / n, expected.mean(), rtol=1e-5, atol=1e-6)


def test_cpu_default_precision_follows_the_measured_matmul_speed(monkeypatch):
    monkeypatch.setattr(T, "cpu_bf16_is_faster", lambda: True)
    assert T.resolve_precision(None, "cpu") == "bf16"
    monkeypatch.setattr(T, "cpu_bf16_is_faster", lambda: False)
    assert T.resolve_precision(None, "cpu") == "32-true"
    assert T.resolve_precision("32", "cpu") == "32-true" and T.resolve_precision("bf16", "cpu") == "bf16"


def test_run_settings_keep_the_names_that_run_folders_record():
    """--resume reads config.json's "run" object: the Run fields are the keys every run folder has recorded (in
    this order), so folders written before Run existed resume; the adapter flags set WLConfig's fields."""
    recorded = ["data", "llm", "whisper", "adapter", "out", "variant", "kv_layout", "prompt_length", "start_layer",
                "no_whisper", "random_audio", "random_init", "trim_audio", "no_mask", "learning_rate", "min_lr",
                "weight_decay", "batch_size", "micro_batch_size", "epochs", "max_steps", "patience", "eval_every",
                "dev_limit", "seed", "resume", "overwrite", "accelerator", "devices", "num_nodes", "strategy",
                "precision", "threads", "argv", "hypotheses", "provenance"]
    assert list(vars(T.Run())) == recorded
    assert set(T.RECIPE) == {"data", "llm", "whisper", "variant", "kv_layout", "prompt_length", "start_layer",
                             "no_whisper", "random_audio", "random_init", "no_mask", "trim_audio", "adapter",
                             "learning_rate", "min_lr", "weight_decay", "batch_size", "epochs", "patience",
                             "dev_limit", "eval_every", "seed"}
    run = T.Run(variant="S", kv_layout="paper", prompt_length=40, start_layer=3, no_whisper=True, random_audio=True,
                random_init=True, trim_audio=True)
    assert T.adapter_settings(run) == dict(variant="S", kv_layout="paper", adapter_prompt_length=40,
                                           adapter_start_layer=3, use_whisper=False, random_audio=True,
                                           identity_init=False, trim_audio=True)
    assert (T.flag("learning_rate"), T.flag("batch_size"), T.flag("micro_batch_size"), T.flag("no_whisper")) == \
        ("--lr", "--batch", "--micro-batch", "--no-whisper")

