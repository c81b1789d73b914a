"""Forward-pass throughput of the LLM on CPU: our model.py against a literal reference forward.

    python bench/llm_forward.py                      # SmolLM2-135M, 512 tokens, float32 and bfloat16
    python bench/llm_forward.py --tokens 256 --repeats 5 --dtypes float32

Both run the same weights in the same process. The reference is the textbook computation written
out: a loop over heads with separate q/k/v projections, the key/value heads repeated explicitly for
grouped-query attention, an explicit causal mask and softmax, and separate gate/up projections.
Ours fuses q/k/v into one projection and attends through model.attention (the fused kernel with native
GQA; on a CPU in bf16, grouped bf16 matmuls).
Printed: tokens/s for each, their ratio, and the largest logit difference between the two.
"""
import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import convert_checkpoint  # noqa: E402
from model import LLaMA  # noqa: E402


def reference_forward(model: LLaMA, idx: torch.Tensor) -> torch.Tensor:
    """Logits (T, vocab) for idx (T,), computed literally from the model's weights."""
    c = model.config
    H, G, D, C = c.n_head, c.n_query_groups, c.head_size, c.n_embd
    T = idx.shape[0]
    dtype = model.lm_head.weight.dtype

    def rmsnorm(x, w):  # in float32, as the original implementations do
        xf = x.float()
        return (xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + c.norm_eps) * w.float()).to(dtype)

    # Interleaved RoPE: pair (2i, 2i+1) of each head rotates by pos · base^(-2i/D).
    inv_freq = 1.0 / (c.rope_base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angle = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    cos, sin = angle.cos().float(), angle.sin().float()

    def rope(x):  # (T, D)
        x = x.float()
        even, odd = x[:, 0::2], x[:, 1::2]
        out = torch.empty_like(x)
        out[:, 0::2] = even * cos - odd * sin
        out[:, 1::2] = even * sin + odd * cos
        return out.to(dtype)

    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    x = model.transformer.wte.weight[idx]  # (T, C)
    for block in model.transformer.h:
        wq, wk, wv = block.attn.qkv.weight.split((H * D, G * D, G * D))
        h = rmsnorm(x, block.norm_1.weight)
        # Keys and values per group, then repeated so that query head j reads group j // (H / G).
        keys = [rope(h @ wk[g * D:(g + 1) * D].T) for g in range(G)]
        values = [h @ wv[g * D:(g + 1) * D].T for g in range(G)]
        keys = [k for k in keys for _ in range(H // G)]
        values = [v for v in values for _ in range(H // G)]
        heads = []
        for j in range(H):
            q = rope(h @ wq[j * D:(j + 1) * D].T)  # (T, D)
            scores = (q @ keys[j].T).float() / math.sqrt(D)  # (T, T)
            scores = scores.masked_fill(causal, float("-inf"))
            weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
            weights = weights / weights.sum(-1, keepdim=True)
            heads.append(weights.to(dtype) @ values[j])
        x = x + torch.cat(heads, dim=-1) @ block.attn.proj.weight.T
        h = rmsnorm(x, block.norm_2.weight)
        gate, up = h @ block.mlp.fc_1.weight.T, h @ block.mlp.fc_2.weight.T
        x = x + (gate * torch.sigmoid(gate) * up) @ block.mlp.proj.weight.T
    return rmsnorm(x, model.transformer.ln_f.weight) @ model.lm_head.weight.T


def timed(fn, repeats: int):
    """Median seconds of `repeats` calls after one warm-up call; returns (seconds, last output)."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="converted LLM checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=512, help="sequence length of the forward pass (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after a warm-up (default 3)")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        checkpoint = convert_checkpoint.ensure_llm(args.checkpoint_dir)
    except convert_checkpoint.ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    base = LLaMA.from_checkpoint(checkpoint).eval()  # float32 as stored; each dtype gets a fresh copy below
    if args.tokens > base.config.block_size:
        print(f"error: --tokens exceeds the model's block_size {base.config.block_size}", file=sys.stderr)
        sys.exit(1)
    idx = torch.randint(0, base.config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
    print(f"{base.config.name}: {args.tokens}-token forward on CPU, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} after a warm-up")
    print(f"{'dtype':<10}{'ours tok/s':>12}{'ref tok/s':>12}{'speed-up':>10}{'max |Δlogit|':>14}{'rel':>10}"
          f"{'argmax agree':>14}")
    with torch.inference_mode():
        for name in args.dtypes:
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
            model = LLaMA.from_checkpoint(checkpoint, dtype=dtype).eval()
            t_ours, ours = timed(lambda: model(idx[None])[0], args.repeats)
            t_ref, ref = timed(lambda: reference_forward(model, idx), args.repeats)
            ours, ref = ours.float(), ref.float()
            diff = (ours - ref).abs().max().item()
            rel = diff / ref.abs().max().item()
            agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
            print(f"{name:<10}{args.tokens / t_ours:>12.1f}{args.tokens / t_ref:>12.1f}{t_ref / t_ours:>9.2f}x"
                  f"{diff:>14.2e}{rel:>10.1e}{agree:>13.1%}")
            # The two must compute the same function: fp32 to rounding error, bf16 within bf16 precision.
            limit = 1e-4 if name == "float32" else 5e-2
            if rel > limit:
                print(f"error: ours and the reference disagree in {name} (relative difference {rel:.1e} > {limit})",
                      file=sys.stderr)
                sys.exit(1)


if __name__ == "__main__":
    main()
