"""Training speed of Whispering-LLaMA on this machine: today's path against the fast ones, in one run.

    python bench/train_speed.py                        # every configuration + the 20-step loss comparison
    python bench/train_speed.py --threads 2 --repeats 3 --steps 20

A micro-step is train.py's forward + backward (loss on the response only) of a demo-like micro-batch:
--batch examples of --prompt-tokens (the Alpaca prompt with 15 hypotheses) + --response-tokens, with the
audio features of a 30 s window (1500 frames; with trimming only the frames of a --clip-seconds clip).

Configurations (each in its own process, so that its peak RSS is its own):
    baseline   fp32, the paper's 1500 frames, the AiW keys/values as the code first computed them (`old_whisper_kv`):
               every adapter block projects the audio with its own Whisper k/v copy, applies its RMSNorms and
               builds the Whisper heads' keys/values in full, (B, Hw, F, D)
    fp32       fp32, today's AiW: the projections and their normalisation once per distinct Whisper block (the
               norms' scale folded into down), the Whisper heads attending over the low-rank codes (all exact)
    bf16-before  frozen weights in bf16 under bf16 autocast, adapters fp32, as first measured: the AiW of then
               (projections shared, per-block norms, keys/values in full) and every attention through the fused
               kernel (`fused_attention`; the prefix and frames upcast to fp32, where that kernel was faster)
    bf16       today's train.py --precision bf16: today's AiW, and on a CPU every attention written out as bf16
               matmuls (model.matmul_attention; bench/attention.py times it against the fused kernel)
    bf16-trim-fused  bf16-trim with every attention through the fused kernel, as the previous measurement ran
    bf16-trim  bf16 and only the frames that carry the clip (train.py --precision bf16 --trim-audio)

Printed: tokens/s, the speed-up over the baseline, achieved FLOP/s (FLOPs counted by torch's FlopCounterMode
on one micro-step) as a fraction of this machine's matmul peak in that precision (measured here on a large
matmul), peak RSS; then the loss of fp32 and bf16 over --steps AdamW steps from the same start on the same
batches.
"""
import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import adapter as A  # noqa: E402
import convert_checkpoint  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
import wl_checkpoint  # noqa: E402
from prepare_data import IGNORE_INDEX  # noqa: E402
from whisper_model import FRAMES_PER_SECOND, N_AUDIO_FRAMES  # noqa: E402

CONFIGS = ("baseline", "fp32", "bf16-before", "bf16", "bf16-trim-fused", "bf16-trim")


def matmul_peak(dtype, n=2048, repeats=5, device="cpu") -> float:
    """FLOP/s of an n×n×n matmul in `dtype`: the device's practical peak for that precision."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def sync(device):
    """Wait for a GPU's queued work, so that a timer measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def old_whisper_kv(self, audio, projected=None, share=False):
    """AdapterAttention.whisper_kv as the code first computed it: the frozen projections per block (or, share, once
    per distinct Whisper block), each block's RMSNorm modules, k̂ = up(silu(down(·))) and v̂ built in full, split
    into Whisper heads with their identity tail. The same function as today's (the tests compare both with the
    literal template)."""
    c, projected = self.config, {} if projected is None else projected
    if not share or ("raw", self.whisper_block) not in projected:
        with torch.no_grad():
            a = audio.to(self.whisper_key.weight.dtype)
            projected[("raw", self.whisper_block)] = self.whisper_key(a), self.whisper_value(a)
    k, v = projected[("raw", self.whisper_block)]
    down_v, up_v = (self.adapter_down_k, self.adapter_up_k) if c.shared_down_up else (self.adapter_down_v,
                                                                                     self.adapter_up_v)
    silu = torch.nn.functional.silu
    k = self.split_whisper_heads(self.adapter_up_k(silu(self.adapter_down_k(self.adapter_norm_k(k)))))
    v = self.split_whisper_heads(up_v(silu(down_v(self.adapter_norm_v(v)))))
    return A.identity_tail(k, c.head_size), A.identity_tail(v, c.head_size), None


def fused_attention(q, k, v, mask=None, causal=False, scale=None):
    """model.attention before it wrote the CPU bf16 attention out: the fused kernel always, and under bf16 autocast
    the unmasked attentions (prefix, frames) computed in fp32, where that kernel ran faster than in bf16."""
    gqa = k.shape[1] != q.shape[1]
    if mask is None and not causal and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale,
                                                  enable_gqa=gqa).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def build(name, whisper):
    """(model, autocast dtype or None) for a configuration."""
    torch.manual_seed(0)
    llm = convert_checkpoint.ensure_llm(None)
    model = wl_checkpoint.build_model(llm, whisper, trim_audio="trim" in name).float()
    if name in ("baseline", "bf16-before"):
        A.AdapterAttention.whisper_kv = functools.partialmethod(old_whisper_kv, share=name != "baseline")
    if name in ("bf16-before", "bf16-trim-fused"):
        M.attention = A.attention = fused_attention  # model.py's blocks and adapter.py's branches
    if name.startswith("bf16"):
        with torch.no_grad():  # as train.py --precision bf16
            for p in model.parameters():
                p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)
        return model, torch.bfloat16
    return model, None


def make_batch(model, args, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, P, R = args.batch, args.prompt_tokens, args.response_tokens
    ids = torch.randint(0, model.config.vocab_size, (B, P + R), generator=g)
    labels = ids.clone()
    labels[:, :P] = IGNORE_INDEX
    frames = round(args.clip_seconds * FRAMES_PER_SECOND)
    return {"ids": ids, "labels": labels, "audio_features": torch.randn(B, N_AUDIO_FRAMES, model.config.whisper_width,
                                                                        generator=g).half(),
            "meta": [{"n_frames": frames}] * B}


def micro_step(model, batch, dtype):
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        loss, n = train.micro_batch_loss(model, batch)
    (loss / n).backward()
    return loss.item() / n


def run_one(name, args) -> dict:
    """Time one configuration in this process."""
    whisper, _ = convert_checkpoint.load_whisper("tiny.en")
    model, dtype = build(name, whisper)
    batch = make_batch(model, args)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        micro_step(model, batch, dtype)
    times = []
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        micro_step(model, batch, dtype)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"name": name, "seconds": t, "tokens": args.batch * (args.prompt_tokens + args.response_tokens),
            "flops": counter.get_total_flops(), "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "peak": matmul_peak(dtype or torch.float32)}


def loss_curves(args) -> dict:
    """Loss per step of fp32 and bf16 over args.steps AdamW steps (lr 1e-3, one micro-batch per step) from the
    same initial adapters on the same batches."""
    whisper, _ = convert_checkpoint.load_whisper("tiny.en")
    curves = {}
    for name in ("fp32", "bf16"):
        model, dtype = build(name, whisper)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.02)
        losses = []
        for step in range(args.steps):
            opt.zero_grad(set_to_none=True)
            losses.append(micro_step(model, make_batch(model, args, seed=step % 4), dtype))
            opt.step()
        curves[name] = losses
    return curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=280)
    parser.add_argument("--response-tokens", type=int, default=20)
    parser.add_argument("--clip-seconds", type=float, default=4.0, help="clip length for the trimmed configuration")
    parser.add_argument("--repeats", type=int, default=3, help="timed micro-steps per configuration")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of the loss comparison (0: skip)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: time one configuration
    parser.add_argument("--curves", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    if args.curves:
        print(json.dumps(loss_curves(args)))
        return
    print(f"WL-M on SmolLM2-135M + Whisper tiny.en: micro-batch {args.batch} × ({args.prompt_tokens} prompt + "
          f"{args.response_tokens} response tokens), forward + backward, {args.threads} threads, median of "
          f"{args.repeats}; trimmed: a {args.clip_seconds:g} s clip ({round(args.clip_seconds * FRAMES_PER_SECOND)} of {N_AUDIO_FRAMES} frames)")
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("batch", "prompt_tokens", "response_tokens", "clip_seconds", "repeats", "threads", "steps")]
    results = {}
    for name in args.configs:
        out = subprocess.run([sys.executable, __file__, "--one", name, *forwarded], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results.get("baseline")
    print(f"{'':<16}{'tokens/s':>10}{'speed-up':>10}{'GFLOP/s':>9}{'peak GF/s':>10}{'of peak':>9}{'RSS GiB':>9}")
    for name, r in results.items():
        achieved = r["flops"] / r["seconds"]
        ratio = f"{base['seconds'] / r['seconds']:.2f}x" if base else "-"
        print(f"{name:<16}{r['tokens'] / r['seconds']:>10.1f}{ratio:>10}{achieved / 1e9:>9.1f}{r['peak'] / 1e9:>10.1f}"
              f"{achieved / r['peak']:>9.1%}{r['rss_gib']:>9.2f}")
    if args.steps:
        out = subprocess.run([sys.executable, __file__, "--curves", *forwarded], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"loss comparison failed:\n{out.stderr}")
        curves = json.loads(out.stdout.strip().splitlines()[-1])
        diffs = [abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"])]
        print(f"loss over {args.steps} AdamW steps, fp32 → bf16: first {curves['fp32'][0]:.4f} / {curves['bf16'][0]:.4f}, "
              f"last {curves['fp32'][-1]:.4f} / {curves['bf16'][-1]:.4f}, max |Δ| {max(diffs):.4f} "
              f"({max(d / a for d, a in zip(diffs, curves['fp32'])):.2%} of the fp32 loss)")


if __name__ == "__main__":
    main()
