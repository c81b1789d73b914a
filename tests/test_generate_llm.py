"""The embedded SmolLM2-135M-Instruct, converted from its GGUF: real-weight checks of the converter and of
generate.py.

Oracles: known answers of the real model (" Paris.", "The answer to this classic math problem is 4."), and a
literal numpy forward pass of the GGUF file written here (dequantised by the `gguf` package, then plain loops for
RMSNorm, interleaved RoPE, grouped-query attention and SwiGLU), which checks the converter's tensor layout, not
just the text.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import convert_checkpoint
import generate
from model import LLaMA

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2_dir(embedded_llm_dir):
    """The embedded default converted by the current converter (conftest.py: once per session)."""
    return embedded_llm_dir


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return generate.load_llm(smollm2_dir)


# --------------------------------------------------------------------------------------------------------
# Literal numpy forward of the GGUF file
# --------------------------------------------------------------------------------------------------------

def gguf_weights(path):
    """name -> float32 array with rows first. GGUF lists dims fastest-first: shape [ne0, ne1] is a
    matrix of ne1 rows of ne0 values."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    meta = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("llama.")}
    weights = {}
    for t in reader.tensors:  # float32 here (half the memory); the forward computes in float64
        weights[t.name] = dequantize(t.data, t.tensor_type).reshape([int(n) for n in t.shape][::-1])
    return weights, meta


def numpy_forward(weights, meta, ids):
    """Logits (T, vocab) for token ids, written as literally as possible, in float64."""
    n_layer, n_head = meta["llama.block_count"], meta["llama.attention.head_count"]
    n_kv, eps, base = meta["llama.attention.head_count_kv"], meta["llama.attention.layer_norm_rms_epsilon"], \
        meta["llama.rope.freq_base"]
    x = weights["token_embd.weight"][ids].astype(np.float64)  # (T, C)
    T, C = x.shape
    D = C // n_head

    def rmsnorm(v, w):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * w

    def rope(v):  # v (T, D): rotate each adjacent pair (2i, 2i+1) by angle pos * base^(-2i/D)
        out = np.empty_like(v)
        for pos in range(T):
            for i in range(D // 2):
                angle = pos * base ** (-2 * i / D)
                a, b = v[pos, 2 * i], v[pos, 2 * i + 1]
                out[pos, 2 * i] = a * np.cos(angle) - b * np.sin(angle)
                out[pos, 2 * i + 1] = a * np.sin(angle) + b * np.cos(angle)
        return out

    for layer in range(n_layer):
        w = {k[len(f"blk.{layer}."):]: v for k, v in weights.items() if k.startswith(f"blk.{layer}.")}
        h = rmsnorm(x, w["attn_norm.weight"])
        q, k, v = h @ w["attn_q.weight"].T, h @ w["attn_k.weight"].T, h @ w["attn_v.weight"].T
        heads = []
        for head in range(n_head):
            group = head // (n_head // n_kv)  # query heads share key/value groups in order
            qh = rope(q[:, head * D:(head + 1) * D])
            kh = rope(k[:, group * D:(group + 1) * D])
            vh = v[:, group * D:(group + 1) * D]
            scores = qh @ kh.T / np.sqrt(D)
            scores[np.triu(np.ones((T, T), dtype=bool), k=1)] = -np.inf  # causal
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            heads.append(p @ vh)
        x = x + np.concatenate(heads, axis=-1) @ w["attn_output.weight"].T
        h = rmsnorm(x, w["ffn_norm.weight"])
        gate, up = h @ w["ffn_gate.weight"].T, h @ w["ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w["ffn_down.weight"].T
    out = weights.get("output.weight", weights["token_embd.weight"])  # tied when absent
    return rmsnorm(x, weights["output_norm.weight"]) @ out.T


def test_converted_logits_match_literal_numpy_forward_of_the_gguf(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer.encode("The capital of France is", bos=False).tolist()
    weights, meta = gguf_weights(convert_checkpoint.smollm2_gguf_path())
    expected = numpy_forward(weights, meta, np.array(ids))
    with torch.inference_mode():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    rel = np.abs(ours - expected).max() / np.abs(expected).max()
    assert rel < 1e-3, rel
    assert (ours.argmax(-1) == expected.argmax(-1)).all()


# --------------------------------------------------------------------------------------------------------
# Known answers of the real model
# --------------------------------------------------------------------------------------------------------

def greedy_text(model, tokenizer, text, max_new_tokens, fmt=None):
    ids = tokenizer.encode(text, bos=tokenizer.add_bos)
    out = generate.generate(model, ids, max_new_tokens, temperature=0, eos_id=generate.stop_ids(tokenizer, fmt))
    return generate.continuation(tokenizer, ids, out)


def test_greedy_continuation_is_paris(smollm2):
    model, tokenizer = smollm2
    assert greedy_text(model, tokenizer, "The capital of France is", 4) == " Paris.\n\n"


# The model's exact greedy answer with SmolLM2's default system turn (its chat template adds it when none is given)
CHAT_ANSWER = "The answer to this classic math problem is 4."


def test_chat_answer_is_exact_and_stops_at_the_end_of_the_turn(smollm2):
    model, tokenizer = smollm2
    prompt = generate.chat_prompt("What is 2+2?", "chatml")
    assert greedy_text(model, tokenizer, prompt, 30, fmt="chatml") == CHAT_ANSWER  # 11 tokens, then <|im_end|>


def test_bfloat16_weights_give_the_same_greedy_answers(smollm2_dir):
    """generate.py --dtype bfloat16: the whole model in bf16."""
    model, tokenizer = generate.load_llm(smollm2_dir, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert greedy_text(model, tokenizer, "The capital of France is", 4) == " Paris.\n\n"


@pytest.mark.slow
def test_generate_cli_plain_and_chat(smollm2_dir):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint-dir", str(smollm2_dir), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)

    plain = run("--prompt", "The capital of France is", "--max-new-tokens", "3")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith(" Paris")
    chat = run("--prompt", "What is 2+2?", "--chat", "--max-new-tokens", "30")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == CHAT_ANSWER + "\n"


def test_generate_cli_errors_are_one_line(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint-dir", str(tmp_path),
                          "--prompt", "hello"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 1
    assert res.stderr.startswith("error:") and "Traceback" not in res.stderr


# --------------------------------------------------------------------------------------------------------
# Sampling (no weights needed)
# --------------------------------------------------------------------------------------------------------

def test_sample_top_k_never_leaves_the_top_k():
    torch.manual_seed(0)
    logits = torch.randn(100)
    top = set(torch.topk(logits, 5).indices.tolist())
    drawn = {int(generate.sample(logits, temperature=2.0, top_k=5)) for _ in range(300)}
    assert drawn <= top and len(drawn) > 1


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.5, None), (2.0, None), (2.0, 3)])
def test_sample_matches_softmax_frequencies(temperature, top_k):
    """Frequencies of 6000 draws against softmax(logits / T) over the top-k (the standard error of each is at most
    0.0065; T = 1 and T = 2 differ by up to 0.16 here)."""
    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    draws = torch.stack([generate.sample(logits, temperature=temperature, top_k=top_k) for _ in range(6000)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    kept = logits if top_k is None else logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    assert torch.allclose(freq, torch.softmax(kept / temperature, -1), atol=0.03), freq


def test_kv_cache_loop_equals_greedy_full_forwards():
    """The cached loop (prefill, then one token per step) must pick exactly the tokens that a full
    forward over the growing sequence picks."""
    from model import Config

    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny")).eval()
    ids = torch.tensor([5, 17, 42, 7])
    out = generate.generate(model, ids, 12, temperature=0)
    seq = ids.tolist()
    with torch.inference_mode():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out.tolist() == seq


def test_generate_stops_at_eos_and_respects_max_new_tokens():
    from model import Config

    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny")).eval()
    ids = torch.tensor([1, 2, 3])
    out = generate.generate(model, ids, 5, temperature=0)
    assert len(out) == 8 and out[:3].tolist() == [1, 2, 3]
    first = int(out[3])
    stopped = generate.generate(model, ids, 5, temperature=0, eos_id=first)
    assert stopped.tolist() == [1, 2, 3]
    stop = {999, int(out[4])}
    first_stop = next(i for i in range(3, len(out)) if int(out[i]) in stop)
    stopped = generate.generate(model, ids, 5, temperature=0, eos_id=stop)
    assert stopped.tolist() == out[:first_stop].tolist()
