#!/usr/bin/env bash
# The README's ablation rows: the WL-M recipe with one change each, 2 epochs (18 steps), then greedy decoding of
# the demo test split with bf16 weights. Run from the repository root after
#   python prepare_data.py --limit 300 --samples-from samples/demo-300.jsonl.xz --out data/demo300
# Resumable: rerun it after a stop (a finished training run says "nothing to do", a finished table is kept).
# About 17 minutes a row on 2 CPU cores (the full-frames row ~25).
set -u
cd "$(dirname "$0")/.."
run() {
  name=$1; shift
  out=out/abl-$name
  if [ -f $out/state.ckpt ]; then python train.py --out $out --resume --threads 2
  else python train.py --data data/demo300 --out $out --precision bf16 --epochs 2 --dev-limit 20 --threads 2 "$@"; fi
  [ -f out/eval/abl-$name.md ] || python evaluate.py --data data/demo300 --adapter $out/best.safetensors \
    --out out/eval/abl-$name.md --threads 2 --dtype bfloat16
}
for spec in "wl-m --trim-audio" "random-audio --trim-audio --random-audio" "random-init --trim-audio --random-init" \
            "no-mask --trim-audio --no-mask" "full-frames" "paper-layout --trim-audio --kv-layout paper" \
            "wl-s --trim-audio --variant S" "wl-l --trim-audio --variant L" "text-big --no-whisper --prompt-length 40"; do
  run $spec > out/abl-$(echo $spec | cut -d' ' -f1).log 2>&1
done
