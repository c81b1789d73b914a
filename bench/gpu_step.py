"""A WL-M training step at the paper's shapes with random weights: LLaMA-2-7B + Whisper large-v2 (no real 7B
weights are needed), then the demo's SmolLM2-135M + tiny.en, our Whispering-LLaMA layer against the literal
template, in train.py's bf16 (frozen weights bf16, adapters fp32, bf16 autocast). Made for a GPU; on a CPU it
checks itself at small depth.

    python bench/gpu_step.py                                     # a GPU: 7B + large-v2, then the demo shapes
    python bench/gpu_step.py --device cpu --layers 3 --batch 1   # a quick check of the script on a CPU

A micro-step is train.py's forward + backward of micro-batch --batch × (--prompt-tokens + --response-tokens),
the loss on the response, with the features of a 30 s window (the paper's 1500 frames). Kinds:
    ours      the model as train.py runs it
    template  the Whisper branch as the reference code computes it: in every adapter block the frozen projections
              of the audio, the norms, down/up, and the (B, H, F, D) keys and values of the identity template
              padded in full for all H heads, attended by all H heads
Printed per model and kind: tokens/s, achieved TFLOP/s (torch's FlopCounterMode on one micro-step) and its share
of the device's bf16 matmul peak (measured here), peak memory (CUDA: max allocated; CPU: the process's peak RSS so
far), the loss, and the largest relative difference of the adapter tensors' gradient norms from ours (both kinds
compute the same function: they differ by bf16 rounding; with random weights the loss itself hardly depends on
the audio branch, the adapters' gradients do).
"""
import argparse
import functools
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import adapter as A  # noqa: E402
import train  # noqa: E402
from adapter import WhisperingLLaMA, is_adapter_param  # noqa: E402
from model import Config  # noqa: E402
from prepare_data import IGNORE_INDEX  # noqa: E402
from whisper_model import N_AUDIO_FRAMES, ModelDimensions  # noqa: E402
from wl_checkpoint import wl_config  # noqa: E402

MODELS = {"paper": ("llama-2-7b", "large-v2"), "demo": ("smollm2-135m", "tiny.en")}


def template_kv(self, audio, projected=None):
    """AdapterAttention.whisper_kv as the reference code computes it (the same function): per block, K_pad and
    V_pad (B, H, F, D) in full, the identity template with the Whisper heads' k̂, v̂ written into it."""
    c, D = self.config, self.config.head_size
    with torch.no_grad():
        a = audio.to(self.whisper_key.weight.dtype)
        k, v = self.whisper_key(a), self.whisper_value(a)
    down_v, up_v = (self.adapter_down_k, self.adapter_up_k) if c.shared_down_up else (self.adapter_down_v,
                                                                                     self.adapter_up_v)
    silu = torch.nn.functional.silu
    k = self.split_whisper_heads(self.adapter_up_k(silu(self.adapter_down_k(self.adapter_norm_k(k)))))
    v = self.split_whisper_heads(up_v(silu(down_v(self.adapter_norm_v(v)))))
    B, Hw, F_, Dw = k.shape
    template = torch.eye(F_, D, dtype=k.dtype, device=k.device).expand(B, c.n_head, F_, D)
    k_pad, v_pad = template.clone(), template.clone()
    k_pad[:, :Hw, :, :Dw], v_pad[:, :Hw, :, :Dw] = k, v
    return k_pad, v_pad, None  # all H heads: whisper_attention attends over them as given


def random_model(llm: str, whisper: str, layers, device) -> WhisperingLLaMA:
    """WL-M with random frozen weights (std 0.02) in bf16 and the paper's adapter initialisation in fp32."""
    overrides = {"n_layer": layers} if layers else {}
    config = wl_config(Config.from_name(llm, **overrides), ModelDimensions.from_name(whisper))
    if config.n_layer <= config.adapter_start_layer:
        sys.exit(f"error: --layers {layers} leaves no adapter block (they start at block {config.adapter_start_layer})")
    torch.set_default_dtype(torch.bfloat16)  # a 7B model is built directly in bf16 on the device
    try:
        with torch.device(device):
            model = WhisperingLLaMA(config)
    finally:
        torch.set_default_dtype(torch.float32)
    for name, p in model.named_parameters():
        p.data = p.data.float() if is_adapter_param(name) else p.data
        p.requires_grad = is_adapter_param(name)
    return model


def make_batch(model, args, device):
    B, P, R = args.batch, args.prompt_tokens, args.response_tokens
    ids = torch.randint(0, model.config.vocab_size, (B, P + R), device=device)
    labels = ids.clone()
    labels[:, :P] = IGNORE_INDEX
    audio = torch.randn(B, N_AUDIO_FRAMES, model.config.whisper_width, device=device, dtype=torch.bfloat16)
    return {"ids": ids, "labels": labels, "audio_features": audio}


def micro_step(model, batch, device) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss, n = train.micro_batch_loss(model, batch)
    (loss / n).backward()
    return loss.item() / n


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, n) -> float:
    """FLOP/s of an n×n×n bf16 matmul: the device's practical peak."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n ** 3 * 10 / (time.perf_counter() - t0)


def measure(model, batch, device, repeats) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        micro_step(model, batch, device)  # also the warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        losses.append(micro_step(model, batch, device))
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    grads = torch.stack([p.grad.float().norm() for p in model.parameters() if p.grad is not None]).cpu()
    return {"seconds": statistics.median(times), "flops": counter.get_total_flops(), "peak_gib": peak / 2 ** 30,
            "loss": losses[-1], "grads": grads}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--layers", type=int, help="LLM blocks (default: the model's; fewer for a quick check)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=280)
    parser.add_argument("--response-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="CPU threads")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = matmul_peak(device, 8192 if device.type == "cuda" else 2048)
    print(f"{name}: bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; micro-batch {args.batch} × ({args.prompt_tokens} + "
          f"{args.response_tokens}) tokens, {N_AUDIO_FRAMES} frames, forward + backward, median of {args.repeats}")
    print(f"{'model':<40}{'kind':<10}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'loss':>9}"
          f"{'grads vs ours':>15}")
    ours_kv = A.AdapterAttention.whisper_kv
    for key in args.models:
        llm, whisper = MODELS[key]
        torch.manual_seed(0)
        model = random_model(llm, whisper, args.layers, device)
        batch = make_batch(model, args, device)
        label = f"{llm}{f' ({args.layers} blocks)' if args.layers else ''} + {whisper}"
        for kind in ("ours", "template"):
            A.AdapterAttention.whisper_kv = ours_kv if kind == "ours" else functools.partialmethod(template_kv)
            r = measure(model, batch, device, args.repeats)
            if kind == "ours":
                ours_grads = r["grads"]
            achieved = r["flops"] / r["seconds"]
            grads = ((r["grads"] - ours_grads).abs() / ours_grads.clamp_min(1e-12)).max().item()
            tokens = args.batch * (args.prompt_tokens + args.response_tokens)
            print(f"{label:<40}{kind:<10}{tokens / r['seconds']:>10.0f}{achieved / 1e12:>9.2f}{achieved / peak:>7.1%}"
                  f"{r['peak_gib']:>10.2f}{r['loss']:>9.4f}{grads:>15.1e}")
        A.AdapterAttention.whisper_kv = ours_kv
        del model, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
