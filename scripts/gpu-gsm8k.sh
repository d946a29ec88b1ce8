#!/usr/bin/env bash
# scripts/gpu-bench.sh's gsm8k part (issue 21, item 3): recipes/smollm2-gsm8k.toml on the real
# SmolLM2-135M-Instruct on the GPU — greedy accuracy on all 1,319 GSM8K test problems before and after SFT and
# GRPO (the recipe's stage evaluations) — then pass@1 (one sample at T 0.6) of the base, SFT and GRPO models.
# Prints a markdown table on stdout; logs go to $1 (the bench's work folder). Needs the assets of
# scripts/gpu-stage.sh (gpu-assets/gsm8k carried, the GGUF parts staged in /tmp/whet-assets).
set -uo pipefail
W="$1"
A=/tmp/whet-assets
gguf="$A/SmolLM2-135M-Instruct.Q4_1.gguf"
model="$A/smollm2-135m-instruct"
data=gpu-assets/gsm8k
if [ ! -s "$data/test.jsonl" ]; then echo "skipped: gpu-assets/gsm8k was not carried (scripts/gpu-stage.sh)"; exit 0; fi
if [ ! -s "$gguf" ] && ls "$A"/smollm2.part* >/dev/null 2>&1; then cat "$A"/smollm2.part* > "$gguf"; fi
if [ ! -s "$gguf" ] || [ "$(sha256sum "$gguf" | cut -d' ' -f1)" != "$(cat "$data/smollm2.sha256")" ]; then
  echo "skipped: the SmolLM2 GGUF is not (completely) staged in $A (scripts/gpu-stage.sh prints the calls)"; exit 0
fi
[ -e "$model/config.json" ] || ./target/release/train convert gguf "$gguf" "$model" >> "$W/gsm8k.log" 2>&1
run=/tmp/whet-gsm8k
set -- --set "model.path=$model" --set "stage.0.data.path=$data/train.jsonl" --set "stage.0.eval.data.path=$data/test.jsonl" \
  --set "stage.1.data.path=$data/train.jsonl" --set "stage.1.eval.data.path=$data/test.jsonl" \
  --set "stage.1.max_steps=${GRPO_STEPS:-20}" --set "model.device=${DEVICE:-cuda}"
# a dry run on a CPU: DEVICE=cpu LIMIT=8 EXTRA="--set model.dtype=float32 --set stage.0.max_steps=2 ..."
# shellcheck disable=SC2086
set -- "$@" ${EXTRA:-} ${LIMIT:+--set stage.0.eval.data.limit=$LIMIT --set stage.1.eval.data.limit=$LIMIT}
( time ./target/release/train --recipe recipes/smollm2-gsm8k.toml --output "$run" --resume never "$@" ) > "$W/gsm8k.log" 2>&1
echo "train exit $?" >> "$W/gsm8k.log"
echo "greedy accuracy on the 1,319 GSM8K test problems (the recipe's stage evaluations):"
echo
grep -E "held-out accuracy|^\||real" "$W/gsm8k.log" | sed 's/^/    /'
echo
echo "| model | pass@1 (1 sample, T 0.6, 320 tokens) |"
echo "|---|---:|"
for m in "base:$model" "after SFT:$run/checkpoints/s00-final/model" "after GRPO:$run/checkpoints/s01-final/model"; do
  name=${m%%:*}; dir=${m#*:}
  [ -e "$dir/config.json" ] || { echo "| $name | (missing) |"; continue; }
  ./target/release/train --device "${DEVICE:-cuda}" eval --model "$dir" --data "$data/test.jsonl" --samples 1 --seeds 1 --temperature 0.6 \
    --max-tokens "${EVAL_TOKENS:-320}" --batch-size 256 --decode auto ${LIMIT:+--limit $LIMIT} --out "$W/eval-${name// /-}.jsonl" > "$W/eval-${name// /-}.json" 2>> "$W/gsm8k.log"
  echo "| $name | $(python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); p = d["pass@1"]["mean"]; print("%.2f %% (%d problems, %.0f tok/s)" % (100 * p, d["problems"], d["generated_tokens"] / d["generate_seconds"]))' "$W/eval-${name// /-}.json" 2>/dev/null) |"
done
