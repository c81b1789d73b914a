"""Whisper alone from the command line: the greedy transcript of any length, in 30 s windows, or the paper's
sampled n-best list with log-probs.

    python transcribe.py --audio x.wav                     # greedy transcript
    python transcribe.py --audio x.wav --model large-v2    # checkpoints/whisper-large-v2/ (see convert_checkpoint.py)
    python transcribe.py --audio x.wav --nbest 15          # the paper's sampled n-best, with total log-probs

Audio longer than 30 s is cut into consecutive 30 s windows, encoded as one batch and decoded window by window;
the texts are joined. The n-best list is the hypotheses Whispering-LLaMA corrects (200 samples at a temperature
drawn from [0.7, 0.8], deduplicated, the likeliest kept): one clip of at most 30 s, as in the paper.

This is a file of its own, not whisper_model.py's `__main__`, because loading a model by name needs the checkpoint
converter, which imports whisper_model.py: the model file holds only the model and imports no project file but
storage.py, with no import cycle.
"""
import argparse
import sys

import torch

import convert_checkpoint
import whisper_model as wm
from storage import ProjectError, first_line


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Transcribe an audio file with Whisper (greedy by default). Audio longer than 30 s is "
                    "decoded in consecutive 30 s windows (greedy only).")
    parser.add_argument("--audio", required=True, help="audio file (wav, flac, ogg, mp3 where supported)")
    parser.add_argument("--model", default="tiny.en",
                        help="model name (checkpoints/whisper-<name>/) or checkpoint folder; default tiny.en, "
                             "converted from the embedded weights on first use")
    parser.add_argument("--nbest", type=int, default=0,
                        help="print the ranked n-best list of this many sampled hypotheses (paper default 15)")
    parser.add_argument("--samples", type=int, default=200, help="samples drawn for --nbest")
    parser.add_argument("--temperature", type=float, nargs=2, default=(0.7, 0.8), metavar=("LO", "HI"),
                        help="sampling temperature range for --nbest")
    parser.add_argument("--top-k", type=int, default=None, help="top-k filtering when sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.nbest < 0 or args.samples < 1:
        parser.error("--nbest must be >= 0 and --samples >= 1")
    try:
        text = transcribe(args)
        if text or not args.nbest:  # an empty n-best prints nothing, an empty transcript an empty line
            print(text)
    except (ProjectError, OSError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def transcribe(args) -> str:
    """main's work: the greedy transcript of every 30 s window, joined, or the ranked n-best."""
    audio = wm.load_audio(args.audio)
    model, tokenizer = convert_checkpoint.load_whisper(args.model, device=args.device)
    pieces = wm.windows(audio)
    if args.nbest and len(pieces) > 1:
        raise wm.AudioError(f"{args.audio}: --nbest takes a clip of at most {wm.CHUNK_LENGTH} s")
    mel = torch.stack([wm.log_mel_spectrogram(w, model.dims.n_mels, device=args.device) for w in pieces])
    with torch.no_grad():
        features = model.embed_audio(mel)
    if args.nbest:
        nbest = wm.sample_nbest(model, tokenizer, features, args.samples, args.nbest, tuple(args.temperature),
                                seed=args.seed, top_k=args.top_k)
        return "\n".join(f"{i:3d}  {lp:9.3f}  {text}" for i, (text, lp) in enumerate(nbest, 1))
    return " ".join(wm.decode_greedy(model, tokenizer, features)).strip()


if __name__ == "__main__":
    main()
