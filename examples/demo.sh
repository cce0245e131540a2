#!/usr/bin/env bash
# The main job end to end on a 2-core CPU (`make demo` runs this after setting up .venv and the assets):
# fine-tune the real SmolLM2-135M-Instruct on the Alpaca seed tasks, evaluate base vs tuned on the held-out
# test split, fuse the adapter into a Hugging Face model dir, and generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/demo}
rm -rf "$RUN"                                   # the demo always starts fresh

echo "== 1/4 train: mlxtune train -c configs/demo.yaml --output_dir $RUN"
mlxtune train -c configs/demo.yaml --output_dir "$RUN"

echo "== 2/4 evaluate base vs tuned on the held-out test split"
mlxtune eval --adapter "$RUN" --split test --compare --max-tokens 64 --out "$RUN/eval"

echo "== 3/4 fuse the adapter into the base: $RUN/fused (a Hugging Face dir; transformers and mlx-lm load it)"
mlxtune fuse "$RUN" --out "$RUN/fused"

echo "== 4/4 generate from the fused model"
mlxtune generate --model "$RUN/fused" --max-tokens 80 \
  --prompt "Give three tips for staying focused while studying."

echo
echo "Done. Everything is in $RUN:"
echo "  config.yaml, adapters.safetensors + adapter_config.json   the run and its adapter"
echo "  metrics.jsonl, loss.png                                 training curve"
echo "  checkpoints/                                            resumable state (mlxtune train ... --resume)"
echo "  eval/report.md, eval/report.json, eval/metrics.png      base vs tuned"
echo "  fused/                                                  merged model"
