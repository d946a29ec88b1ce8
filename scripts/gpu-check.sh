#!/usr/bin/env bash
# One prepared run for a GPU machine (PyTorch 2.11 cu130 installed, no Rust): checks that the CPU-built
# `train` binary finds CUDA through the machine's torch (the preload rule), runs the smoke test on the GPU and,
# when present, the generation benchmark in bf16. Build here first (`cargo build --release -p trainer -p rollout`)
# and carry target/release/train and target/release/rollout-bench; for the NCCL checks also nccl_check and
# train-nccl (below). Output goes to $OUT (default ./gpu-out).
set -uo pipefail
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TL=$("$PY" -c 'import os,torch;print(os.path.join(os.path.dirname(torch.__file__),"lib"))' 2>/dev/null \
     || dirname "$(find / -path '*site-packages/torch/lib/libtorch_cuda.so' 2>/dev/null | head -1)")
echo "torch lib: $TL" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/env.txt" 2>&1
ldd --version | head -1 >> "$OUT/env.txt"
export LD_LIBRARY_PATH="$TL"
./target/release/train --device cuda smoke --tokens 64 > "$OUT/smoke-cuda.txt" 2>&1; echo "smoke exit $?" >> "$OUT/smoke-cuda.txt"
./target/release/train --device cpu smoke --tokens 16 > "$OUT/smoke-cpu.txt" 2>&1; echo "smoke exit $?" >> "$OUT/smoke-cpu.txt"
if [ -x ./target/release/rollout-bench ]; then
  ./target/release/rollout-bench --help > "$OUT/rollout-bench-help.txt" 2>&1
fi
# NCCL at world size 1 (one GPU allows no more): binaries built here with the `nccl` feature after
# `scripts/libtorch.sh cuda` (README, "Data parallelism", GPU) and carried as target/release/nccl_check and
# target/release/train-nccl. Both need libtorch_cuda (NEEDED), found through LD_LIBRARY_PATH above.
if [ -x ./target/release/nccl_check ]; then
  NCCL_DEBUG=WARN timeout 300 ./target/release/nccl_check > "$OUT/nccl-check.txt" 2>&1
  echo "nccl_check exit $?" >> "$OUT/nccl-check.txt"
fi
if [ -x ./target/release/train-nccl ]; then
  run=$(mktemp -d)
  cat > "$run/recipe.toml" <<'EOF'
[model]
config = { model_type = "qwen2", vocab_size = 260, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 256, tie_word_embeddings = true }
init_seed = 7
tokenizer = "builtin:bytes"
device = "cuda"

[[stage]]
kind = "sft"
synthetic = { count = 8, arithmetic = { seed = 5 } }
tokenize = { max_length = 96 }
max_steps = 2
batch_size = 2
lr = 2e-3
EOF
  port=$("$PY" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])' 2>/dev/null || echo 29641)
  RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port NCCL_DEBUG=WARN timeout 300 \
    ./target/release/train-nccl --recipe "$run/recipe.toml" --output "$run/out" > "$OUT/nccl-train.txt" 2>&1
  echo "train-nccl exit $?" >> "$OUT/nccl-train.txt"
  rm -rf "$run"
fi
head -3 "$OUT"/smoke-cuda.txt
for f in "$OUT"/nccl-check.txt "$OUT"/nccl-train.txt; do [ -e "$f" ] && tail -2 "$f"; done
