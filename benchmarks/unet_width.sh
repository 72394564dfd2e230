#!/usr/bin/env bash
# The UNet-width question of the quality sweep, which bench quality cannot ask (its variants share one
# teacher): train a teacher of another width, distil it with the default settings and evaluate both,
# on the prepared data and FID classifier of `dvc repro` (run it first). Usage:
#   benchmarks/unet_width.sh OUT_DIR '[32, 64]'
# Prints OUT_DIR/evaluate.json; compare with metrics/evaluate.json (same seeds, same feature network) and
# the training seconds in OUT_DIR/*_loss.csv with metrics/*_loss.csv. Tracking is off: nothing is registered.
set -euo pipefail
out=${1:?output folder}
channels=${2:?block_out_channels, e.g. '[32, 64]'}
export SFDDM_TRACKING=off
width=(--set "teacher.unet.block_out_channels=$channels")
sfddm train-teacher "${width[@]}" --data data/prepared --out "$out/teacher" --loss-csv "$out/teacher_loss.csv" \
  --checkpoint-dir "$out/checkpoints/teacher"
sfddm sample-teacher "${width[@]}" --teacher "$out/teacher" --out "$out/samples"
sfddm distill "${width[@]}" --teacher "$out/teacher" --data data/prepared --out "$out/student" \
  --loss-csv "$out/distill_loss.csv" --checkpoint-dir "$out/checkpoints/distill"
sfddm evaluate "${width[@]}" --teacher "$out/teacher" --student "$out/student" --teacher-samples "$out/samples" \
  --data data/prepared --classifier data/classifier.pt --metrics "$out/evaluate.json" --reports "$out/reports"
