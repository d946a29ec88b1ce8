#!/usr/bin/env bash
# One prepared run for a GPU machine (PyTorch 2.11 cu130 installed, no Rust): checks that the CPU-built
# `train` binary finds CUDA through the machine's torch (the preload rule), runs the smoke test on the GPU and,
# when present, the generation benchmark in bf16. Build here first (`cargo build --release -p trainer -p rollout`)
# and carry target/release/train and target/release/rollout-bench. Output goes to $OUT (default ./gpu-out).
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
head -3 "$OUT"/smoke-cuda.txt
