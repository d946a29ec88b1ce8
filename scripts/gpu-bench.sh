#!/usr/bin/env bash
# The one prepared script for a GPU session (the device machine: PyTorch 2.11 cu130 + transformers, no Rust, no
# network). Issue 21's measurements, in the order they matter, each part under its own time limit so that the
# default run stays within ~9.5 minutes; PARTS picks a subset (comma-separated), e.g. PARTS=graphs,gen05.
#
#   check   scripts/gpu-check.sh: CUDA through the preload rule, smoke tests on cuda and cpu             (~40 s)
#   graphs  CUDA-graph replay against eager static decoding (same kernels: tokens must agree), 0.5B shape (~40 s)
#   gen05   generation, Qwen2.5-0.5B shape, batch 64/128/256 × 512 new tokens: static decoding with CUDA
#           graphs, the dynamic path and transformers, against the bandwidth floor                    (~150 s)
#   train   SFT steps at the 0.5B / 1.5B / Phi-4-mini shapes (rows of 4K and 16K tokens; Phi-4-mini 4K, 8K)
#           and a GRPO step split at the 1.5B shape: tokens/s, MFU, peak memory                       (~150 s)
#   gsm8k   recipes/smollm2-gsm8k.toml on the real SmolLM2-135M-Instruct: greedy accuracy on all 1,319 GSM8K
#           test problems before and after SFT and GRPO (GRPO_STEPS, default 20), then pass@1 at T 0.6  (~200 s)
#   gen15   generation at the 1.5B shape (batch 64/128/256) and                                        (~90 s)
#   genphi  at Phi-4-mini's shape (batch 64)                                                            (~90 s)
#   demo    the demo recipe's four stages on cuda (fp32), the regression check of earlier GPU sessions      (~60 s)
#   sharding  issue 20, item 6: scripts/bench/sharding_gpu.py, each [run] sharding mode at Phi-4-mini's shape,
#           world size 1, peak memory and step time next to the plan                                  (~180 s)
#
# Default PARTS: check,graphs,gen05,train,gsm8k (≈ 9.5 min); gen15 and genphi in a second call.
#
# What travels (the working tree plus carried paths: 64 MiB at most). Build here first:
#
#   cargo build --release -p trainer --bin train -p rollout --bin rollout-bench
#   mkdir -p gpu-bin && strip -o gpu-bin/train target/release/train && strip -o gpu-bin/rollout-bench target/release/rollout-bench
#   bash scripts/gpu-stage.sh        # gpu-assets/: GSM8K's two files and the SmolLM2 GGUF in parts (see there)
#   # optional, NCCL (part check runs them when present): in a clone with `scripts/libtorch.sh cuda`, build `train`
#   # and example `nccl_check` with `--features trainer/nccl` and strip them to gpu-bin/train-nccl and gpu-bin/nccl_check
#
# and carry gpu-bin and gpu-assets/gsm8k. The SmolLM2 weights (a 98 MB GGUF) exceed one call's limit: the staging
# calls that scripts/gpu-stage.sh prints copy its parts to /tmp/whet-assets on the warm machine first; without
# them the gsm8k part says so and is skipped.
#
# Results: $OUT/summary.md (every part's table) and $OUT/results.tgz (all logs and JSON lines); the tool returns
# at most 8 files.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-./gpu-out}"
W="$OUT/work"
mkdir -p "$W" target/release
for b in train rollout-bench train-nccl nccl_check; do
  [ -x "gpu-bin/$b" ] && cp "gpu-bin/$b" "target/release/$b"
done
PARTS=",${PARTS:-check,graphs,gen05,train,gsm8k},"
TL=$(python3 -c 'import os,torch;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
export LD_LIBRARY_PATH="$TL" PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$W/timeline.txt"; }
want() { [[ "$PARTS" == *",$1,"* ]]; }
summary="$OUT/summary.md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$W/gpu.txt" 2>&1
echo "# gpu-bench $(date -u +%FT%TZ) on $(head -1 "$W/gpu.txt"), parts ${PARTS//,/ }" > "$summary"
section() { printf '\n## %s\n\n' "$1" >> "$summary"; }

if want check; then
  stamp "check"
  OUT="$W" timeout "${CHECK_TIMEOUT:-60}" bash scripts/gpu-check.sh > "$W/gpu-check.txt" 2>&1
  section "check"
  grep -h "exit" "$W"/smoke-*.txt >> "$summary" 2>/dev/null
fi

if want graphs; then
  stamp "graphs"
  timeout "${GRAPHS_TIMEOUT:-60}" python3 scripts/bench/generate_gpu.py --whet-bin target/release/rollout-bench --out "$W" \
    --shape qwen0.5b --batches 64 --new-tokens 256 --check-graphs --sides "" > "$W/graphs.txt" 2>&1
  section "CUDA-graph replay vs eager static decoding (0.5B shape, batch 64, 256 tokens)"
  grep -h "graph replay" "$W/graphs.txt" >> "$summary"
fi

# generation at one shape: part name, shape, batch sizes, sides, time limit, title
gen() {
  want "$1" || return 0
  stamp "$1"
  timeout "$5" python3 scripts/bench/generate_gpu.py --whet-bin target/release/rollout-bench --out "$W" \
    --shape "$2" --batches "$3" --repeats 1 --warmup 1 --sides "$4" > "$W/$1.txt" 2>&1
  section "$6"
  sed -n '/^|/p;/shape (/p' "$W/$1.txt" >> "$summary"
}

gen gen05 qwen0.5b 64,128,256 whet_graphs,whet,hf "${GEN05_TIMEOUT:-170}" "generation, Qwen2.5-0.5B shape"

if want train; then
  stamp "train"
  timeout "${TRAIN_TIMEOUT:-170}" python3 scripts/bench/train_gpu.py --train target/release/train --out "$W" > "$W/train.txt" 2>&1
  section "training efficiency"
  cat "$W/train_gpu.md" >> "$summary" 2>/dev/null || tail -5 "$W/train.txt" >> "$summary"
fi

if want gsm8k; then
  stamp "gsm8k"
  section "GSM8K, SmolLM2-135M-Instruct"
  timeout "${GSM8K_TIMEOUT:-230}" bash scripts/gpu-gsm8k.sh "$W" >> "$summary" 2> "$W/gsm8k.err"
  echo "exit $?" >> "$summary"
fi

gen gen15 qwen1.5b 64,128,256 whet_graphs,hf "${GEN15_TIMEOUT:-120}" "generation, Qwen2.5-1.5B shape"
gen genphi phi4mini 64 whet_graphs,hf "${GENPHI_TIMEOUT:-120}" "generation, Phi-4-mini shape"

if want demo; then
  stamp "demo"
  ( time timeout "${DEMO_TIMEOUT:-130}" ./target/release/train --recipe recipes/demo.toml --output /tmp/demo-cuda --resume never \
      --set model.device=cuda ) > "$W/demo.txt" 2>&1
  section "demo recipe on cuda (fp32)"
  grep -h -E "held-out accuracy: |real|error" "$W/demo.txt" >> "$summary"
fi

if want sharding; then
  stamp "sharding"
  timeout "${SHARDING_TIMEOUT:-240}" python3 scripts/bench/sharding_gpu.py --train target/release/train --out "$W" > "$W/sharding.txt" 2>&1
  section "sharding modes at Phi-4-mini's shape"
  cat "$W/sharding_gpu.md" >> "$summary" 2>/dev/null || tail -5 "$W/sharding.txt" >> "$summary"
fi

stamp "done"
cp "$W/timeline.txt" "$OUT/timeline.txt"
tar czf "$OUT/results.tgz" -C "$OUT" work && rm -rf "$W"
cat "$summary"
