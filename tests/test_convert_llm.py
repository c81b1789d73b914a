"""LLM checkpoint converters on synthetic files built here from random tiny models.

Each test writes a checkpoint in a foreign format from a model whose logits we know, converts it, and
checks that the converted model reproduces them. The foreign layouts are written here from their
definitions, independently of convert_checkpoint.py:
  - Meta: fairscale tensor parallelism (column-parallel layers split rows, row-parallel split columns);
  - Hugging Face: the q/k row permutation of HF's convert_llama_weights_to_hf.py, checked here against a
    forward pass with HF's rotate-half RoPE;
  - GGUF: quantised blocks decoded by literal ports of ggml's reference dequantisers (ggml-quants.c).
The real SmolLM2 GGUF is checked in test_generate_llm.py.
"""
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import convert_checkpoint as cc
from convert_checkpoint import ConversionError
from model import Config, LLaMA

ROOT = Path(__file__).resolve().parents[1]


def random_model(config: Config, seed: int = 0) -> LLaMA:
    torch.manual_seed(seed)
    model = LLaMA(config).eval()
    with torch.no_grad():  # norms away from 1 so a swapped or missing norm shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm_1.weight") or name.endswith("norm_2.weight") or name == "transformer.ln_f.weight":
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def logits_of(model, ids=(3, 1, 4, 1, 5, 9, 2, 6)):
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0]


def meta_state(model: LLaMA) -> dict:
    """Our weights under Meta's names: qkv split back into wq/wk/wv (rows [q heads; k groups; v groups])."""
    c = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"tok_embeddings.weight": sd["transformer.wte.weight"], "norm.weight": sd["transformer.ln_f.weight"]}
    if not c.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layer):
        h, m = f"transformer.h.{i}.", f"layers.{i}."
        q, k, v = sd[h + "attn.qkv.weight"].split(
            (c.n_head * c.head_size, c.n_query_groups * c.head_size, c.n_query_groups * c.head_size))
        out |= {m + "attention.wq.weight": q, m + "attention.wk.weight": k, m + "attention.wv.weight": v,
                m + "attention.wo.weight": sd[h + "attn.proj.weight"],
                m + "feed_forward.w1.weight": sd[h + "mlp.fc_1.weight"],
                m + "feed_forward.w3.weight": sd[h + "mlp.fc_2.weight"],
                m + "feed_forward.w2.weight": sd[h + "mlp.proj.weight"],
                m + "attention_norm.weight": sd[h + "norm_1.weight"], m + "ffn_norm.weight": sd[h + "norm_2.weight"]}
    return out


def ours_from_meta(meta: dict, c: Config) -> dict:
    """Meta names → our names (the reference for GGUF tests, where weights change through quantisation)."""
    out = {"transformer.wte.weight": meta["tok_embeddings.weight"], "transformer.ln_f.weight": meta["norm.weight"]}
    if "output.weight" in meta:
        out["lm_head.weight"] = meta["output.weight"]
    for i in range(c.n_layer):
        h, m = f"transformer.h.{i}.", f"layers.{i}."
        out |= {h + "attn.qkv.weight": torch.cat([meta[m + f"attention.w{x}.weight"] for x in "qkv"]),
                h + "attn.proj.weight": meta[m + "attention.wo.weight"],
                h + "mlp.fc_1.weight": meta[m + "feed_forward.w1.weight"],
                h + "mlp.fc_2.weight": meta[m + "feed_forward.w3.weight"],
                h + "mlp.proj.weight": meta[m + "feed_forward.w2.weight"],
                h + "norm_1.weight": meta[m + "attention_norm.weight"],
                h + "norm_2.weight": meta[m + "ffn_norm.weight"]}
    return out


def model_with(state: dict, c: Config) -> LLaMA:
    model = LLaMA(c).eval()
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=not c.tie_embeddings)
    return model


# ========================================================================================================
# Meta consolidated.*.pth
# ========================================================================================================

@pytest.mark.parametrize("dim, multiple_of, mult, expected", [
    (4096, 256, None, 11008),    # LLaMA-7B / LLaMA-2-7B
    (5120, 256, None, 13824),    # 13B
    (6656, 256, None, 17920),    # LLaMA-30B
    (8192, 256, None, 22016),    # LLaMA-65B
    (8192, 4096, 1.3, 28672),    # LLaMA-2-70B
    (4096, 1024, 1.3, 14336),    # LLaMA-3-8B
])
def test_meta_intermediate_size_matches_released_models(dim, multiple_of, mult, expected):
    assert cc.meta_intermediate_size(dim, multiple_of, mult) == expected


def write_meta(folder: Path, model: LLaMA, n_shards: int, vocab_split: bool, params: dict):
    """Meta's release layout, split as fairscale's tensor-parallel layers split it."""
    folder.mkdir(parents=True)
    sd = meta_state(model)
    column = ("wq", "wk", "wv", "w1", "w3", "output")  # ColumnParallelLinear: output rows split
    row = ("wo", "w2")  # RowParallelLinear: input columns split
    shards = [{} for _ in range(n_shards)]
    for name, w in sd.items():
        kind = name.split(".")[-2]
        if kind in column:
            parts = w.chunk(n_shards, dim=0)
        elif kind in row:
            parts = w.chunk(n_shards, dim=1)
        elif kind == "tok_embeddings":  # VocabParallelEmbedding (LLaMA-3) or ParallelEmbedding (1/2)
            parts = w.chunk(n_shards, dim=0 if vocab_split else 1)
        else:  # norms: replicated
            parts = [w] * n_shards
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))


TINY_PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=64,
                   ffn_dim_multiplier=0.75, norm_eps=1e-5)  # 2/3·4·64 = 170 → ·0.75 = 127 → 128


@pytest.mark.parametrize("style", ["llama-2", "llama-3"])
def test_meta_sharded_checkpoint_reproduces_logits(tmp_path, style):
    rope = 500000.0 if style == "llama-3" else 10000.0
    config = Config.from_name("tiny", rope_base=rope, norm_eps=1e-5)
    model = random_model(config)
    src = tmp_path / "meta" / "7B"
    write_meta(src, model, n_shards=2, vocab_split=style == "llama-3",
               params={**TINY_PARAMS, **({"rope_theta": rope} if style == "llama-3" else {})})
    # LLaMA-1/2 downloads keep tokenizer.model beside the size folders; LLaMA-3 inside.
    tok = (src if style == "llama-3" else src.parent) / "tokenizer.model"
    tok.write_bytes(b"\x0a\x0bnot-a-real-sentencepiece-model")

    out = cc.convert_llm(src, tmp_path / "out")
    converted = LLaMA.from_checkpoint(out)
    c = converted.config
    shape = (c.n_layer, c.n_head, c.n_query_groups, c.n_embd, c.intermediate_size, c.vocab_size)
    assert shape == (2, 4, 2, 64, 128, 512)
    assert c.rope_base == rope and not c.tie_embeddings
    torch.testing.assert_close(logits_of(converted), logits_of(model), rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()


def test_meta_vocab_size_minus_one_comes_from_the_embedding(tmp_path):
    model = random_model(Config.from_name("tiny", norm_eps=1e-5))
    write_meta(tmp_path / "m", model, 1, False, {**TINY_PARAMS, "vocab_size": -1})  # as LLaMA-1's params.json
    converted = LLaMA.from_checkpoint(cc.convert_meta(tmp_path / "m", tmp_path / "out"))
    assert converted.config.vocab_size == 512
    torch.testing.assert_close(logits_of(converted), logits_of(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, match", [
    (dict(n_layers=3), r"lacks tensor 'layers\.2\.attention_norm\.weight'"),
    (dict(dim=128), r"wte\.weight has shape \(512, 64\) but the config implies \(512, 128\)"),
    (dict(n_kv_heads=4), r"qkv\.weight has shape \(128, 64\) but the config implies \(192, 64\)"),
    (dict(multiple_of=256), r"fc_1\.weight has shape \(128, 64\) but the config implies \(256, 64\)"),
])
def test_meta_params_contradicting_the_weights_is_an_error(tmp_path, change, match):
    model = random_model(Config.from_name("tiny", norm_eps=1e-5))
    write_meta(tmp_path / "m", model, 2, False, {**TINY_PARAMS, **change})
    with pytest.raises(ConversionError, match=match):
        cc.convert_meta(tmp_path / "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_meta_truncated_shard_is_an_error(tmp_path):
    model = random_model(Config.from_name("tiny", norm_eps=1e-5))
    write_meta(tmp_path / "m", model, 2, False, TINY_PARAMS)
    shard = tmp_path / "m" / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ConversionError, match="consolidated.01.pth"):
        cc.convert_meta(tmp_path / "m", tmp_path / "out")


# ========================================================================================================
# Hugging Face folders
# ========================================================================================================

def hf_permute(w: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.py, verbatim in effect: Meta's interleaved q/k rows →
    the half-split rows HF's rotate_half RoPE expects."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_state(model: LLaMA) -> dict:
    c, meta = model.config, meta_state(model)
    kv_dim = c.n_query_groups * c.head_size
    sd = {"model.embed_tokens.weight": meta["tok_embeddings.weight"], "model.norm.weight": meta["norm.weight"]}
    if not c.tie_embeddings:
        sd["lm_head.weight"] = meta["output.weight"]
    for i in range(c.n_layer):
        m, p = f"layers.{i}.", f"model.layers.{i}."
        wq, wk = meta[m + "attention.wq.weight"], meta[m + "attention.wk.weight"]
        sd |= {p + "self_attn.q_proj.weight": hf_permute(wq, c.n_head, c.n_embd, c.n_embd),
               p + "self_attn.k_proj.weight": hf_permute(wk, c.n_query_groups, kv_dim, c.n_embd),
               p + "self_attn.v_proj.weight": meta[m + "attention.wv.weight"],
               p + "self_attn.o_proj.weight": meta[m + "attention.wo.weight"],
               p + "mlp.gate_proj.weight": meta[m + "feed_forward.w1.weight"],
               p + "mlp.up_proj.weight": meta[m + "feed_forward.w3.weight"],
               p + "mlp.down_proj.weight": meta[m + "feed_forward.w2.weight"],
               p + "input_layernorm.weight": meta[m + "attention_norm.weight"],
               p + "post_attention_layernorm.weight": meta[m + "ffn_norm.weight"]}
    return {k: v.contiguous() for k, v in sd.items()}


def hf_style_logits(sd: dict, c: Config, ids) -> torch.Tensor:
    """HF LlamaForCausalLM's math on HF-layout weights: rotate_half RoPE pairs dimension i with i + D/2,
    and repeat_kv gives query head h the key/value head h // (H/G)."""
    T, D, H, G = len(ids), c.head_size, c.n_head, c.n_query_groups
    inv_freq = 1.0 / (c.rope_base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().float(), emb.sin().float()

    def rotate_half(x):
        return torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    x = sd["model.embed_tokens.weight"][list(ids)]
    for i in range(c.n_layer):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(T, H, D).transpose(0, 1)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(T, G, D).transpose(0, 1)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(T, G, D).transpose(0, 1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(H // G, dim=0), v.repeat_interleave(H // G, dim=0)
        att = (q @ k.transpose(1, 2)) / math.sqrt(D) + torch.triu(torch.full((T, T), float("-inf")), 1)
        y = (att.softmax(-1) @ v).transpose(0, 1).reshape(T, H * D)
        x = x + y @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return rms(x, sd["model.norm.weight"]) @ head.T


def hf_config_json(c: Config) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=c.n_embd,
                intermediate_size=c.intermediate_size, num_attention_heads=c.n_head,
                num_hidden_layers=c.n_layer, num_key_value_heads=c.n_query_groups, rms_norm_eps=c.norm_eps,
                rope_theta=c.rope_base, vocab_size=c.vocab_size, max_position_embeddings=c.block_size,
                tie_word_embeddings=c.tie_embeddings, torch_dtype="float32")


def write_hf(folder: Path, model: LLaMA, fmt: str):
    folder.mkdir(parents=True)
    sd = hf_state(model)
    (folder / "config.json").write_text(json.dumps(hf_config_json(model.config)))
    (folder / "tokenizer.json").write_text('{"model": "placeholder"}')
    (folder / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    if fmt == "safetensors":
        save_file(sd, str(folder / "model.safetensors"))
    elif fmt == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:  # sharded safetensors with the index transformers writes
        names = sorted(sd)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in halves.items():
            save_file({k: sd[k] for k in keys}, str(folder / file))
        index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return sd


def test_hf_permutation_fixture_is_hf_math():
    """Guard for the fixture itself: HF-layout weights under HF's RoPE give the original logits."""
    model = random_model(Config.from_name("tiny"))
    torch.testing.assert_close(hf_style_logits(hf_state(model), model.config, (3, 1, 4, 1, 5, 9, 2, 6)),
                               logits_of(model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt, tied", [("safetensors", False), ("sharded", False), ("bin", False),
                                       ("safetensors", True)])
def test_hf_folder_reproduces_logits(tmp_path, fmt, tied):
    model = random_model(Config.from_name("tiny", tie_embeddings=tied))
    write_hf(tmp_path / "hf", model, fmt)
    out = cc.convert_llm(tmp_path / "hf", tmp_path / "out")
    converted = LLaMA.from_checkpoint(out)
    assert converted.config.tie_embeddings == tied
    torch.testing.assert_close(logits_of(converted), logits_of(model), rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()
    assert (out / "tokenizer_config.json").is_file()


def test_hf_bfloat16_is_kept_or_cast(tmp_path):
    """bf16 weights are kept as they are or cast to float32 exactly, through the HF q/k un-permutation: the
    logits equal the original model's (in bf16, and on the same values in float32)."""
    model = random_model(Config.from_name("tiny")).to(torch.bfloat16)
    write_hf(tmp_path / "hf", model, "safetensors")
    kept = LLaMA.from_checkpoint(cc.convert_hf_llama(tmp_path / "hf", tmp_path / "a"))
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits_of(kept), logits_of(model), atol=0, rtol=0)
    cast = LLaMA.from_checkpoint(cc.convert_hf_llama(tmp_path / "hf", tmp_path / "b", dtype="float32"))
    assert {p.dtype for p in cast.parameters()} == {torch.float32}
    torch.testing.assert_close(logits_of(cast), logits_of(model.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt, match", [("safetensors", r"model.safetensors: a safetensors file cut short \(\d+ of"),
                                        ("bin", "pytorch_model.bin: a zip archive cut short or damaged")])
def test_hf_truncated_weights_are_an_error(tmp_path, fmt, match):
    write_hf(tmp_path / "hf", random_model(Config.from_name("tiny")), fmt)
    path = tmp_path / "hf" / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(ConversionError, match=match):
        cc.convert_hf_llama(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, match", [
    (dict(hidden_size=128), r"wte\.weight has shape \(512, 64\) but the config implies \(512, 128\)"),
    (dict(num_hidden_layers=1), r"9 tensors its config does not explain \(first: 'layers\.1\.attention_norm"),
    (dict(intermediate_size=96), r"fc_1\.weight has shape \(128, 64\) but the config implies \(96, 64\)"),
    (dict(num_key_value_heads=4), r"qkv\.weight has shape \(128, 64\) but the config implies \(192, 64\)"),
    (dict(model_type="gpt2"), "model_type 'gpt2' is not a LLaMA model"),
])
def test_hf_config_contradicting_the_weights_is_an_error(tmp_path, change, match):
    write_hf(tmp_path / "hf", random_model(Config.from_name("tiny")), "safetensors")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConversionError, match=match):
        cc.convert_hf_llama(tmp_path / "hf", tmp_path / "out")


# ========================================================================================================
# GGUF
# ========================================================================================================
# Literal ports of ggml's reference dequantisers (dequantize_row_* in ggml-quants.c), one block at a time.

def _f16(b: np.ndarray) -> float:
    return float(b[:2].copy().view(np.float16)[0])


def decode_q8_0(b):  # d (f16) | 32 × int8
    return _f16(b[0:2]) * b[2:34].view(np.int8).astype(np.float64)


def decode_q4_0(b):  # d | 16 bytes: value j is the low nibble of byte j, value j + 16 the high nibble; minus 8
    q = b[2:18].astype(np.int64)
    return _f16(b[0:2]) * (np.concatenate([q & 0xF, q >> 4]) - 8)


def decode_q4_1(b):  # d | m | 16 bytes of nibbles as Q4_0, unsigned: d·q + m
    q = b[4:20].astype(np.int64)
    return _f16(b[0:2]) * np.concatenate([q & 0xF, q >> 4]) + _f16(b[2:4])


def decode_q4_k(b):  # d | dmin | 12 bytes of 6-bit scales and mins for 8 sub-blocks | 128 bytes of nibbles
    d, dmin, sc, qs = _f16(b[0:2]), _f16(b[2:4]), b[4:16].astype(np.int64), b[16:144].astype(np.int64)

    def scale_min(j):  # get_scale_min_k4
        if j < 4:
            return sc[j] & 63, sc[j + 4] & 63
        return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

    out = []
    for j in range(4):  # each 32 bytes give 64 values: 32 low nibbles (sub-block 2j), then 32 high (2j+1)
        q = qs[32 * j:32 * j + 32]
        (s1, m1), (s2, m2) = scale_min(2 * j), scale_min(2 * j + 1)
        out += [d * s1 * (q & 0xF) - dmin * m1, d * s2 * (q >> 4) - dmin * m2]
    return np.concatenate(out)


def decode_q6_k(b):  # ql 128 bytes (low 4 bits) | qh 64 bytes (high 2 bits) | 16 int8 scales | d
    ql, qh = b[0:128].astype(np.int64), b[128:192].astype(np.int64)
    sc, d = b[192:208].view(np.int8).astype(np.int64), _f16(b[208:210])
    y = np.empty(256)
    l = np.arange(32)
    for n in range(2):  # two halves of 128 values
        L, Hh, S = ql[64 * n:64 * n + 64], qh[32 * n:32 * n + 32], sc[8 * n:8 * n + 8]
        s = l // 16
        q1 = ((L[l] & 0xF) | (((Hh >> 0) & 3) << 4)) - 32
        q2 = ((L[l + 32] & 0xF) | (((Hh >> 2) & 3) << 4)) - 32
        q3 = ((L[l] >> 4) | (((Hh >> 4) & 3) << 4)) - 32
        q4 = ((L[l + 32] >> 4) | (((Hh >> 6) & 3) << 4)) - 32
        y[128 * n + l] = d * S[s] * q1
        y[128 * n + l + 32] = d * S[s + 2] * q2
        y[128 * n + l + 64] = d * S[s + 4] * q3
        y[128 * n + l + 96] = d * S[s + 6] * q4
    return y


DECODERS = {"Q8_0": (decode_q8_0, 32, 34), "Q4_0": (decode_q4_0, 32, 18), "Q4_1": (decode_q4_1, 32, 20),
            "Q4_K": (decode_q4_k, 256, 144), "Q6_K": (decode_q6_k, 256, 210)}


def decode_rows(data: np.ndarray, qtype: str) -> torch.Tensor:
    decode, block, size = DECODERS[qtype]
    rows = [np.concatenate([decode(row[i:i + size]) for i in range(0, row.size, size)]) for row in data]
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def random_k_blocks(rows: int, cols: int, qtype: str, rng) -> np.ndarray:
    """Random bytes for K-quant blocks (the gguf package cannot quantise to them) with sane fp16 scales."""
    _, block, size = DECODERS[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scales = (rng.uniform(0.5, 1.0, size=(rows, cols // block, 2)) * 2e-4).astype(np.float16).view(np.uint8)
    if qtype == "Q4_K":
        data[..., 0:4] = scales.reshape(rows, cols // block, 4)  # d, dmin
    else:
        data[..., 208:210] = scales[..., :2]  # d
    return data.reshape(rows, -1)


def encode_tensor(w: torch.Tensor, qtype: str, rng):
    """(bytes or array to write, GGML type, the values a reader must get back), decoded literally."""
    import gguf

    Q = gguf.GGMLQuantizationType
    a = w.numpy().astype(np.float32)
    if qtype == "F32" or w.dim() == 1:  # norms stay F32, as llama.cpp writes them
        return a, None, torch.from_numpy(a.copy())
    if qtype == "F16":
        h = a.astype(np.float16)
        return h, None, torch.from_numpy(h.astype(np.float32))
    if qtype == "BF16":
        raw = gguf.quants.quantize(a, Q.BF16)  # uint8, 2 bytes per value
        back = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # bf16 is float32's top half
        return raw, Q.BF16, torch.from_numpy(back.copy())
    if qtype in ("Q4_K", "Q6_K"):
        raw = random_k_blocks(a.shape[0], a.shape[1], qtype, rng)
    else:
        raw = gguf.quants.quantize(a, getattr(Q, qtype))
    return raw, getattr(Q, qtype), decode_rows(raw, qtype)


GGUF_TO_META_NAMES = {"attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
                      "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
                      "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2"}


def tiny_bpe_vocab(n: int):
    """A valid byte-level BPE vocab of n tokens: 2 control tokens, the 256 bytes, then letter-pair merges."""
    from tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>"] + [alphabet[b] for b in range(256)]
    merges = [f"{a} {b}" for a, b in itertools.islice(itertools.product("abcdefgh", repeat=2), n - len(tokens))]
    tokens += [m.replace(" ", "") for m in merges]
    return tokens, [3, 3] + [1] * (n - 2), merges


def write_gguf(path: Path, model: LLaMA, qtype: str, rng=None, meta_changes=(), extra_tensors=()):
    """A llama.cpp-style GGUF of `model`; returns the Meta-named weights a reader must recover."""
    import gguf

    rng = rng or np.random.default_rng(0)
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    meta = dict(block_count=c.n_layer, context_length=c.block_size, embedding_length=c.n_embd,
                feed_forward_length=c.intermediate_size, head_count=c.n_head, head_count_kv=c.n_query_groups,
                rope_freq_base=c.rope_base, layer_norm_rms_eps=c.norm_eps, rope_dimension_count=c.head_size)
    meta.update(dict(meta_changes))
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    tokens, types, merges = tiny_bpe_vocab(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    sd = meta_state(model)
    expected = {}
    gguf_names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                  "output.weight": "output.weight"}
    for i in range(c.n_layer):
        gguf_names |= {f"layers.{i}.{m}.weight": f"blk.{i}.{g}.weight" for g, m in GGUF_TO_META_NAMES.items()}
    for meta_name, tensor in sd.items():
        data, raw_dtype, back = encode_tensor(tensor, qtype, rng)
        w.add_tensor(gguf_names[meta_name], data, raw_dtype=raw_dtype)
        expected[meta_name] = back
    for name, array in extra_tensors:
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


# Block-256 types need rows whose length is a multiple of 256: n_embd and intermediate_size are 256.
GGUF_CONFIG = dict(block_size=128, vocab_size=300, n_layer=2, n_head=4, n_embd=256, n_query_groups=2,
                   intermediate_size=256, rope_base=10000.0, norm_eps=1e-5)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_gguf_weights_equal_the_dequantised_originals(tmp_path, qtype):
    tied = qtype in ("F32", "Q4_1")  # llama.cpp omits output.weight for tied models
    config = Config(name="t", tie_embeddings=tied, **GGUF_CONFIG)
    model = random_model(config)
    expected = write_gguf(tmp_path / "m.gguf", model, qtype)
    out = cc.convert_llm(tmp_path / "m.gguf", tmp_path / "out")

    converted = LLaMA.from_checkpoint(out)
    c = converted.config
    assert {k: getattr(c, k) for k in GGUF_CONFIG} == GGUF_CONFIG
    assert c.tie_embeddings == tied
    reference = ours_from_meta(expected, config)
    for name, tensor in converted.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    if qtype == "F32":  # nothing lost: the converted model is the original
        torch.testing.assert_close(logits_of(converted), logits_of(model), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_of(converted), logits_of(model_with(reference, config)), rtol=1e-4, atol=1e-4)
    assert (out / "tokenizer.json").is_file()


def test_gguf_quantised_model_stays_close_to_the_original(tmp_path):
    """Q8_0 loses little: its logits stay near the float model's (a check that no block is misplaced)."""
    config = Config(name="t", **GGUF_CONFIG)
    model = random_model(config)
    write_gguf(tmp_path / "m.gguf", model, "Q8_0")
    converted = LLaMA.from_checkpoint(cc.convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))
    ours, ref = logits_of(converted), logits_of(model)
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()


def test_gguf_rope_freqs_table_becomes_llama31_scaling(tmp_path):
    config = Config(name="t", **{**GGUF_CONFIG, "rope_base": 500000.0})
    D = config.head_size
    # Meta's apply_scaling (LLaMA-3.1, factor 8): llama.cpp stores freq / scaled_freq per frequency.
    freqs = 1.0 / (500000.0 ** (np.arange(0, D, 2) / D))
    table = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            scaled = f
        elif wavelen > 8192 / 1:
            scaled = f / 8
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            scaled = (1 - smooth) * f / 8 + smooth * f
        table.append(f / scaled)
    write_gguf(tmp_path / "m.gguf", random_model(config), "F32",
               extra_tensors=[("rope_freqs.weight", np.array(table, dtype=np.float32))])
    out = cc.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.01])
def test_gguf_truncated_file_is_an_error(tmp_path, keep):
    write_gguf(tmp_path / "m.gguf", random_model(Config(name="t", **GGUF_CONFIG)), "Q8_0")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ConversionError, match="m.gguf: not a readable GGUF file"):
        cc.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, match", [
    (dict(head_count_kv=4), r"qkv\.weight has shape \(512, 256\) but the config implies \(768, 256\)"),
    (dict(block_count=3), r"lacks tensor 'layers\.2\.attention_norm\.weight'"),
    (dict(feed_forward_length=512), r"fc_1\.weight has shape \(256, 256\) but the config implies \(512, 256\)"),
    (dict(rope_dimension_count=32), "rope.dimension_count = 32 differs from n_embd/n_head = 64"),
])
def test_gguf_metadata_contradicting_the_tensors_is_an_error(tmp_path, change, match):
    write_gguf(tmp_path / "m.gguf", random_model(Config(name="t", **GGUF_CONFIG)), "F16", meta_changes=change)
    with pytest.raises(ConversionError, match=match):
        cc.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


# ========================================================================================================
# Format detection, lazy default, command line
# ========================================================================================================

def test_unknown_sources_are_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConversionError, match="not a GGUF"):
        cc.convert_llm(tmp_path / "notes.txt", tmp_path / "out")
    with pytest.raises(ConversionError, match="not found"):
        cc.convert_llm(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="neither"):
        cc.convert_llm(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConversionError, match="no converted checkpoint"):
        cc.ensure_llm(tmp_path / "empty")


def test_cli_converts_and_reports_bad_files_in_one_line(tmp_path):
    model = random_model(Config.from_name("tiny"))
    write_hf(tmp_path / "hf", model, "safetensors")
    ok = subprocess.run([sys.executable, str(ROOT / "convert_checkpoint.py"), "llm", "--source", str(tmp_path / "hf"),
                         "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    torch.testing.assert_close(logits_of(LLaMA.from_checkpoint(tmp_path / "out")), logits_of(model),
                               rtol=1e-5, atol=1e-5)

    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    bad = subprocess.run([sys.executable, str(ROOT / "convert_checkpoint.py"), "llm", "--source",
                          str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "out2")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
