#!/usr/bin/env bash
# Checks that `train` runs unchanged under PyTorch's own launcher, torchrun (`--no-python`), and that the job
# it runs ends with the same weights as under whet's launcher: a 2-rank SFT stage on a tiny random model.
#
#   PYTHON=/path/to/python-with-torch-2.11 bash scripts/torchrun-check.sh [path/to/train]
#
# Needs a Python that imports torch 2.11 (for torch.distributed.run); whet itself needs no Python.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-python3}"
bin="$(readlink -f "${1:-target/release/train}")"
"$py" -c "import torch.distributed.run" 2>/dev/null || { echo "torchrun-check: $py cannot import torch.distributed.run (set PYTHON)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/sft.toml" <<'EOF'
[model]
config = { model_type = "qwen2", vocab_size = 260, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 256, tie_word_embeddings = true }
init_seed = 7
tokenizer = "builtin:bytes"
device = "cpu"
[run]
seed = 3
threads = 1
log_every = 2
[[stage]]
kind = "sft"
name = "sft"
synthetic = { count = 48, arithmetic = { seed = 5 } }
tokenize = { max_length = 96 }
max_steps = 6
batch_size = 2
lr = 2e-3
EOF
port=$("$py" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
echo "== whet's launcher"
"$bin" --nproc-per-node 2 --recipe "$work/sft.toml" --output "$work/whet" 2> "$work/whet.log" || { cat "$work/whet.log"; exit 1; }
echo "== torchrun --no-python (master port $port)"
"$py" -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "$port" --no-python \
  "$bin" --recipe "$work/sft.toml" --output "$work/torchrun" 2> "$work/torchrun.log" || { cat "$work/torchrun.log"; exit 1; }
grep -h "rank 1 of 2\|replicas identical" "$work/torchrun.log" | sed 's/^/   /'
a=$(sha256sum < "$work/whet/checkpoints/s00-final/model/model.safetensors")
b=$(sha256sum < "$work/torchrun/checkpoints/s00-final/model/model.safetensors")
echo "whet launcher: ${a%% *}"
echo "torchrun:      ${b%% *}"
[ "$a" = "$b" ] && echo "torchrun-check: OK (same weights)" || { echo "torchrun-check: weights differ" >&2; exit 1; }
