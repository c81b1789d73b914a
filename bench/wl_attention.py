"""Benchmark: one Whispering-LLaMA attention layer, fast path vs the literal padded-template implementation.

Shapes of the paper's main setting: LLaMA-7B (C=4096, H=32, D=128) + Whisper large-v2 (W=1280, Hw=20,
Dw=64, F=1500 frames), WL-M, micro-batch B=4 of T=256 tokens, fp32 on CPU, forward + backward.

Two baselines: `literal` does what the reference code does: builds the (B, H, F, D) padding template for keys
and values at every step, mixes heads with a permute + matmul, and calls scaled_dot_product_attention on the
padded tensors; `textbook` is the same with an explicit softmax(q Kᵀ/√D) V (the formula as written). Both variants run the same self-attention, prefix branch and Whisper projections; only the Whisper
branch differs. Each variant runs in its own child process, so its peak memory is its own (a process's max
RSS only grows).

    python bench/wl_attention.py            # paper shapes (takes a minute or two on 2 cores)
    python bench/wl_attention.py --small    # quick check
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import adapter as A
from model import Config, build_rope_cache
from whisper_model import N_AUDIO_FRAMES
from wl_checkpoint import wl_config


def literal_whisper_branch(attn, q, audio, explicit=False):
    """The reference code's computation, vectorised but literal: padded template per step.
    explicit: a textbook softmax(q Kᵀ/√D) V instead of the fused kernel (materialises the scores)."""
    c = attn.config
    B, H, T, D = q.shape
    Hw, Dw = c.whisper_heads, c.whisper_head_size
    k = attn.adapter_up_k(F.silu(attn.adapter_down_k(attn.adapter_norm_k(attn.whisper_key(audio)))))
    v = attn.adapter_up_k(F.silu(attn.adapter_down_k(attn.adapter_norm_v(attn.whisper_value(audio)))))
    Fr = audio.shape[1]
    k, v = k.view(B, Fr, Hw, Dw).transpose(1, 2), v.view(B, Fr, Hw, Dw).transpose(1, 2)
    template = torch.eye(Fr, D, dtype=q.dtype).expand(B, H, Fr, D)
    k_pad, v_pad = template.clone(), template.clone()
    k_pad[:, :Hw, :, :Dw] = k
    v_pad[:, :Hw, :, :Dw] = v
    q = q @ attn.adapter_q_dim
    q = (q.permute(0, 2, 3, 1) @ attn.adapter_q_head).permute(0, 3, 1, 2)
    if explicit:
        return (q @ k_pad.transpose(-1, -2) / math.sqrt(D)).softmax(-1) @ v_pad
    return F.scaled_dot_product_attention(q, k_pad, v_pad)


def branch_forward(attn, q, audio, literal):
    """The AiW branch alone (RoPE'd queries + audio → y_w): the only part where the two variants differ."""
    if literal:
        return literal_whisper_branch(attn, q, audio, explicit=literal == "textbook")
    k_w, v_w, up = attn.whisper_kv(audio)
    return A.whisper_attention(attn.transform_query(q), k_w, v_w, up)


def layer_forward(attn, x, cos, sin, audio, literal):
    if not literal:
        return attn(x, cos, sin, audio=audio)
    q, y = attn.attend(x, cos, sin, None)
    k_p, v_p = attn.prefix_kv()
    y = y + attn.adapter_gate_prefix * A.prefix_attention(q, k_p, v_p)
    y = y + attn.adapter_gate_whisper * literal_whisper_branch(attn, q, audio, explicit=literal == "textbook")
    return attn.project(y)


KINDS = ("fast", "literal", "textbook")


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args):
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.small:
        llm = Config(name="b", n_layer=1, n_head=8, n_embd=512, vocab_size=16)
        cfg = wl_config(llm, whisper_width=256, whisper_heads=4, whisper_layers=1, adapter_start_layer=0)
        B, T, Fr = 2, 64, 300
    else:
        llm = Config.from_name("llama-7b", n_layer=1)
        cfg = wl_config(llm, whisper_width=1280, whisper_heads=20, whisper_layers=1, adapter_start_layer=0)
        B, T, Fr = 4, 256, N_AUDIO_FRAMES
    attn = A.AdapterAttention(cfg, cfg.adapter_start_layer)
    for name, p in attn.named_parameters():
        if name.startswith("whisper_"):
            torch.nn.init.normal_(p, std=0.02)
        p.requires_grad = name.startswith("adapter_")
    x = torch.randn(B, T, cfg.n_embd, requires_grad=True)  # earlier adapters receive gradients through x
    if args.branch:  # the branch's input: RoPE'd queries (B, H, T, D)
        x = torch.randn(B, cfg.n_head, T, cfg.head_size, requires_grad=True)
    audio = torch.randn(B, Fr, cfg.whisper_width)
    cos, sin = build_rope_cache(T, cfg.head_size, cfg.rope_base)
    literal = False if args.child == "fast" else args.child

    def step(x=x, audio=audio, cos=cos, sin=sin):
        x.grad = None
        for p in attn.parameters():
            p.grad = None
        if args.branch:
            out = branch_forward(attn, x, audio, literal)
        else:
            out = layer_forward(attn, x, cos, sin, audio, literal)
        out.backward(torch.ones_like(out) / out.numel())
        return out

    # Load the kernels on a tiny input first, so their one-time cost does not count as the step's memory.
    small_x = (x[:1, :, :8] if args.branch else x[:1, :8]).detach().requires_grad_()
    step(small_x, audio[:1, :40], cos[:8], sin[:8])
    rss_before = rss_mb()
    out = step()  # warm-up; also the run whose peak memory we report
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    grads = {n: p.grad.double().norm().item() for n, p in attn.named_parameters() if p.grad is not None}
    print(json.dumps(dict(time=sorted(times)[len(times) // 2], peak_mb=peak, out_sum=out.double().sum().item(),
                          out_abs=out.double().abs().sum().item(), grads=grads,
                          shapes=dict(B=B, T=T, F=Fr, C=cfg.n_embd, H=cfg.n_head, W=cfg.whisper_width))))


@torch.no_grad()
def decode_steps(threads, small, steps=20):
    """Per generated token, the AiW branch while decoding: the fast path reads the Whisper heads' keys and
    values computed once per utterance; the literal one recomputes projections and template every step."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    if small:
        cfg = wl_config(Config(name="b", n_layer=1, n_head=8, n_embd=512, vocab_size=16), whisper_width=256,
                          whisper_heads=4, whisper_layers=1, adapter_start_layer=0)
        Fr = 300
    else:
        cfg = wl_config(Config.from_name("llama-7b", n_layer=1), whisper_width=1280, whisper_heads=20,
                          whisper_layers=1, adapter_start_layer=0)
        Fr = N_AUDIO_FRAMES
    attn = A.AdapterAttention(cfg, cfg.adapter_start_layer).eval()
    for name, p in attn.named_parameters():
        if name.startswith("whisper_"):
            torch.nn.init.normal_(p, std=0.02)
    audio = torch.randn(1, Fr, cfg.whisper_width)
    qs = torch.randn(steps, 1, cfg.n_head, 1, cfg.head_size)
    t0 = time.perf_counter()
    k_w, v_w, up = attn.whisper_kv(audio)  # once per utterance
    fast = [A.whisper_attention(attn.transform_query(q), k_w, v_w, up) for q in qs]
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    lit = [literal_whisper_branch(attn, q, audio) for q in qs]
    t_lit = time.perf_counter() - t0
    diff = max((a - b).abs().max().item() for a, b in zip(fast, lit))
    print(f"\ndecoding, the AiW branch for {steps} tokens of one utterance (F={Fr}, W={cfg.whisper_width}), "
          f"{threads} threads")
    print(f"literal (recompute every step) {t_lit / steps * 1e3:8.2f} ms/token")
    print(f"fast (k/v cached per utterance) {t_fast / steps * 1e3:7.2f} ms/token (first step included)")
    print(f"speed-up: {t_lit / t_fast:.1f}x   max abs difference {diff:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small shapes for a quick run")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--branch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    for branch in (True, False):
        compare(args, branch)
    decode_steps(args.threads, args.small)


def compare(args, branch):
    results = {}
    for kind in KINDS:
        cmd = [sys.executable, __file__, "--child", kind, "--iters", str(args.iters), "--threads", str(args.threads)]
        cmd += (["--small"] if args.small else []) + (["--branch"] if branch else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[kind] = json.loads(out.strip().splitlines()[-1])
    fast, lit = results["fast"], results["literal"]
    s = fast["shapes"]
    what = "the AiW branch alone (q, audio → y_w)" if branch else \
        "one whole adapter attention layer (self-attention, AiL, AiW, projections)"
    print(f"\n{what}\nB={s['B']} T={s['T']} F={s['F']} C={s['C']} H={s['H']} W={s['W']}, "
          f"fp32, forward+backward, {args.threads} threads")
    print(f"{'':10s} {'time (s)':>10s} {'peak mem (MB)':>14s} {'speed-up':>9s} {'memory reduction':>17s}")
    for kind in ("textbook", "literal", "fast"):
        r = results[kind]
        print(f"{kind:10s} {r['time']:10.3f} {r['peak_mb']:14.0f} {r['time'] / fast['time']:8.2f}x "
              f"{r['peak_mb'] / fast['peak_mb']:16.2f}x")
    rel = abs(fast["out_sum"] - lit["out_sum"]) / max(1e-12, lit["out_abs"])
    grad_rel = max(abs(fast["grads"][n] - lit["grads"][n]) / max(1e-12, lit["grads"][n]) for n in lit["grads"])
    print(f"outputs agree: relative difference of sums {rel:.1e}, of gradient norms {grad_rel:.1e}")


if __name__ == "__main__":
    main()
