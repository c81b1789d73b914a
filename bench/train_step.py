"""One training micro-step (forward + backward) of Whispering-LLaMA on CPU: train.py's loss, which runs the
lm_head only at the labelled positions, against the textbook loss over full logits.

    python bench/train_step.py                          # SmolLM2-135M + Whisper tiny.en, WL-M, demo-like batch
    python bench/train_step.py --batch 4 --repeats 3 --threads 2

The batch looks like a demo-corpus micro-batch: a prompt of --prompt-tokens (the Alpaca template with 15
hypotheses) followed by a response of --response-tokens, and 1500 frames of audio features (30 s). Only the
response is labelled, so the baseline's lm_head does (prompt + response) / response times the work for nothing.
Both run the same model in the same process. Printed: tokens/s for each, their ratio, and the loss difference.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import convert_checkpoint  # noqa: E402
import train  # noqa: E402
from prepare_data import IGNORE_INDEX  # noqa: E402
from whisper_model import N_AUDIO_FRAMES  # noqa: E402
from wl_checkpoint import build_model  # noqa: E402


def full_logits_loss(model, batch):
    """The baseline: logits at every position, then cross-entropy with the prompt and padding ignored."""
    logits = model(batch["ids"][:, :-1], batch["audio_features"])  # (B, T-1, vocab)
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def timed(fns, repeats: int):
    """Median seconds of each function over `repeats` rounds after one warm-up round, and its last output.
    The functions alternate within a round, so that a change in the machine's load hits both alike."""
    outs = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [(statistics.median(t), out) for t, out in zip(times, outs)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default=None, help="LLM checkpoint folder (default: the embedded SmolLM2)")
    parser.add_argument("--whisper", default="tiny.en", help="Whisper model for AiW (default tiny.en)")
    parser.add_argument("--variant", choices=("L", "M", "S"), default="M")
    parser.add_argument("--batch", type=int, default=2, help="examples in the micro-batch (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--response-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        llm_dir = convert_checkpoint.ensure_llm(args.llm)
        whisper, _ = convert_checkpoint.load_whisper(args.whisper)
    except (convert_checkpoint.ConversionError, OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
    torch.manual_seed(0)
    model = build_model(llm_dir, whisper, variant=args.variant).float()
    c = model.config
    B, P, R = args.batch, args.prompt_tokens, args.response_tokens
    ids = torch.randint(0, c.vocab_size, (B, P + R))
    labels = ids.clone()
    labels[:, :P] = IGNORE_INDEX
    batch = {"ids": ids, "labels": labels, "audio_features": torch.randn(B, N_AUDIO_FRAMES, c.whisper_width).half()}

    def step(loss_fn):
        def run():
            model.zero_grad(set_to_none=True)
            loss, n = loss_fn(model, batch)
            (loss / n).backward()
            return (loss / n).item()
        return run

    tokens = B * (P + R)
    print(f"WL-{args.variant} on {c.name} + Whisper {args.whisper}: micro-batch {B} × ({P} prompt + {R} response "
          f"tokens), {N_AUDIO_FRAMES} audio frames, forward + backward, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} alternating rounds after a warm-up")
    (t_ours, loss_ours), (t_base, loss_base) = timed([step(train.micro_batch_loss), step(full_logits_loss)],
                                                     args.repeats)
    print(f"{'':<28}{'tokens/s':>10}{'s/step':>9}")
    print(f"{'ours (labelled logits)':<28}{tokens / t_ours:>10.1f}{t_ours:>9.2f}")
    print(f"{'baseline (full logits)':<28}{tokens / t_base:>10.1f}{t_base:>9.2f}")
    print(f"speed-up {t_base / t_ours:.2f}x; loss {loss_ours:.6f} vs {loss_base:.6f} "
          f"(|Δ| {abs(loss_ours - loss_base):.2e})")


if __name__ == "__main__":
    main()
