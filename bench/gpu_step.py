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
far), the loss, and ‖g − g_ours‖ / ‖g_ours‖ over all the adapters' gradients (both kinds compute the same
function: they differ by bf16 rounding; with random weights the loss itself hardly depends on the audio branch, the
adapters' gradients do. Per tensor, a gradient that cancels to near zero, like the prefix gate's, is mostly
rounding).
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
import train_speed as TS  # noqa: E402  (bench/, beside this file)
from adapter import WhisperingLLaMA, is_adapter_param  # noqa: E402
from model import Config  # noqa: E402
from whisper_model import FRAMES_PER_SECOND, N_AUDIO_FRAMES, ModelDimensions  # noqa: E402
from wl_checkpoint import wl_config  # noqa: E402

MODELS = {"paper": ("llama-2-7b", "large-v2"), "demo": ("smollm2-135m", "tiny.en")}


def template_kv(self, audio, projected=None):
    """AdapterAttention.whisper_kv as the reference code computes it (the same function): per block, K_pad and
    V_pad (B, H, F, D) in full: the Whisper heads as the AiW code first built them (train_speed.old_whisper_kv:
    the block's own projections, norms, down/up, identity tail), then the template's H - Hw padding heads."""
    k, v, _ = TS.old_whisper_kv(self, audio)  # (B, Hw, F, D)
    B, Hw, F_, D = k.shape
    pad = torch.eye(F_, D, dtype=k.dtype, device=k.device).expand(B, self.config.n_head - Hw, F_, D)
    return torch.cat((k, pad), dim=1), torch.cat((v, pad), dim=1), None  # whisper_attention attends over all H


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
    """train_speed's demo-like micro-batch (30 s of features: every frame carries audio), on the device."""
    batch = TS.make_batch(model, argparse.Namespace(**vars(args), clip_seconds=N_AUDIO_FRAMES / FRAMES_PER_SECOND))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def measure(model, batch, device, repeats) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        TS.micro_step(model, batch, torch.bfloat16)  # also the warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        TS.sync(device)
        t0 = time.perf_counter()
        losses.append(TS.micro_step(model, batch, torch.bfloat16))
        TS.sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None]).cpu()
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
    peak = TS.matmul_peak(torch.bfloat16, 8192 if device.type == "cuda" else 2048, 10, device)
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
            grads = ((r["grads"] - ours_grads).norm() / ours_grads.norm()).item()
            tokens = args.batch * (args.prompt_tokens + args.response_tokens)
            print(f"{label:<40}{kind:<10}{tokens / r['seconds']:>10.0f}{achieved / 1e12:>9.2f}{achieved / peak:>7.1%}"
                  f"{r['peak_gib']:>10.2f}{r['loss']:>9.4f}{grads:>15.1e}")
        A.AdapterAttention.whisper_kv = ours_kv
        del model, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
