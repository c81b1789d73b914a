"""Benchmark: Whispering-LLaMA's n-best list (200 samples → 15-best) with Whisper tiny.en on CPU.

    ours      whisper_model.sample_nbest: the 200 samples decode as one batch with a KV cache; the audio's
              cross-attention keys/values are computed once per clip and shared by all samples; finished
              samples leave the batch.
    baseline  a literal uncached loop: one sample at a time, and at every step the whole prefix goes through
              the decoder again, cross-attention keys/values of the audio included. It is timed on a few
              samples and extrapolated per sample to the same count (printed as such).

Both use the embedded tiny.en and eSpeak speech (a ~5 s and a ~30 s clip), at the same temperature, in the
same run. The encoder (one 30 s window) is timed on its own: it is the same for both.

    python bench/whisper_nbest.py                       # a few minutes on 2 CPU cores
    python bench/whisper_nbest.py --baseline-samples 1 1  # quicker
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import convert_checkpoint  # noqa: E402
import whisper_model as wm  # noqa: E402

SHORT_TEXT = "Please call Stella and ask her to bring these things with her from the store."
LONG_TEXTS = [
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her Wednesday at the train station.",
    "The weather is nice today so we are going to the park after lunch.",
    "My brother lives in a small house near the river with two cats.",
    "Can you tell me where the nearest bus station is?",
    "He reads a book every night before he goes to sleep.",
]


def speech(texts, max_seconds):
    """eSpeak sentences at 16 kHz, joined with 0.3 s pauses, as many as fit in max_seconds."""
    from demo_corpus import synthesize

    pieces, total = [], 0
    for text in texts:
        audio, sr = synthesize(text, voice="en-us")
        audio = wm.resample(audio.astype(np.float32) / 32768, sr)
        gap = np.zeros(int(0.3 * wm.SAMPLE_RATE), np.float32)
        if total + len(audio) > max_seconds * wm.SAMPLE_RATE:
            break
        pieces += [audio, gap]
        total += len(audio) + len(gap)
    return np.concatenate(pieces)[: max_seconds * wm.SAMPLE_RATE]


@torch.no_grad()
def literal_sample(model, tokenizer, features, temperature, generator):
    """The baseline: one sample, the whole prefix recomputed at each step without any cache."""
    prompt = list(tokenizer.sot_sequence_including_notimestamps)
    filters = wm.logit_filters(tokenizer, len(prompt))
    tokens = torch.tensor([prompt])
    total = 0.0
    for _ in range(model.dims.n_text_ctx // 2):
        logits = model.decoder(tokens, features)[:, -1]  # (1, V); cross k/v recomputed from the audio
        for f in filters:
            f.apply(logits, tokens)
        logprobs = F.log_softmax(logits, dim=-1)
        nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator)
        total += logprobs[0, nxt].item()
        tokens = torch.cat([tokens, nxt], dim=1)
        if nxt.item() == tokenizer.eot:
            break
    return tokens[0, len(prompt):].tolist(), total


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200, help="samples per clip (paper: 200)")
    parser.add_argument("--keep", type=int, default=15, help="hypotheses kept (paper: 15)")
    parser.add_argument("--baseline-samples", type=int, nargs=2, default=(2, 1), metavar=("SHORT", "LONG"),
                        help="samples the slow baseline actually decodes for the 5 s and the 30 s clip (then "
                             "extrapolated per sample); default 2 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    model, tokenizer = convert_checkpoint.load_whisper("tiny.en")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Whisper tiny.en on CPU, {torch.get_num_threads()} torch threads, load average {load:.1f} at start")
    clips = {"5 s": speech([SHORT_TEXT], 5), "30 s": speech(LONG_TEXTS, 30)}

    mel = wm.log_mel_spectrogram(clips["5 s"])[None]
    with torch.no_grad():
        model.embed_audio(mel)  # warm-up
        enc_times = [timed(model.embed_audio, mel)[1] for _ in range(3)]
    print(f"encoder (one 30 s window): {statistics.median(enc_times) * 1000:.0f} ms (median of 3)\n")

    rows = []
    for (name, audio), n_baseline in zip(clips.items(), args.baseline_samples):
        with torch.no_grad():
            features = model.embed_audio(wm.log_mel_spectrogram(audio)[None])
        nbest, t_ours = timed(wm.sample_nbest, model, tokenizer, features, n_samples=args.samples, keep=args.keep,
                              seed=args.seed)
        # the baseline samples at the first temperature sample_nbest draws with this seed
        g = torch.Generator().manual_seed(args.seed)
        temperature = 0.7 + 0.1 * torch.rand((), generator=g).item()
        base_times, lengths = [], []
        for _ in tqdm(range(n_baseline), desc=f"baseline {name}", leave=False):
            (seq, _), t = timed(literal_sample, model, tokenizer, features, temperature, g)
            base_times.append(t)
            lengths.append(len(seq))
        per_sample = sum(base_times) / len(base_times)
        rows.append((name, len(audio) / wm.SAMPLE_RATE, t_ours, n_baseline, per_sample, per_sample * args.samples,
                     len(nbest), np.mean(lengths)))
        print(f"[{name}] best of {len(nbest)}: {nbest[0][0]!r} ({nbest[0][1]:.2f})")

    print(f"\n{args.samples} samples → {args.keep}-best, decoding only (encoder excluded):")
    print(f"{'clip':>6} {'audio':>7} {'ours':>9} {'baseline/sample':>16} {'baseline x' + str(args.samples):>15} "
          f"{'speed-up':>9} {'unique':>7} {'tokens':>7}")
    for name, seconds, ours, n, per, extrapolated, unique, tokens in rows:
        print(f"{name:>6} {seconds:6.1f}s {ours:8.2f}s {per:15.2f}s {extrapolated:14.1f}s {extrapolated / ours:8.1f}x "
              f"{unique:7d} {tokens:7.1f}")
    counts = " and ".join(f"{n} ({name})" for name, _, _, n, *_ in rows)
    print(f"(baseline: {counts} literal uncached samples timed and extrapolated per sample to {args.samples}; "
          f"'tokens' = mean baseline sample length; other processes on this machine slow both sides alike)")


if __name__ == "__main__":
    main()
