#!/usr/bin/env bash
# The main job on a fresh machine: installs libtorch (once per machine), builds `train` and runs the
# embedded demo (recipes/demo.toml: the four stages of Phi-4-Mini-Reasoning — mid-training, SFT, Rollout-DPO,
# GRPO — on a tiny random model and synthetic arithmetic, with held-out accuracy after each stage). Extra arguments go to `train`, e.g. `--resume never` to start over.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/libtorch.sh
cargo build --release -p trainer --bin train
exec ./target/release/train --recipe recipes/demo.toml "$@"
