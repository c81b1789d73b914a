"""Benchmark: utterances per second for the n-best + features stage of prepare_data.py on demo utterances.

Ours: the encoder runs on a batch of clips, and each clip's `--samples` transcripts are drawn as one batch
(whisper_model.sample_nbest). Baseline, measured in the same run on the same clips: the encoder one clip
at a time and the samples drawn one by one (a literal loop of single-row decodes), which is what a
straightforward port of the recipe does. Prints both rates and the ratio.

    python bench/prepare_data.py                  # 4 demo utterances, 50 samples each
    python bench/prepare_data.py --utterances 8 --samples 200
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prepare_data  # noqa: E402
from convert_checkpoint import load_whisper  # noqa: E402
from whisper_model import SAMPLE_RATE, load_audio, sample_nbest, sample_tokens, text_of  # noqa: E402


def ours(model, tok, audios, samples, keep):
    feats = prepare_data._encode(model, audios)  # (B, 1500, W), one batch
    return [sample_nbest(model, tok, feats[i: i + 1], n_samples=samples, keep=keep, seed=i)
            for i in range(len(audios))]


def baseline(model, tok, audios, samples, keep):
    out = []
    for i, audio in enumerate(audios):
        feats = prepare_data._encode(model, [audio])  # one clip at a time
        generator = torch.Generator().manual_seed(i)
        t = 0.7 + 0.1 * torch.rand((), generator=generator).item()
        best = {}
        for _ in range(samples):  # one sample per decode
            (seq, lp), = sample_tokens(model, tok, feats, 1, t, None, generator)
            text = text_of(tok, seq)
            if text and lp > best.get(text, -float("inf")):
                best[text] = lp
        out.append(sorted(best.items(), key=lambda kv: kv[1], reverse=True)[:keep])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=4)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--keep", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_whisper("tiny.en")
    with tempfile.TemporaryDirectory() as d:
        n_per_split = -(-args.utterances // 3)
        manifest = prepare_data.build_demo_corpus(d, n=3000, seed=0, limit=n_per_split, progress=False)
        utts = prepare_data.read_manifest(manifest)[: args.utterances]
        audios = [load_audio(u.audio) for u in utts]
    seconds = sum(len(a) for a in audios) / SAMPLE_RATE
    print(f"{len(audios)} demo utterances ({seconds:.1f} s of audio), {args.samples} samples each, "
          f"{args.threads} threads, tiny.en on CPU")
    with torch.inference_mode():
        ours(model, tok, audios[:1], 2, 2)  # warm-up
        rates = {}
        for name, fn in (("ours (batched)", ours), ("baseline (one at a time)", baseline)):
            start = time.perf_counter()
            fn(model, tok, audios, args.samples, args.keep)
            elapsed = time.perf_counter() - start
            rates[name] = len(audios) / elapsed
            print(f"{name:<26} {rates[name]:8.3f} utterances/s  ({elapsed:.1f} s)")
    print(f"speed-up: {rates['ours (batched)'] / rates['baseline (one at a time)']:.1f}x")


if __name__ == "__main__":
    main()
