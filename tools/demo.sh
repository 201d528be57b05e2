#!/usr/bin/env bash
# The demo: set up, then pre-train a tiny MAE on the shipped Fashion-MNIST shards on the CPU with
# 2 ranks under ZeRO-2 (a few minutes), and print the representation check against the baselines.
# Extra arguments are config overrides, e.g.  bash tools/demo.sh train.steps=600
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh
RUN_DIR="${RUN_DIR:-runs/demo}"
for arg in "$@"; do
  case "$arg" in
    run.dir=*) echo "[demo] error: set the run folder with RUN_DIR=... (not $arg)" >&2; exit 2 ;;
  esac
done
case "${RESUME:-0}" in 1 | true | yes) resume=1 ;; *) resume="" ;; esac
if [ -d "$RUN_DIR/checkpoints" ] && [ -z "$resume" ]; then
  # only a folder this script made (or its default one) is ever deleted
  if [ ! -e "$RUN_DIR/.made_by_demo" ] && [ "$RUN_DIR" != runs/demo ]; then
    echo "[demo] error: $RUN_DIR holds a run this demo did not make: set RESUME=1 to continue it, or pick another RUN_DIR" >&2
    exit 2
  fi
  echo "[demo] $RUN_DIR already holds a demo run: starting a new one (set RESUME=1 to continue it instead)"
  rm -rf "$RUN_DIR"
fi
if [ ! -e "$RUN_DIR" ]; then mkdir -p "$RUN_DIR" && touch "$RUN_DIR/.made_by_demo"; fi
torchrun --nproc_per_node 2 --master_port "${MASTER_PORT:-29511}" -m largemim.train \
  --config largemim/recipes/mae_tiny_cpu.yaml run.dir="$RUN_DIR" ds_config=ds_configs/zero2.json "$@"
echo
echo "[demo] run folder: $RUN_DIR (metrics.jsonl, eval.jsonl, reconstructions/*.png, tb/, checkpoints/)"
echo "[demo] newest reconstruction: $(ls "$RUN_DIR"/reconstructions/*.png | tail -n 1)"
echo "[demo] TensorBoard: tensorboard --logdir $RUN_DIR/tb"
