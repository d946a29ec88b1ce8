#!/usr/bin/env bash
# Peak resident memory of `train` with and without activation checkpointing: SFT on packed rows of 2048
# tokens (one row per step) with a 12.7M-parameter Llama (hidden 256, 8 layers), 3 steps, fp32, CPU.
# Usage: bash scripts/bench/checkpointing.sh [path/to/train]   (needs GNU time at /usr/bin/time)
set -euo pipefail
TRAIN=${1:-target/release/train}
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
cat > "$DIR/recipe.toml" <<'TOML'
[model]
config = { model_type = "llama", vocab_size = 260, hidden_size = 256, intermediate_size = 688, num_hidden_layers = 8, num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 4096, tie_word_embeddings = true }
init_seed = 7
tokenizer = "builtin:bytes"
device = "cpu"

[run]
seed = 3
threads = 2
log_every = 1

[[stage]]
kind = "sft"
name = "long"
synthetic = { count = 120, arithmetic = { seed = 5 } }
tokenize = { max_length = 2048 }
packing = true
max_steps = 3
batch_size = 1
lr = 1e-4
TOML
for gc in false true false true; do
  /usr/bin/time -f "gradient_checkpointing=$gc  max RSS %M KiB  wall %e s" \
    "$TRAIN" --recipe "$DIR/recipe.toml" --output "$DIR/out-$gc" --resume never \
    --set stage.0.gradient_checkpointing=$gc 2>&1 | grep -E "max RSS|step 3/3"
done
