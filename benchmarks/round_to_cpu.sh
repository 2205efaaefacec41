#!/usr/bin/env bash
# Does rounding the kept MLP width (lpt prune --round-to N) pay on this CPU?
#
#   THREADS=1 bash benchmarks/round_to_cpu.sh [OUT.json]     (default benchmarks/results/round_to_cpu.json)
#
# Times one forward pass over SEQ_LEN tokens (lpt bench runtime, random weights, float32, interleaved) of the
# TinyLlama-1.1B shape pruned 50% (hidden 2048, 16 query / 2 key-value heads, as `tinyllama-1.1b@0.5`), LAYERS of its
# 22 layers, with the MLP width set to 2816 (= 5632 * 0.5, a multiple of 128), 2815 and 2817 (odd), 2800 (a multiple
# of 16) and 2880 (a multiple of 64, not of 128): the widths --round-to 1 / 16 / 64 / 128 would produce or avoid.
# Then benchmarks/round_to_mlp_cpu.py times the MLP alone at more widths (multiples of 1, 2, 4, 8, 16, 64, 128),
# which separates the widths far better than the whole model on a shared machine (MLP_OUT, default
# benchmarks/results/round_to_cpu_mlp.json; skipped with DEVICE other than cpu).
# Environment: SEQ_LEN (512), TRIALS (7), WARMUP (1), THREADS (1), LAYERS (8), WORK (runs/round-to), DEVICE (cpu),
# DTYPE (float32; bfloat16 on cuda).
set -euo pipefail

OUT=${1:-benchmarks/results/round_to_cpu.json}
SEQ_LEN=${SEQ_LEN:-512}
TRIALS=${TRIALS:-7}
WARMUP=${WARMUP:-1}
THREADS=${THREADS:-1}
LAYERS=${LAYERS:-8}
WORK=${WORK:-runs/round-to}
DEVICE=${DEVICE:-cpu}
DTYPE=${DTYPE:-float32}
MLP_OUT=${MLP_OUT:-benchmarks/results/round_to_cpu_mlp.json}
WIDTHS=(2816 2815 2817 2800 2880)
mkdir -p "$WORK"

ARGS=()
for w in "${WIDTHS[@]}"; do
  cat > "$WORK/tinyllama-50-i$w.json" <<EOF
{"model_type": "llama", "hidden_size": 2048, "intermediate_size": $w, "num_hidden_layers": $LAYERS,
 "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 32000,
 "max_position_embeddings": 2048, "rms_norm_eps": 1e-05, "tie_word_embeddings": false}
EOF
  ARGS+=(--random-init "$WORK/tinyllama-50-i$w.json" --label "intermediate $w")
done

lpt bench runtime "${ARGS[@]}" --seq-len "$SEQ_LEN" --trials "$TRIALS" --warmup "$WARMUP" --threads "$THREADS" \
  --dtype "$DTYPE" --device "$DEVICE" --interleave --overwrite -o "$OUT"
if [ "$DEVICE" = cpu ]; then
  python "$(dirname "$0")/round_to_mlp_cpu.py" --threads "$THREADS" -o "$MLP_OUT"
fi
