#!/usr/bin/env bash
# Compiles model/csrc/cuda_graph.cpp as the model crate's build does and links it with --no-undefined against
# the CUDA libraries of the torch 2.11.0 wheel (libtorch_cuda, libc10_cuda, libc10, libtorch_cpu, cudart): every
# symbol the shim takes from libtorch's CUDA side exists there, so its dlopen after the CUDA preload resolves
# (issue 21: "compile the shim against the cuda libtorch flavour", on a machine without a GPU). Uses the cuda
# flavour of scripts/libtorch.sh when installed, else downloads the wheel (530 MB) to a temporary directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cache="${TCH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/whet}"
cpu="$cache/libtorch-2.11.0-cpu"
cuda="$cache/libtorch-2.11.0-cuda"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -e "$cuda/.complete" ]; then
  root="$cuda"
else
  [ -e "$cpu/.complete" ] || bash scripts/libtorch.sh cpu
  root="$cpu"
  echo "downloading the torch 2.11.0 wheel for its CUDA libraries ..." >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" torch==2.11.0
  (cd "$tmp" && unzip -q -o torch-2.11.0-*.whl 'torch/lib/libtorch_cuda.so' 'torch/lib/libc10_cuda.so')
fi
lib="$root/torch/lib"
extra=$(sed -n 's/^WHET_CUDA_INCLUDE = "\(.*\)"$/\1/p' .cargo/config.toml 2>/dev/null || true)
g++ -std=c++17 -fPIC -shared -O2 -D_GLIBCXX_USE_CXX11_ABI=1 -w \
  -I"$root/torch/include" -I"$root/torch/include/torch/csrc/api/include" -I"$root/nvidia/cu13/include" ${extra:+-I"$extra"} \
  model/csrc/cuda_graph.cpp -o "$tmp/shim.so" \
  -Wl,--no-undefined -Wl,--allow-shlib-undefined -L"$tmp/torch/lib" -L"$lib" -L"$root/nvidia/cu13/lib" \
  -ltorch_cuda -lc10_cuda -lc10 -ltorch_cpu -l:libcudart.so.13
echo "ok: the CUDA-graph shim links with no undefined symbol against torch 2.11.0's CUDA libraries"
