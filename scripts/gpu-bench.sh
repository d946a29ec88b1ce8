#!/usr/bin/env bash
# The one prepared script for a GPU session (the device machine: PyTorch 2.11 cu130 + transformers, no Rust).
# Build here first and carry the binaries in gpu-bin/ (ignored by git):
#
#   cargo build --release -p trainer --bin train -p rollout --bin rollout-bench
#   mkdir -p gpu-bin && strip -o gpu-bin/train target/release/train && strip -o gpu-bin/rollout-bench target/release/rollout-bench
#   # optional, NCCL: in a clone with `scripts/libtorch.sh cuda`, build `train` and example `nccl_check` with
#   # `--features trainer/nccl` and strip them to gpu-bin/train-nccl and gpu-bin/nccl_check
#
# then run `bash scripts/gpu-bench.sh` there (carry gpu-bin). It runs, with output under $OUT:
#   1. scripts/gpu-check.sh: CUDA through the preload rule, smoke test on cuda and cpu, NCCL at world size 1;
#   2. scripts/bench/generate_gpu.py: rollout engine vs transformers generate, Qwen2.5-0.5B shape, bf16,
#      batch 64/128/256 x 512 new tokens, against the memory-bandwidth floor;
#   3. the demo recipe (four stages) on cuda in fp32, then a shortened one under bf16 autocast;
#   4. with SHARDING_BENCH=1 (issue 20, item 6; about 3 minutes more): scripts/bench/sharding_gpu.py, peak GPU
#      memory and step time of each [run] sharding mode at Phi-4-mini's shape, world size 1, next to the plan.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT" target/release
export OUT
for b in train rollout-bench train-nccl nccl_check; do
  [ -x "gpu-bin/$b" ] && cp "gpu-bin/$b" "target/release/$b"
done
TL=$(python3 -c 'import os,torch;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
stamp "gpu-check"
timeout 120 bash scripts/gpu-check.sh
stamp "generate_gpu"
PYTHONUNBUFFERED=1 timeout "${GEN_TIMEOUT:-240}" python3 scripts/bench/generate_gpu.py \
  --whet-bin target/release/rollout-bench --out "$OUT" ${GEN_ARGS:-} 2>&1 | tee "$OUT/generate_gpu.txt"
stamp "demo fp32"
export LD_LIBRARY_PATH="$TL"
( time timeout "${DEMO_TIMEOUT:-130}" ./target/release/train --recipe recipes/demo.toml --output /tmp/demo-cuda \
    --set model.device=cuda ) > "$OUT/demo-cuda.txt" 2>&1
echo "exit $?" >> "$OUT/demo-cuda.txt"
stamp "demo bf16 autocast (shortened)"
( time timeout 80 ./target/release/train --recipe recipes/demo.toml --output /tmp/demo-cuda-bf16 --set model.device=cuda \
    --set model.mixed_precision=bf16 --set stage.0.max_steps=200 --set stage.1.max_steps=60 \
    --set stage.3.max_steps=10 ) > "$OUT/demo-cuda-bf16.txt" 2>&1
echo "exit $?" >> "$OUT/demo-cuda-bf16.txt"
if [ "${SHARDING_BENCH:-0}" = 1 ]; then
  stamp "sharding modes at Phi-4-mini's shape"
  PYTHONUNBUFFERED=1 timeout "${SHARDING_TIMEOUT:-240}" python3 scripts/bench/sharding_gpu.py \
    --train target/release/train --out "$OUT" 2>&1 | tee "$OUT/sharding_gpu.txt"
fi
stamp "done"
grep -h -E "accuracy|error|exit|real" "$OUT"/demo-cuda*.txt | tail -20
