"""Correction latency of `generate.py --audio` on this machine, stage by stage: fp32 against bf16, in one run.

    python bench/generate_latency.py                       # jfk.flac from ../shared/fixtures, else an eSpeak clip
    python bench/generate_latency.py --audio x.wav --threads 2 --repeats 3

Two measurements per precision, each in a fresh process (an import or a lazy first call is paid once per
process, as a user pays it):
    end to end   the wall time of `python generate.py --audio CLIP --dtype D` (warm start: the models are
                 already converted under checkpoints/), median of --repeats runs;
    stages       the same work done step by step with a clock around each: import, load (Whisper + adapter +
                 LLM), features (read, log-mel, encoder), 1-best (greedy), n-best (the paper's 200 samples
                 → 15), prefill (the prompt in one pass, audio keys/values included), decode (one token
                 per pass; tokens/s) and likeliest (--decode likeliest, the default: the greedy output and the
                 n-best scored by the adapter model, after a second prefill).
Printed: a table of the stages for each precision, and bf16's speed-up over fp32 for each; the corrected
text of both, so that a change of output is seen. Then the load stage against its previous path (models built
under `torch.device("meta")` alone instead of storage.empty_init, whose skipped init draws keep torch from
importing torch._dynamo), in fresh processes of the last precision.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "jfk.flac"
DEMO_SENTENCE = "I would like a one way flight from Boston to Denver on the fourth of July after 10 a.m."
STAGES = ("import", "load", "features", "1-best", "n-best", "prefill", "decode", "likeliest")


def stages(audio_path: str, dtype_name: str, threads: int, meta_only=False) -> dict:
    """Seconds per stage of one correction, in this (fresh) process. meta_only: build the models on the meta
    device alone, the path before storage.empty_init (patched in before any project file imports it)."""
    t0 = time.perf_counter()
    import torch

    sys.path.insert(0, str(ROOT))
    if meta_only:
        import storage

        storage.empty_init = lambda: torch.device("meta")
    import convert_checkpoint
    import generate as g
    import whisper_model as wm
    from prepare_data import encode_prompt, select_hypotheses

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    seconds, clock = {}, [t0]

    def lap(name):
        now = time.perf_counter()
        seconds[name] = now - clock[0]
        clock[0] = now

    lap("import")
    hyp_model, hyp_tok = convert_checkpoint.load_whisper("tiny.en")
    wl, tok = g.load_wl(g.default_adapter(), whisper=hyp_model, dtype=dtype)
    lap("load")
    with torch.inference_mode():
        audio = wm.load_audio(audio_path)
        feats = hyp_model.embed_audio(wm.log_mel_spectrogram(audio, hyp_model.dims.n_mels)[None])
        lap("features")
        one_best = wm.decode_greedy(hyp_model, hyp_tok, feats)[0]
        lap("1-best")
        drawn = wm.sample_candidates(hyp_model, hyp_tok, feats, n_samples=200, seed=1234)
        hyps, _, _ = select_hypotheses(drawn["samples"], None, wl.hypothesis_form, keep=15)
        lap("n-best")
        # generate.generate, split at the prefill so that each part has its own clock.
        ids = encode_prompt(tok, hyps)
        T, frames = len(ids), wm.encoder_frames(len(audio))
        wl.set_kv_cache(batch_size=1, max_seq_length=T + 150)
        logits = g.prefill(wl, ids, feats.to(dtype), frames)
        lap("prefill")
        out, done = [], g.first_line_done(tok)
        for pos in range(T, T + 150):
            nxt = int(logits.argmax())
            if nxt == tok.eos_id:
                break
            out.append(nxt)
            if done(out):  # the transcript's line is complete, as generate.correct stops
                break
            logits = wl(torch.tensor([[nxt]]), input_pos=torch.tensor([pos]))[0, -1]
        lap("decode")
        wl.clear_kv_cache()
        greedy = g.response_text(tok.decode(torch.tensor(out, dtype=torch.long)))
        corrected = g.likeliest(wl, tok, hyps, feats.to(dtype), greedy, frames)
        lap("likeliest")
    return dict(seconds=seconds, tokens=len(out), prompt_tokens=T, one_best=one_best, corrected=corrected,
                greedy=greedy, dynamo_imported="torch._dynamo" in sys.modules)


def end_to_end(audio_path: str, dtype_name: str, threads: int) -> tuple:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--audio", audio_path, "--dtype", dtype_name],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"generate.py failed: {r.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - t, r.stdout.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio", default=None, help="clip to correct (default: jfk.flac, else an eSpeak clip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: the stages of one dtype
    parser.add_argument("--meta-only", action="store_true", help=argparse.SUPPRESS)  # internal: the old build
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(stages(args.audio, args.one, args.threads, args.meta_only)))
        return
    audio = args.audio
    if audio is None:
        if FIXTURE.is_file():
            audio = str(FIXTURE)
        else:
            sys.path.insert(0, str(ROOT))
            from generate import say
            audio = str(say(DEMO_SENTENCE))
    print(f"clip: {audio}; {args.threads} threads; median of {args.repeats}")
    rows = {}
    for d in args.dtypes:
        runs = fresh_runs(args, audio, d)
        walls = [end_to_end(audio, d, args.threads) for _ in range(args.repeats)]
        med = {s: statistics.median(r["seconds"][s] for r in runs) for s in STAGES}
        rows[d] = dict(stages=med, tokens=runs[0]["tokens"], prompt_tokens=runs[0]["prompt_tokens"],
                       corrected=runs[0]["corrected"], one_best=runs[0]["one_best"], greedy=runs[0]["greedy"],
                       wall=statistics.median(w for w, _ in walls), cli=walls[0][1])
    print_stages(rows, args.dtypes)
    print_load_comparison(args, audio, rows)


def fresh_runs(args, audio: str, d: str, *extra) -> list:
    """stages() of dtype d, --repeats times, each in a fresh process."""
    runs = []
    for _ in range(args.repeats):
        r = subprocess.run([sys.executable, __file__, "--one", d, "--audio", audio, "--threads",
                            str(args.threads), *extra], capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(r.stderr.strip().splitlines()[-1])
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return runs


def print_stages(rows: dict, dtypes: list):
    """The table of stages per dtype with the speed-up over the first, then each dtype's tokens/s and texts."""
    base = dtypes[0]
    print(f"\n| stage | " + " | ".join(dtypes) + f" | speed-up vs {base} |")
    print("|---|" + "---:|" * (len(dtypes) + 1))
    for s in STAGES + ("sum of stages", "end to end (CLI)"):
        def val(d):
            st = rows[d]["stages"]
            return sum(st.values()) if s == "sum of stages" else rows[d]["wall"] if s.startswith("end") else st[s]
        ratios = " / ".join(f"{val(base) / val(d):.2f}×" for d in dtypes[1:])
        print(f"| {s} | " + " | ".join(f"{val(d):.2f} s" for d in dtypes) + f" | {ratios} |")
    for d in dtypes:
        r = rows[d]
        tps = r["tokens"] / r["stages"]["decode"] if r["stages"]["decode"] else float("nan")
        print(f"\n{d}: prompt {r['prompt_tokens']} tokens, prefill {r['prompt_tokens'] / r['stages']['prefill']:.0f} "
              f"tok/s; decode {r['tokens']} tokens at {tps:.1f} tok/s")
        print(f"  1-best:    {r['one_best'].strip()}")
        print(f"  greedy:    {r['greedy']}")
        print(f"  likeliest: {r['corrected']}")
        print(f"  CLI:       {r['cli']}")


def print_load_comparison(args, audio: str, rows: dict):
    """The load stage of the last dtype against its previous path (models built on the meta device alone)."""
    d = args.dtypes[-1]
    old = fresh_runs(args, audio, d, "--meta-only")
    load_old = statistics.median(r["seconds"]["load"] for r in old)
    load_new = rows[d]["stages"]["load"]
    print(f"\nload ({d}): meta device alone {load_old:.2f} s (torch._dynamo imported: "
          f"{old[0]['dynamo_imported']}), storage.empty_init {load_new:.2f} s: {load_old / load_new:.2f}×, "
          f"{load_old - load_new:.2f} s less")


if __name__ == "__main__":
    main()
