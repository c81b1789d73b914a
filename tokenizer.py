"""Tokenizers: the LLM's (SentencePiece or byte-level BPE) and Whisper's (byte-level BPE), in one file.

Two classes with one job each:

  Tokenizer          the LLM side. encode(text, bos, eos) -> LongTensor, decode(ids) -> str.
  WhisperTokenizer   Whisper's GPT-2/multilingual BPE plus its special tokens (<|startoftranscript|>,
                     languages, tasks, <|notimestamps|>, timestamps), laid out as openai-whisper does.

The file formats they read
--------------------------
* SentencePiece `tokenizer.model` (LLaMA-1/2, TinyLlama): a serialised `ModelProto` protobuf. The
  `sentencepiece` library runs it; we only add bos/eos handling. A GGUF file of such a model
  (tokenizer.ggml.model "llama") stores the pieces, scores and types; we rebuild the proto from them
  (`sentencepiece_proto_from_gguf`).

* tiktoken text file (LLaMA-3's `tokenizer.model`, openai-whisper's `gpt2.tiktoken` /
  `multilingual.tiktoken`): one line per token, "<base64 of the token's bytes> <rank>". The rank is both
  the token id and the merge priority: byte-level BPE repeatedly merges the adjacent pair of byte
  strings whose concatenation has the lowest rank. Special tokens are not in the file; LLaMA-3 puts
  256 of them right after the 128000 ordinary tokens (see `llama3_special_tokens`), Whisper puts its
  own after the GPT-2 vocabulary (see `whisper_special_tokens`). SentencePiece protos and tiktoken
  files share the name `tokenizer.model`; `_is_tiktoken_file` tells them apart by content.

* GPT-2-style vocab + merges, either in a GGUF file (`tokenizer.ggml.tokens`, `.merges`, `.token_type`,
  `.bos_token_id`, `.eos_token_id`, `.pre`) or in a Hugging Face `tokenizer.json` (model.type "BPE",
  byte-level, with `tokenizer_config.json` naming bos/eos). Tokens are written in GPT-2's
  `bytes_to_unicode` alphabet (every byte mapped to a printable character, e.g. space -> "Ġ"), and
  merges are pairs "a b" in priority order. We turn them into tiktoken's rank table: when merge order
  equals token-id order (true for GPT-2, Whisper and SmolLM2) the ids are the ranks; otherwise ranks are
  assigned from the merge list and mapped back to ids after encoding (`_ByteBPE`). Two more details
  make tiktoken agree with Hugging Face's BPE exactly: a piece that is itself a token is returned whole
  by tiktoken (true of the original too when every token is its own merges' product, which the tests
  check for SmolLM2), and a byte missing from the vocab is dropped before the merges (`_ByteBPE.encode`).

Pre-tokenisation (the regex that cuts text into pieces before BPE) decides the ids as much as the
merges do, so each format's exact pattern is below: GPT-2's, LLaMA-3's, and SmolLM2's. SmolLM2's
Hugging Face pre-tokeniser is a *sequence*: split every digit off on its own, then apply GPT-2's regex to
each piece. One regex reproduces it only if whitespace directly before a digit stays one piece
(`\\s+(?=\\p{N})` ahead of `\\s+(?!\\S)`), because inside a piece that whitespace ended the string.

Special tokens of the LLM (<|im_start|>, <|eot_id|>, ...) are matched in the text and encoded as
single ids (chat templates rely on this). Whisper's are never matched in text: a transcript is text.
"""
from __future__ import annotations

import base64
import json
import re
import struct
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tiktoken
import torch

from storage import ProjectError, write_atomic


class TokenizerError(ProjectError, ValueError):
    """A tokenizer file that is missing, unreadable or of a kind we do not support."""


# ----------------------------------------------------------------------------------------------------
# Pre-tokenisation patterns (tiktoken / fancy-regex syntax)

# GPT-2 (and Whisper): contractions, letters, numbers, other symbols, each optionally with one leading
# space; trailing whitespace is kept apart from the next word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# LLaMA-3 (Meta's tokenizer.py): case-insensitive contractions, up to 3 digits per piece, newlines apart.
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# SmolLM2 (HF: Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]): GPT-2's regex with
# every digit its own piece. `\s+(?=\p{N})` keeps whitespace before a digit whole, as it is when it
# ends a piece in the two-step original (there `\s+(?!\S)` matches it up to the end of the piece).
DIGITS_GPT2_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
)

# GGUF `tokenizer.ggml.pre` names (llama.cpp's) -> pattern.
GGUF_PRE_PATTERNS = {
    "gpt2": GPT2_PATTERN,
    "default": GPT2_PATTERN,
    "smollm": DIGITS_GPT2_PATTERN,
    "llama3": LLAMA3_PATTERN,
    "llama-v3": LLAMA3_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
}


# ----------------------------------------------------------------------------------------------------
# GPT-2's byte <-> printable-character alphabet

@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map byte -> printable character used to write byte-level tokens as text.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) map, in byte order,
    to the characters U+0100, U+0101, ... so that e.g. b" " -> "Ġ" and b"\\n" -> "Ċ".
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=None)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_bytes(token: str) -> bytes:
    """A vocab entry written in the bytes_to_unicode alphabet -> the raw bytes it stands for."""
    table = _unicode_to_byte()
    try:
        return bytes(table[c] for c in token)
    except KeyError as e:
        raise TokenizerError(f"token {token!r} is not written in GPT-2's byte-level alphabet") from e


def bytes_to_token(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


# ----------------------------------------------------------------------------------------------------
# Reading files

def read_tiktoken_file(path: str | Path) -> dict[bytes, int]:
    """A tiktoken BPE file (lines "<base64 token> <rank>") -> {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise TokenizerError(f"{path}:{lineno}: not a tiktoken line ('<base64> <rank>')") from e
    if not ranks:
        raise TokenizerError(f"{path}: empty tiktoken file")
    return ranks


def _is_tiktoken_file(path: Path) -> bool:
    """tiktoken text vs SentencePiece protobuf: the first line of a tiktoken file is '<base64> <int>'."""
    with open(path, "rb") as f:
        head = f.read(512)
    first = head.split(b"\n", 1)[0].strip()
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ [0-9]+", first) is not None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e


def _gguf_fields(path: str | Path) -> dict:
    """The tokenizer.* metadata of a GGUF file as plain Python values (lists, ints, strings, ...).

    GGUF (llama.cpp's format, little-endian): b"GGUF", u32 version (2 or 3), u64 tensor count, u64
    key/value count, then the key/value pairs: key (u64 length + UTF-8), u32 value type, value. Strings
    are u64 length + bytes; arrays are u32 element type + u64 count + elements. Only this header is read
    (the `gguf` package parses the whole file with numpy memmaps, which takes seconds for a 50k vocab).
    """
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"no such file: {path}")
    try:
        with open(path, "rb") as f:
            return _read_gguf_metadata(f, prefix="tokenizer.")
    except (struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise TokenizerError(f"{path}: truncated or corrupt GGUF header ({type(e).__name__})") from None
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _read_gguf_metadata(f, prefix: str = "") -> dict:
    def read(fmt):
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise struct.error("unexpected end of file")
        return struct.unpack(fmt, data)[0]

    def read_string():
        n = read("<Q")
        data = f.read(n)
        if len(data) != n:
            raise struct.error("unexpected end of file")
        return data.decode("utf-8")

    def read_value(vtype):
        if vtype == _GGUF_STRING:
            return read_string()
        if vtype == _GGUF_ARRAY:
            etype, n = read("<I"), read("<Q")
            if etype in _GGUF_SCALARS:  # one bulk read for numeric arrays (token types, scores)
                fmt = _GGUF_SCALARS[etype]
                data = f.read(n * struct.calcsize(fmt))
                if len(data) != n * struct.calcsize(fmt):
                    raise struct.error("unexpected end of file")
                return np.frombuffer(data, dtype=np.dtype(fmt)).tolist()
            return [read_value(etype) for _ in range(n)]
        if vtype not in _GGUF_SCALARS:
            raise TokenizerError(f"unknown GGUF value type {vtype}")
        return read(_GGUF_SCALARS[vtype])

    if f.read(4) != b"GGUF":
        raise TokenizerError("not a GGUF file (bad magic)")
    version = read("<I")
    if version not in (2, 3):
        raise TokenizerError(f"GGUF version {version} is not supported (2 or 3; big-endian files are not)")
    read("<Q")  # tensor count
    fields = {}
    for _ in range(read("<Q")):
        key = read_string()
        value = read_value(read("<I"))
        if key.startswith(prefix):
            fields[key] = value
    return fields


# ----------------------------------------------------------------------------------------------------
# Byte-level BPE on tiktoken, with ids that need not equal ranks

class _ByteBPE:
    """tiktoken.Encoding plus the bookkeeping to speak in the vocab's own ids.

    vocab:    {token bytes: id} of the ordinary tokens (specials excluded).
    merges:   [(a, b), ...] in priority order, or None when the ids already are the ranks (tiktoken files).
    specials: {text: id} of the special tokens.
    """

    def __init__(self, name: str, pattern: str, vocab: dict[bytes, int], merges: list[tuple[bytes, bytes]] | None,
                 specials: dict[str, int]):
        # Some vocabs lack a few bytes (SmolLM2: 21 control / never-valid-UTF-8 bytes). Hugging Face's BPE
        # drops such a byte from its piece and merges across the gap; tiktoken would fail on it, so text
        # holding one takes the slower path in `encode`.
        self.missing = frozenset(b for b in range(256) if bytes([b]) not in vocab)
        if len(self.missing) > 128:
            raise TokenizerError(f"{name}: lacks {len(self.missing)} of the 256 bytes: not a byte-level BPE vocab")
        self.pattern = pattern
        self.vocab_size = max([*vocab.values(), *specials.values()]) + 1
        self.specials = dict(specials)
        ranks, rank_to_id = _ranks_from_merges(vocab, merges, specials)
        special_ranks = dict(specials) if rank_to_id is None else {s: len(ranks) + i for i, s in enumerate(specials)}
        if rank_to_id is not None:
            rank_to_id = np.concatenate([rank_to_id, np.array(list(specials.values()), dtype=np.int64)])
        self.rank_to_id = rank_to_id
        self.special_ranks = special_ranks
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_ranks)
        # id -> bytes for decoding (holes in the id space decode to nothing)
        self.id_to_bytes = [b""] * self.vocab_size
        for b, i in vocab.items():
            self.id_to_bytes[i] = b
        for s, i in specials.items():
            self.id_to_bytes[i] = s.encode("utf-8")

    def encode(self, text: str, allow_special: bool) -> list[int]:
        if self.missing and not self.missing.isdisjoint(text.encode("utf-8", errors="replace")):
            ids = self._encode_dropping_missing_bytes(text, allow_special)
        else:
            ids = self.enc.encode(text, allowed_special="all") if allow_special else self.enc.encode_ordinary(text)
        if self.rank_to_id is not None:
            ids = self.rank_to_id[ids].tolist()
        return ids

    def _encode_dropping_missing_bytes(self, text: str, allow_special: bool) -> list[int]:
        """tiktoken's steps done one by one (special tokens, regex pieces, BPE of each piece) so that the
        bytes missing from the vocab can be removed from each piece before its BPE. Returns ranks."""
        import regex  # tiktoken's own dependency

        specials = sorted(self.special_ranks, key=len, reverse=True) if allow_special else []
        parts = regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text) if specials else [text]
        ranks: list[int] = []
        for k, part in enumerate(parts):
            if k % 2 == 1:  # a special token (the split's captured group)
                ranks.append(self.special_ranks[part])
                continue
            for piece in regex.findall(self.pattern, part):
                data = bytes(b for b in piece.encode("utf-8", errors="replace") if b not in self.missing)
                if data:
                    ranks.extend(self.enc._encode_single_piece(data))
        return ranks

    def decode_bytes(self, ids: list[int]) -> bytes:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} out of range [0, {self.vocab_size})")
        return b"".join(self.id_to_bytes[i] for i in ids)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _ranks_from_merges(vocab: dict[bytes, int], merges: list[tuple[bytes, bytes]] | None,
                       specials: dict[str, int]) -> tuple[dict[bytes, int], np.ndarray | None]:
    """tiktoken's rank table for a vocab + merge list: (ranks, rank_to_id or None when rank == id).

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; a merge list says the
    same with the pair's position. They agree when the token made by merge i has a smaller rank than
    the one made by merge j > i. If the ids already are in that order (GPT-2, Whisper, SmolLM2: the
    trainer numbered tokens as it created them) they serve as ranks. Otherwise: the 256 single bytes
    first, then each merge's product in merge order; a multi-byte token that no merge makes can never
    come out of the original BPE, so it gets no rank (it still decodes).
    """
    if merges is None:
        return dict(vocab), None
    products: list[bytes] = []
    seen: set[bytes] = set()
    for a, b in merges:
        t = a + b
        if t not in vocab or a not in vocab or b not in vocab:
            raise TokenizerError(f"merge {bytes_to_token(a)!r} + {bytes_to_token(b)!r} makes a token not in the vocab")
        if t not in seen:  # a second merge making the same token: tiktoken keeps the first's priority
            seen.add(t)
            products.append(t)
    ids = np.array([vocab[t] for t in products], dtype=np.int64)
    singles = [bytes([b]) for b in range(256) if bytes([b]) in vocab]
    reachable = len(products) + sum(1 for s in singles if s not in seen)
    in_order = bool(np.all(ids[1:] > ids[:-1])) and (len(ids) == 0 or ids[0] > max(vocab[s] for s in singles))
    if in_order and reachable == len(vocab) and not (set(specials.values()) & set(vocab.values())):
        return dict(vocab), None
    ranks = {s: r for r, s in enumerate(sorted(singles, key=lambda s: vocab[s]))}
    for t in products:
        if t not in ranks:
            ranks[t] = len(ranks)
    rank_to_id = np.empty(len(ranks), dtype=np.int64)
    for t, r in ranks.items():
        rank_to_id[r] = vocab[t]
    return ranks, rank_to_id


def _split_merge(line: str | Sequence[str]) -> tuple[bytes, bytes]:
    """A merge "a b" (or ["a", "b"], the newer tokenizer.json form) -> (bytes of a, bytes of b)."""
    parts = line.split(" ") if isinstance(line, str) else list(line)
    if len(parts) != 2:
        raise TokenizerError(f"bad merge entry {line!r}")
    return token_to_bytes(parts[0]), token_to_bytes(parts[1])


# ----------------------------------------------------------------------------------------------------
# The LLM tokenizer

def llama3_special_tokens(n_base: int = 128000, version: str = "3") -> dict[str, int]:
    """Meta's 256 LLaMA-3 special tokens, numbered from n_base (the size of the ordinary vocab).

    version "3": LLaMA-3's tokenizer.py; "3.1": LLaMA-3.1/3.2/3.3's, which names a few reserved slots
    (<|finetune_right_pad_id|>, <|eom_id|>, <|python_tag|>, ...). The ids that matter (begin/end of
    text, headers, <|eot_id|>) are the same in both.
    """
    n_reserved = 256
    if version == "3":
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        names += [f"<|reserved_special_token_{i}|>" for i in range(5, n_reserved - 5)]
    elif version == "3.1":
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        names += [f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved - len(names))]
    else:
        raise TokenizerError(f"unknown LLaMA-3 special-token layout {version!r} (3 or 3.1)")
    return {name: n_base + i for i, name in enumerate(names)}


class Tokenizer:
    """The LLM's tokenizer: SentencePiece (LLaMA-1/2) or byte-level BPE on tiktoken (LLaMA-3, SmolLM2, ...).

    Build it with `from_dir` (a checkpoint folder) or `from_file` (tokenizer.model, tokenizer.json or
    a .gguf); each format has its own constructor below.

    add_bos says whether the original tokenizer puts BOS in front by default (SentencePiece LLaMA and
    LLaMA-3: yes; SmolLM2: no, its "BOS" <|im_start|> opens chat turns). `encode` still does what its
    `bos` argument says; add_bos is for callers that want the original's behaviour.
    """

    def __init__(self, *, sp=None, bpe: _ByteBPE | None = None, bos_id: int | None, eos_id: int | None,
                 add_bos: bool = True, name: str = ""):
        assert (sp is None) != (bpe is None), "exactly one backend"
        self.sp, self.bpe = sp, bpe
        self.bos_id, self.eos_id, self.add_bos, self.name = bos_id, eos_id, add_bos, name
        self.vocab_size = sp.vocab_size() if sp is not None else bpe.vocab_size
        for what, i in (("bos", bos_id), ("eos", eos_id)):
            if i is not None and not 0 <= i < self.vocab_size:
                raise TokenizerError(f"{name}: {what} id {i} outside the vocab [0, {self.vocab_size})")

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer in a checkpoint folder: tokenizer.model, else tokenizer.json, else a single .gguf."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"no such directory: {path}")
        if (path / "tokenizer.model").is_file() and _is_tiktoken_file(path / "tokenizer.model"):
            # LLaMA-3.1+ renamed a few reserved special tokens; the checkpoint's config name tells which
            config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
            layout = "3.1" if re.search(r"3\.[1-9]", str(config.get("name", ""))) else "3"
            return cls.from_tiktoken_model(path / "tokenizer.model", special_layout=layout)
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return cls.from_file(path / name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return cls.from_file(ggufs[0])
        raise TokenizerError(f"{path}: no tokenizer.model, tokenizer.json or single .gguf file")

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Detect the kind of file and load it (see the module docstring for the formats)."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"no such file: {path}")
        if path.suffix == ".gguf":
            return cls.from_gguf(path)
        if path.suffix == ".json":
            return cls.from_tokenizer_json(path)
        if _is_tiktoken_file(path):
            return cls.from_tiktoken_model(path)
        return cls.from_sentencepiece(path)

    @classmethod
    def from_sentencepiece(cls, path: str | Path) -> "Tokenizer":
        """LLaMA-1/2's tokenizer.model (a SentencePiece ModelProto)."""
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: neither a SentencePiece model nor a tiktoken file ({e})") from None
        bos, eos = sp.bos_id(), sp.eos_id()
        return cls(sp=sp, bos_id=bos if bos >= 0 else None, eos_id=eos if eos >= 0 else None, name=str(path))

    @classmethod
    def from_tiktoken_model(cls, path: str | Path, special_layout: str = "3") -> "Tokenizer":
        """LLaMA-3's tokenizer.model: a tiktoken rank file, LLaMA-3's regex, Meta's 256 special tokens."""
        ranks = read_tiktoken_file(path)
        specials = llama3_special_tokens(len(ranks), special_layout)
        bpe = _ByteBPE(str(path), LLAMA3_PATTERN, ranks, None, specials)
        return cls(bpe=bpe, bos_id=specials["<|begin_of_text|>"], eos_id=specials["<|end_of_text|>"], name=str(path))

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer stored in a GGUF file's metadata: tokenizer.ggml.model "gpt2" (byte-level BPE) or
        "llama" (SentencePiece pieces + scores)."""
        fields = _gguf_fields(path)
        kind = fields.get("tokenizer.ggml.model")
        if kind == "llama":  # a SentencePiece vocab (LLaMA-1/2, TinyLlama): rebuild the model proto
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor()
            try:
                sp.LoadFromSerializedProto(sentencepiece_proto_from_gguf(fields, path))
            except RuntimeError as e:
                raise TokenizerError(f"{path}: the SentencePiece vocab in this GGUF is not valid ({e})") from None
            return cls(sp=sp, bos_id=fields.get("tokenizer.ggml.bos_token_id"),
                       eos_id=fields.get("tokenizer.ggml.eos_token_id"),
                       add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", True)), name=str(path))
        if kind != "gpt2":
            raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported ('gpt2' or 'llama')")
        vocab, merges, specials, pattern = _gguf_bpe(fields, path)
        return cls(bpe=_ByteBPE(str(path), pattern, vocab, merges, specials),
                   bos_id=fields.get("tokenizer.ggml.bos_token_id"), eos_id=fields.get("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)), name=str(path))

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, config_path: str | Path | None = None) -> "Tokenizer":
        """A Hugging Face byte-level BPE tokenizer.json; bos/eos come from tokenizer_config.json beside it."""
        path = Path(path)
        vocab, merges, specials, pattern = _read_hf_bpe(path)
        config_path = Path(config_path) if config_path else path.with_name("tokenizer_config.json")
        config = _read_json(config_path) if config_path.is_file() else {}

        def special_id(key):
            tok = config.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok  # AddedToken form: {"content": ...}
            if tok is None:
                return None
            if tok not in specials:
                raise TokenizerError(f"{config_path}: {key} {tok!r} is not an added token of {path}")
            return specials[tok]

        bos = special_id("bos_token")
        return cls(bpe=_ByteBPE(str(path), pattern, vocab, merges, specials),
                   bos_id=bos, eos_id=special_id("eos_token"),
                   add_bos=bool(config.get("add_bos_token", False)) and bos is not None, name=str(path))

    # -- use -----------------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False, max_length: int = -1,
               special: bool = True) -> torch.Tensor:
        """text -> 1-D LongTensor of ids. special=True: special-token strings in the text (e.g. "<|im_end|>")
        become their single ids, as a chat template needs; special=False: the text is ordinary characters,
        as data text (transcripts, hypotheses) must be. max_length > 0 truncates the result (after bos/eos are
        added)."""
        if self.sp is not None:
            ids = self.sp.encode(text)  # SentencePiece never reads control tokens out of text
        else:
            ids = self.bpe.encode(text, allow_special=special)
        if bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.name}: this tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        if eos:
            if self.eos_id is None:
                raise TokenizerError(f"{self.name}: this tokenizer has no EOS token")
            ids = [*ids, self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """ids (tensor or list) -> text. BPE special tokens come out as their text (e.g. "<|im_end|>");
        SentencePiece drops its control tokens (<s>, </s>), as sentencepiece does."""
        ids = _as_int_list(ids)
        if self.sp is not None:
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise TokenizerError(f"token id {bad[0]} out of range [0, {self.vocab_size})")
            return self.sp.decode(ids)
        return self.bpe.decode(ids)

    def token_to_id(self, token: str) -> int:
        """The id of a special token ("<|im_end|>", "</s>") or of the token whose text is `token`
        (e.g. " Paris"); TokenizerError if it is not a single token."""
        if self.sp is not None:
            i = self.sp.piece_to_id(token.replace(" ", "\u2581"))  # SentencePiece writes spaces as ▁
            if i != self.sp.unk_id() or token == self.sp.id_to_piece(i):
                return i
        elif token in self.bpe.specials:
            return self.bpe.specials[token]
        else:
            ids = self.bpe.encode(token, allow_special=False)
            if len(ids) == 1 and self.bpe.id_to_bytes[ids[0]] == token.encode("utf-8"):
                return ids[0]
        raise TokenizerError(f"{token!r} is not a single token of {self.name}")


# GGUF token types (llama.cpp's numbering, the same as SentencePiece's piece types)
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6


def _gguf_bpe(fields: dict, path) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]], dict[str, int], str]:
    """GGUF tokenizer metadata -> (ordinary vocab {bytes: id}, merges, specials {text: id}, pattern)."""
    tokens = fields.get("tokenizer.ggml.tokens")
    merges = fields.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise TokenizerError(f"{path}: GGUF lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types = fields.get("tokenizer.ggml.token_type") or [GGUF_NORMAL] * len(tokens)
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_PATTERNS:
        raise TokenizerError(f"{path}: pre-tokeniser {pre!r} is not supported (known: {', '.join(GGUF_PRE_PATTERNS)})")
    # control and user-defined tokens are matched whole in the text; the others are BPE vocabulary
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (GGUF_CONTROL, GGUF_USER_DEFINED)}
    vocab = {token_to_bytes(t): i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == GGUF_NORMAL}
    return vocab, [_split_merge(m) for m in merges], specials, GGUF_PRE_PATTERNS[pre]


def gguf_to_tokenizer_json(gguf_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the tokenizer of a GGUF file into out_dir as the files its original release had; returns
    the paths written. It is how a converted GGUF checkpoint carries its tokenizer.

    Byte-level BPE ("gpt2"): Hugging Face `tokenizer.json` (vocab, merges, special tokens as added
    tokens, the matching pre-tokeniser) + `tokenizer_config.json` (bos/eos, chat template); it loads in
    `tokenizers` and in `Tokenizer.from_dir`. SentencePiece ("llama"): `tokenizer.model` (the rebuilt
    SentencePiece proto) + `tokenizer_config.json`.
    """
    fields = _gguf_fields(gguf_path)
    kind = fields.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise TokenizerError(f"{gguf_path}: GGUF tokenizer model {kind!r} is not supported ('gpt2' or 'llama')")
    tokens = fields.get("tokenizer.ggml.tokens") or []
    config = {"tokenizer_class": "PreTrainedTokenizerFast" if kind == "gpt2" else "LlamaTokenizer",
              "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama"))}
    for key in ("bos", "eos", "unknown", "padding"):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            config[{"unknown": "unk_token", "padding": "pad_token"}.get(key, f"{key}_token")] = tokens[i]
    if fields.get("tokenizer.chat_template"):
        config["chat_template"] = fields["tokenizer.chat_template"]
    out_dir = Path(out_dir)
    if kind == "llama":  # SentencePiece: the model proto is the tokenizer file LLaMA-1/2 ship
        written = [out_dir / "tokenizer.model", out_dir / "tokenizer_config.json"]
        write_atomic(written[0], sentencepiece_proto_from_gguf(fields, gguf_path))
        write_atomic(written[1], json.dumps(config, ensure_ascii=False, indent=2))
        return written

    _, _, specials, pattern = _gguf_bpe(fields, gguf_path)  # validates the vocab and the pre-tokeniser

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pattern == GPT2_PATTERN:
        pre_tokenizer = byte_level
    elif pattern == DIGITS_GPT2_PATTERN:
        digits = {"type": "Digits", "individual_digits": True}
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    else:  # LLaMA-3 style: split with the regex, then only map bytes to the alphabet
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False}]}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for t, i in sorted(specials.items(), key=lambda x: x[1])],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(fields["tokenizer.ggml.merges"])},
    }
    written = [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"]
    write_atomic(written[0], json.dumps(tokenizer_json, ensure_ascii=False))
    write_atomic(written[1], json.dumps(config, ensure_ascii=False, indent=2))
    return written


def sentencepiece_proto_from_gguf(fields: dict, path="GGUF") -> bytes:
    """A GGUF "llama" vocab (pieces, scores, types) -> a serialised SentencePiece ModelProto.

    llama.cpp copies LLaMA's tokenizer.model into GGUF piece by piece; its token types use
    SentencePiece's numbering. The proto is written by hand (protobuf wire format: each field is a
    varint key = field_number << 3 | wire_type, then a varint, a 4-byte float or a length-prefixed blob)
    to avoid a protobuf dependency. Fields, from sentencepiece_model.proto:
      ModelProto:     1 pieces (repeated: 1 piece, 2 score, 3 type), 2 trainer_spec, 3 normalizer_spec
      TrainerSpec:    3 model_type (2 = BPE), 4 vocab_size, 35 byte_fallback, 40/41/42 unk/bos/eos id,
                      45/46/47 unk/bos/eos piece
      NormalizerSpec: 1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces
    LLaMA's normaliser is the identity plus "prepend a space, write spaces as ▁", as here.
    """
    tokens, scores = fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.scores")
    if not tokens or scores is None or len(scores) != len(tokens):
        raise TokenizerError(f"{path}: a SentencePiece GGUF needs tokenizer.ggml.tokens and .scores of equal length")
    types = fields.get("tokenizer.ggml.token_type") or [GGUF_NORMAL] * len(tokens)
    if types.count(GGUF_UNKNOWN) != 1:
        raise TokenizerError(f"{path}: a SentencePiece vocab needs exactly one unknown token, "
                             f"found {types.count(GGUF_UNKNOWN)}")

    def varint(n: int) -> bytes:
        n &= (1 << 64) - 1  # negative int32s are sign-extended to 64 bits
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def field(num: int, value) -> bytes:
        if isinstance(value, float):
            return varint(num << 3 | 5) + struct.pack("<f", value)
        if isinstance(value, (bool, int)):
            return varint(num << 3 | 0) + varint(int(value))
        data = value.encode("utf-8") if isinstance(value, str) else value
        return varint(num << 3 | 2) + varint(len(data)) + data

    pieces = b"".join(field(1, field(1, t) + field(2, float(sc)) + field(3, ty))
                      for t, sc, ty in zip(tokens, scores, types))
    trainer = field(3, 2) + field(4, len(tokens)) + field(35, GGUF_BYTE in types)
    ids = {"unk": types.index(GGUF_UNKNOWN), "bos": fields.get("tokenizer.ggml.bos_token_id", -1),
           "eos": fields.get("tokenizer.ggml.eos_token_id", -1)}
    for k, (name, i) in enumerate(ids.items()):
        trainer += field(40 + k, i)
        if 0 <= i < len(tokens):
            trainer += field(45 + k, tokens[i])
    normalizer = (field(1, "identity") + field(3, bool(fields.get("tokenizer.ggml.add_space_prefix", True)))
                  + field(4, False) + field(5, True))
    return pieces + field(2, trainer) + field(3, normalizer)


# ----------------------------------------------------------------------------------------------------
# Whisper

# openai-whisper's language codes in token order (99 for v1/v2; large-v3 adds "yue" as the 100th).
WHISPER_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg "
    "lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so "
    "af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue"
).split()
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> in 0.02 s steps


def whisper_special_tokens(n_base: int, num_languages: int = 99) -> dict[str, int]:
    """openai-whisper's special tokens, numbered from n_base (the size of the ordinary vocab)."""
    names = ["<|endoftext|>", "<|startoftranscript|>", *[f"<|{c}|>" for c in WHISPER_LANGUAGES[:num_languages]],
             "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
             "<|notimestamps|>", *[f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)]]
    return {name: n_base + i for i, name in enumerate(names)}


class WhisperTokenizer:
    """Whisper's tokenizer: byte-level BPE (GPT-2's vocab for `.en` models, the multilingual one otherwise)
    and the special tokens that steer decoding.

    Build it with `from_dir`, `from_tokenizer_json` or `from_tiktoken`. For a multilingual model the
    start-of-transcript sequence is (sot, language, task) with language "en" and task "transcribe"
    unless given; for an English-only model it is just (sot,).
    """

    def __init__(self, vocab: dict[bytes, int], merges: list[tuple[bytes, bytes]] | None, specials: dict[str, int],
                 multilingual: bool | None = None, language: str | None = None, task: str | None = None):
        self.bpe = _ByteBPE("whisper", GPT2_PATTERN, vocab, merges, specials)
        sp = specials
        try:
            self.eot = sp["<|endoftext|>"]
            self.sot = sp["<|startoftranscript|>"]
            self.translate = sp["<|translate|>"]
            self.transcribe = sp["<|transcribe|>"]
            self.sot_lm = sp["<|startoflm|>"]
            self.sot_prev = sp["<|startofprev|>"]
            # older vocabularies (v1/v2, and HF's files for them) call <|nospeech|> <|nocaptions|>
            self.no_speech = sp["<|nospeech|>"] if "<|nospeech|>" in sp else sp["<|nocaptions|>"]
            self.no_timestamps = sp["<|notimestamps|>"]
            self.timestamp_begin = sp["<|0.00|>"]
        except KeyError as e:
            raise TokenizerError(f"Whisper vocabulary lacks the special token {e.args[0]}") from None
        # The layout every Whisper checkpoint assumes: sot, languages..., translate, transcribe, startoflm,
        # startofprev, nospeech, notimestamps, 1501 timestamps, all consecutive.
        by_id = {i: s for s, i in sp.items()}
        self.all_language_tokens = tuple(range(self.sot + 1, self.translate))
        self.all_language_codes = tuple(by_id.get(i, "")[2:-2] for i in self.all_language_tokens)
        layout = [self.sot == self.eot + 1, self.transcribe == self.translate + 1, self.sot_lm == self.translate + 2,
                  self.sot_prev == self.translate + 3, self.no_speech == self.translate + 4,
                  self.no_timestamps == self.translate + 5, self.timestamp_begin == self.translate + 6,
                  all(by_id.get(i, "").startswith("<|") for i in self.all_language_tokens),
                  sp.get("<|30.00|>") == self.timestamp_begin + N_TIMESTAMPS - 1]
        if not all(layout):
            raise TokenizerError("Whisper special tokens are not laid out as openai-whisper's (sot, languages, ...)")
        self.vocab_size = self.bpe.vocab_size  # the decoder's n_vocab: 51864 for .en, 51865 (51866 for v3) otherwise
        # openai-whisper's rule: a model is multilingual iff n_vocab >= 51865
        self.is_multilingual = self.vocab_size >= 51865 if multilingual is None else multilingual
        if self.is_multilingual:
            language, task = language or "en", task or "transcribe"
        elif language not in (None, "en") or task not in (None, "transcribe"):
            raise TokenizerError("an English-only Whisper model takes no language or task other than en/transcribe")
        else:
            language = task = None
        if task not in (None, "transcribe", "translate"):
            raise TokenizerError(f"unknown task {task!r} (transcribe or translate)")
        self.language, self.task = language, task
        seq = [self.sot]
        if language is not None:
            seq.append(self.to_language_token(language))
        if task is not None:
            seq.append(self.transcribe if task == "transcribe" else self.translate)
        self.sot_sequence = tuple(seq)

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, num_languages: int | None = None, **kwargs) -> "WhisperTokenizer":
        """A Hugging Face `tokenizer.json` (shipped beside HF and CTranslate2 Whisper models). The file lists
        the language tokens itself; num_languages, if given, is checked against it."""
        vocab, merges, specials, _ = _read_hf_bpe(Path(path))
        if "<|0.00|>" not in specials:  # HF's files for v1/v2 leave the timestamps out; they follow the last special
            start = max(specials.values()) + 1
            specials.update({f"<|{i * 0.02:.2f}|>": start + i for i in range(N_TIMESTAMPS)})
        tok = cls(vocab, merges, specials, **kwargs)
        if num_languages is not None and len(tok.all_language_tokens) != num_languages:
            raise TokenizerError(f"{path} has {len(tok.all_language_tokens)} languages, not {num_languages}")
        return tok

    @classmethod
    def from_tiktoken(cls, path: str | Path, num_languages: int = 99, **kwargs) -> "WhisperTokenizer":
        """openai-whisper's `gpt2.tiktoken` (English-only models) or `multilingual.tiktoken`."""
        ranks = read_tiktoken_file(path)
        return cls(ranks, None, whisper_special_tokens(len(ranks), num_languages), **kwargs)

    @classmethod
    def from_dir(cls, path: str | Path, **kwargs) -> "WhisperTokenizer":
        """The tokenizer beside a Whisper model: `tokenizer.json`, else a `*.tiktoken` file. With a
        tiktoken file the number of languages comes from `num_languages` or from config.json's vocab size."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(path / "tokenizer.json", **kwargs)
        found = sorted(path.glob("*.tiktoken"))
        if len(found) == 1:
            if "num_languages" not in kwargs and (path / "config.json").is_file():
                n_vocab = _config_n_vocab(_read_json(path / "config.json"))
                if n_vocab is not None:
                    kwargs["num_languages"] = n_vocab - len(read_tiktoken_file(found[0])) - 8 - N_TIMESTAMPS
            return cls.from_tiktoken(found[0], **kwargs)
        if not path.is_dir():
            raise TokenizerError(f"no such directory: {path}")
        raise TokenizerError(f"{path}: expected tokenizer.json or one *.tiktoken file for the Whisper tokenizer")

    # -- use -----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Special-token strings in the text are encoded as ordinary text."""
        return self.bpe.encode(text, allow_special=False)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """ids -> text, dropping timestamp tokens (as openai-whisper's decode does)."""
        ids = _as_int_list(ids)
        return self.bpe.decode([i for i in ids if i < self.timestamp_begin])

    def decode_with_timestamps(self, ids: Iterable[int] | torch.Tensor) -> str:
        """ids -> text with timestamp tokens written as <|1.08|>."""
        return self.bpe.decode(_as_int_list(ids))

    def to_language_token(self, language: str) -> int:
        aliases = {"he": "iw", "iw": "he"}  # HF's files spell Hebrew with its old code
        for code in (language, aliases.get(language)):
            if code in self.all_language_codes:
                return self.all_language_tokens[self.all_language_codes.index(code)]
        raise TokenizerError(f"language {language!r} is not in this Whisper vocabulary")

    @property
    def sot_sequence_including_notimestamps(self) -> tuple[int, ...]:
        return (*self.sot_sequence, self.no_timestamps)

    @cached_property
    def non_speech_tokens(self) -> list[int]:
        """Tokens of symbols that are not speech, which Whisper suppresses while sampling (openai-whisper's
        set): brackets, quotes, music notes, ... alone or after a space, but not ones that could start a
        word; plus " -" and " '" (a dash or quote after a space is not spoken either)."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        notes = set("♩♪♫♬♭♮♯")  # the music-note family, U+2669..U+266F
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(notes):
            for ids in (self.encode(symbol), self.encode(" " + symbol)):
                # a symbol that takes several tokens is kept only if it is a note: its first token is
                # a byte prefix shared by all notes, so suppressing it cannot cut a word short
                if len(ids) == 1 or symbol in notes:
                    result.add(ids[0])
        return sorted(result)


def _config_n_vocab(config: dict) -> int | None:
    for c in (config, config.get("dims", {})):
        for key in ("n_vocab", "vocab_size"):
            if isinstance(c.get(key), int):
                return c[key]
    return None


def _as_int_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    if isinstance(ids, np.ndarray):
        return ids.reshape(-1).tolist()
    return [int(i) for i in ids]


# ----------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (byte-level BPE)

def _read_hf_bpe(path: Path) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]], dict[str, int], str]:
    """tokenizer.json -> (ordinary vocab {bytes: id}, merges, specials {text: id}, pre-tokenisation pattern)."""
    if not path.is_file():
        raise TokenizerError(f"no such file: {path}")
    j = _read_json(path)
    model = j.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{path}: not a BPE tokenizer.json (model.type={model.get('type')!r})")
    if j.get("normalizer"):
        raise TokenizerError(f"{path}: normalizer {j['normalizer'].get('type')!r} is not supported "
                             "(byte-level BPE has none)")
    pattern = _hf_pre_tokenizer_pattern(j.get("pre_tokenizer"), path)
    specials = {t["content"]: t["id"] for t in j.get("added_tokens", [])}
    special_ids = set(specials.values())
    vocab = {token_to_bytes(t): i for t, i in model["vocab"].items() if i not in special_ids and t not in specials}
    merges = [_split_merge(m) for m in model.get("merges", [])]
    return vocab, merges, specials, pattern


def _hf_pre_tokenizer_pattern(pre: dict | None, path: Path) -> str:
    """The single tiktoken regex equivalent to a tokenizer.json pre_tokenizer we understand."""
    def is_byte_level(p, use_regex):
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and p.get("use_regex", True) == use_regex)

    pre = pre or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and is_byte_level(steps[0], True):
        return GPT2_PATTERN
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and is_byte_level(steps[1], True)):
        return DIGITS_GPT2_PATTERN
    if (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {})
            and steps[0].get("behavior") == "Isolated" and is_byte_level(steps[1], False)):
        return steps[0]["pattern"]["Regex"]  # LLaMA-3's tokenizer.json: its regex, then bytes -> alphabet
    raise TokenizerError(f"{path}: unsupported pre_tokenizer {json.dumps(pre)[:200]}")
