"""Attention on a CPU: the fused kernel (F.scaled_dot_product_attention) against model.matmul_attention, the same
function written out as two batched matmuls, at the demo's shapes, in fp32 and bf16. model.attention takes the
written-out path exactly where this benchmark shows it faster: on a CPU in bf16.

    python bench/attention.py                 # 2 threads, median of 7
    python bench/attention.py --threads 1 --repeats 15

Shapes (SmolLM2-135M: 9 query heads in 3 key/value groups of 64; Whisper tiny.en WL-M: 6 heads over the 24-wide
low-rank codes; micro-batch 4 × 300 tokens, train.py's demo setting):
    text       the causal self-attention of every block, 300 tokens
    prefix     AiL: 300 queries over the 10 prefix positions
    frames     AiW: 6 heads over the low-rank codes of a trimmed 4 s clip (200 frames; one key/value group)
    frames-30s the same over a full 30 s window (1500 frames)
    decode     one new token over a 500-token KV cache (forward only; generate.py's decoding step)
Training shapes are timed forward + backward (the gradients of q, k and v).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import matmul_attention  # noqa: E402

# name: (B, H, G, T, S, D, how): query heads H over G key/value groups, T queries over S keys of width D
SHAPES = {
    "text": (4, 9, 3, 300, 300, 64, "causal"),
    "prefix": (4, 9, 3, 300, 10, 64, "none"),
    "frames": (4, 6, 1, 300, 200, 24, "none"),
    "frames-30s": (4, 6, 1, 300, 1500, 24, "none"),
    "decode": (1, 9, 3, 1, 500, 64, "mask"),
}


def fused(q, k, v, mask, causal):
    return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def written_out(q, k, v, mask, causal):
    return matmul_attention(q, k, v, mask, causal)


def time_one(fn, shape, dtype, repeats) -> float:
    """Median seconds of one call (forward + backward unless decoding)."""
    B, H, G, T, S, D, how = shape
    train = how != "mask"
    q = torch.randn(B, H, T, D, dtype=dtype, requires_grad=train)
    k, v = (torch.randn(B, G, S, D, dtype=dtype, requires_grad=train) for _ in range(2))
    mask = (torch.arange(S) <= S - 1)[None].expand(T, S) if how == "mask" else None
    g = torch.randn(B, H, T, D, dtype=dtype)

    def call():
        y = fn(q, k, v, mask, how == "causal")
        if train:
            y.backward(g)

    with torch.no_grad() if not train else torch.enable_grad():
        call()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, median of {args.repeats}; ms per call (training shapes: forward + backward)")
    print(f"{'shape':<12}{'dtype':<10}{'fused':>9}{'written':>9}{'written/fused speed':>21}")
    for name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            a, b = (time_one(fn, shape, dtype, args.repeats) for fn in (fused, written_out))
            print(f"{name:<12}{str(dtype).removeprefix('torch.'):<10}{a * 1e3:>9.2f}{b * 1e3:>9.2f}{a / b:>20.2f}x")


if __name__ == "__main__":
    main()
