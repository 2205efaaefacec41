#!/usr/bin/env bash
# The checks for a CUDA machine (issue #12, "ready for a real 7B-70B run"), kept ready to run as they are.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]                   # on a CUDA machine: llama-7b shapes, bfloat16
#   DEVICE=cpu SHAPE=tiny bash benchmarks/gpu_check.sh OUT   # smoke run of the same commands on CPU (tiny shape)
#
# It needs torch, transformers, peft, accelerate, typer and rich (pip install -e .), and nothing else: bitsandbytes,
# datasets, lm-eval and gguf may be absent (the --8bit rows run only when bitsandbytes imports). No download: every
# model has random weights at a real shape, and the torchrun prune uses a tiny model and tokenizer built here.
#   1. lpt bench prune-step --random-init SHAPE: criteria lora and vanilla (and fisher when lpt has it), plain LoRA,
#      bfloat16, with --8bit only if bitsandbytes imports           -> OUT/prune-step.json
#   2. lpt bench runtime at 2048 tokens: dense vs 50% merged vs 50% unmerged (--random-init SHAPE / SHAPE@0.5,
#      random rank-8 adapter)                                         -> OUT/runtime.json
#   3. torchrun --nproc_per_node NPROC -m lpt prune on a tiny random model, inline calibration from
#      builtin:pydoc:train                                            -> OUT/prune-ddp/ (launch record printed)
#      With NPROC=1 (the default) lpt runs as one process and creates no process group (backend None); NPROC=2
#      on a machine with 2 GPUs exercises nccl (NCCL refuses two ranks on one GPU; on CPU NPROC=2 uses gloo).
#
# Environment: DEVICE (cuda), SHAPE (llama-7b; 'tiny' = a 2-layer Llama; or any --random-init shape / config
# JSON), DTYPE (bfloat16 on cuda, float32 on cpu), SEQ_LEN (2048, runtime), STEP_SEQ_LEN (256, prune-step),
# BATCH (4, prune-step), TRIALS (runtime 20 on cuda / 2 on cpu), STEP_TRIALS (prune-step 5 / 1), NPROC (1).
set -euo pipefail

OUT=${1:-runs/gpu-check}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-llama-7b}
if [ "$DEVICE" = cpu ]; then DEF_DTYPE=float32; DEF_TRIALS=2; DEF_STEP_TRIALS=1; DEF_SEQ=128
else DEF_DTYPE=bfloat16; DEF_TRIALS=20; DEF_STEP_TRIALS=5; DEF_SEQ=2048; fi
DTYPE=${DTYPE:-$DEF_DTYPE}
SEQ_LEN=${SEQ_LEN:-$DEF_SEQ}
STEP_SEQ_LEN=${STEP_SEQ_LEN:-256}
BATCH=${BATCH:-4}
TRIALS=${TRIALS:-$DEF_TRIALS}
STEP_TRIALS=${STEP_TRIALS:-$DEF_STEP_TRIALS}
NPROC=${NPROC:-1}
PY=${PYTHON:-python}
mkdir -p "$OUT"

echo "== environment"
$PY - <<'EOF'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("transformers", "peft", "accelerate", "typer", "rich", "bitsandbytes", "datasets", "lm_eval", "gguf"):
    print(f"  {m:13s}", "present" if importlib.util.find_spec(m) else "absent")
EOF
if [ "$DEVICE" != cpu ]; then
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run with DEVICE=cpu')"
fi

if [ "$SHAPE" = tiny ]; then
  SHAPE=$OUT/tiny-shape.json
  cat > "$SHAPE" <<'EOF'
{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
 "max_position_embeddings": 2048, "tie_word_embeddings": false}
EOF
fi

echo "== 1. prune-step cost ($SHAPE, $DTYPE, $DEVICE)"
CRIT=(--criterion lora --criterion vanilla)
if $PY -c "import sys; from lpt import importance; sys.exit(0 if 'fisher' in importance.CRITERIA else 1)"; then
  CRIT+=(--criterion fisher)
fi
EIGHT=()
if $PY -c "import bitsandbytes" >/dev/null 2>&1; then EIGHT=(--8bit); else echo "bitsandbytes absent: no --8bit rows"; fi
lpt bench prune-step --random-init "$SHAPE" "${CRIT[@]}" --plain-lora ${EIGHT[@]+"${EIGHT[@]}"} \
  --seq-len "$STEP_SEQ_LEN" --batch-size "$BATCH" --trials "$STEP_TRIALS" --warmup 1 \
  --dtype "$DTYPE" --device "$DEVICE" --overwrite -o "$OUT/prune-step.json"

echo "== 2. runtime at $SEQ_LEN tokens: dense vs 50% merged vs 50% unmerged"
lpt bench runtime --random-init "$SHAPE" --random-init "$SHAPE@0.5" --random-init "$SHAPE@0.5" \
  --adapter - --adapter - --adapter random:8 --label dense --label "50% merged" --label "50% unmerged" \
  --seq-len "$SEQ_LEN" --trials "$TRIALS" --warmup 2 --dtype "$DTYPE" --device "$DEVICE" --overwrite \
  -o "$OUT/runtime.json"

echo "== 3. torchrun --nproc_per_node $NPROC -m lpt prune (tiny random model)"
$PY - "$OUT/tiny-model" <<'EOF'
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from lpt.data import pydoc_topics

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
tok = Tokenizer(models.BPE(unk_token=None))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator((t for _, t in pydoc_topics()), trainers.BpeTrainer(
    vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False))
PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                        pad_token="</s>").save_pretrained(out)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
print("tiny model in", out)
EOF
torchrun --standalone --nproc_per_node "$NPROC" -m lpt prune "$OUT/tiny-model" --data builtin:pydoc:train -n 16 \
  --seq-len 64 --max-steps 4 --batch-size 4 --micro-batch-size 2 --ratio 0.2 --prune-freq 2 \
  --device "$DEVICE" --overwrite -o "$OUT/prune-ddp"
$PY -c "import json, sys; c = json.load(open(sys.argv[1])); print('launch:', c.get('launch'))" \
  "$OUT/prune-ddp/lpt_config.json"

echo "== done: $OUT/prune-step.json $OUT/runtime.json $OUT/prune-ddp/"
