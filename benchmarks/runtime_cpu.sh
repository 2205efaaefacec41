#!/usr/bin/env bash
# Runtime of smollm2-135m on this CPU: dense vs 20% and 50% uniform-pruned models, merged and unmerged,
# one forward pass over 2048 tokens at batch 1 (the protocol of the LoRAPrune paper's Table 3).
#
#   bash benchmarks/runtime_cpu.sh [PRUNE_20_DIR PRUNE_50_DIR]
#
# PRUNE_*_DIR are `lpt prune smollm2-135m --layout uniform --ratio 0.2 / 0.5` outputs (adapter + masks.json).
# Without them the script makes quick ones itself (calibrate -> prune for a few steps: the weights are then barely
# trained, which does not matter for runtime). Then, for each: slice (sliced base + sliced adapter = "unmerged")
# and merge the sliced adapter into the sliced base ("merged"), and time everything with `lpt bench runtime
# --interleave` (the models take turns, so background load on a shared machine hits them alike; memory is still
# measured per model in its own process). On a busy machine THREADS=1 gives steadier numbers.
#
# Environment: WORK (runs/bench-cpu), TRIALS (5), WARMUP (1), SEQ_LEN (2048), THREADS (0: torch's default),
# PRUNE_STEP=1 also runs `lpt bench prune-step` (lora / vanilla / plain LoRA, with and without int8).
# Steps whose output already exists in WORK are skipped, so a rerun only repeats the timing.
set -euo pipefail

WORK=${WORK:-runs/bench-cpu}
TRIALS=${TRIALS:-5}
WARMUP=${WARMUP:-1}
SEQ_LEN=${SEQ_LEN:-2048}
THREADS=${THREADS:-0}
MODEL=smollm2-135m
mkdir -p "$WORK"

P20=${1:-}
P50=${2:-}
if [ -z "$P20" ] || [ -z "$P50" ]; then
  [ -d "$WORK/calib" ] || lpt calibrate "$MODEL" --data builtin:pydoc:train -n 32 --seq-len 256 -o "$WORK/calib"
  for r in 20 50; do
    [ -d "$WORK/prune-$r" ] || lpt prune "$MODEL" --calib "$WORK/calib" --ratio "0.$r" --layout uniform \
      --max-steps 8 --batch-size 4 --micro-batch-size 2 --prune-freq 2 --warmup 0.1 --cooldown 0.2 \
      -o "$WORK/prune-$r"
  done
  P20=$WORK/prune-20
  P50=$WORK/prune-50
fi

for r in 20 50; do
  if [ "$r" = 20 ]; then P=$P20; else P=$P50; fi
  [ -d "$WORK/sliced-$r" ] || lpt slice "$MODEL" --masks "$P/masks.json" --adapter "$P" -o "$WORK/sliced-$r"
  [ -d "$WORK/merged-$r" ] || lpt merge "$WORK/sliced-$r" --adapter "$WORK/sliced-$r/adapter" -o "$WORK/merged-$r"
done

lpt bench runtime "$MODEL" "$MODEL" "$WORK/merged-20" "$WORK/sliced-20" "$WORK/merged-50" "$WORK/sliced-50" \
  --adapter - --adapter "$P50" --adapter - --adapter "$WORK/sliced-20/adapter" \
  --adapter - --adapter "$WORK/sliced-50/adapter" \
  --label dense --label "dense unmerged" --label "20% merged" --label "20% unmerged" \
  --label "50% merged" --label "50% unmerged" \
  --seq-len "$SEQ_LEN" --batch-size 1 --trials "$TRIALS" --warmup "$WARMUP" --threads "$THREADS" \
  --interleave --plot --overwrite -o "$WORK/runtime_cpu.json"

# The goal of the issue: merged latency ratio (pruned / dense) <= FLOP ratio + 5 points; unmerged slower than merged.
python - "$WORK/runtime_cpu.json" <<'EOF'
import json
import sys

doc = json.load(open(sys.argv[1]))
rows = {r["label"]: r for r in doc["results"] if r["batch_size"] == 1}
dense = rows["dense"]["latency_s"]
# ratios of medians, and of minima (the least disturbed run: the better estimate on a shared machine)
print(f"{'model':16} {'median s':>9} {'min s':>8} {'ratio(med)':>10} {'ratio(min)':>10} {'FLOPs':>7} {'params':>7}  check")
for label, r in rows.items():
    lat, rel = r["latency_s"], r["relative"]
    rmin = lat["min"] / dense["min"]
    check = ""
    if label.endswith("merged") and not label.endswith("unmerged") and label != "dense":
        ok = rel["latency"] <= rel["flops_per_token"] + 0.05
        ok_min = rmin <= rel["flops_per_token"] + 0.05
        check = f"ratio <= FLOP ratio + 0.05: median {'yes' if ok else 'NO'}, min {'yes' if ok_min else 'NO'}"
    if label.endswith("% unmerged"):
        merged = rows[label.replace("unmerged", "merged")]["latency_s"]
        check = (f"vs merged: median {(lat['median'] / merged['median'] - 1) * 100:+.0f}%, "
                 f"min {(lat['min'] / merged['min'] - 1) * 100:+.0f}%")
    print(f"{label:16} {lat['median']:9.3f} {lat['min']:8.3f} {rel['latency']:10.3f} {rmin:10.3f} "
          f"{rel['flops_per_token']:7.3f} {rel['params']:7.3f}  {check}")
EOF

if [ "${PRUNE_STEP:-0}" = 1 ]; then
  lpt bench prune-step "$MODEL" --criterion lora --criterion vanilla --plain-lora --8bit --seq-len 256 \
    --batch-size 2 --trials 3 --warmup 1 --threads "$THREADS" --plot --overwrite -o "$WORK/prune_step_cpu.json"
fi
