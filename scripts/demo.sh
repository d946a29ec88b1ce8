#!/usr/bin/env bash
# The main job on a fresh machine: installs libtorch (once per machine), builds `train` and runs the
# embedded demo. Extra arguments go to `train`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/libtorch.sh
cargo build --release -p trainer --bin train
exec ./target/release/train smoke "$@"
