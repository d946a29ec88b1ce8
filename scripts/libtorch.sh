#!/usr/bin/env bash
# Installs libtorch (from PyPI's torch==2.11.0 wheel) once per machine into a versioned cache outside the
# repository, links <repo>/.libtorch to it and writes an untracked .cargo/config.toml so that plain
# `cargo build` / `cargo test` find it in any clone. Idempotent; concurrent runs wait on a lock.
#
#   scripts/libtorch.sh [auto|cpu|cuda|env]
#
#   cpu   torch + cudart + cupti (needed by libtorch_cpu.so even on CPU), CUDA-only libraries pruned (~550 MB)
#   cuda  torch + the full NVIDIA wheel set (~2.5 GB): libtorch_cuda.so can be loaded at run time, and the
#         CUDA/NCCL headers `cargo build --features nccl` (data parallelism on GPUs) compiles against
#   auto  cuda when an NVIDIA driver is visible, else cpu (default)
#   env   print `export LIBTORCH=... LD_LIBRARY_PATH=...` for the installed flavour
#
# Environment: TCH_CACHE_DIR (default ${XDG_CACHE_HOME:-$HOME/.cache}/whet), PYTHON (default python3).
set -euo pipefail

TORCH_VERSION=2.11.0
mode="${1:-auto}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${TCH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/whet}"
py="${PYTHON:-python3}"

CPU_WHEELS=(torch==$TORCH_VERSION nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85)
CUDA_EXTRA=(nvidia-cublas==13.1.0.3 nvidia-cuda-nvrtc==13.0.88 nvidia-cufft==12.0.0.61 nvidia-cufile==1.15.1.6
  nvidia-curand==10.4.0.35 nvidia-cusolver==12.0.4.66 nvidia-cusparse==12.6.3.3 nvidia-nvjitlink==13.0.88
  nvidia-nvtx==13.0.85 nvidia-cudnn-cu13==9.19.0.56 nvidia-cusparselt-cu13==0.8.0 nvidia-nccl-cu13==2.28.9
  nvidia-nvshmem-cu13==3.4.5
  # headers ProcessGroupNCCL.hpp includes (the dist crate's `nccl` feature); the pins of cuda-toolkit 13.0.2
  nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85)

detect() {
  if [ -e /dev/nvidiactl ] || command -v nvidia-smi >/dev/null 2>&1; then echo cuda; else echo cpu; fi
}

installed_flavour() {
  # the flavour the repo currently points at, else the best one in the cache
  if [ -e "$repo/.libtorch/.complete" ]; then basename "$(readlink -f "$repo/.libtorch")" | sed 's/.*-//'; return; fi
  for f in cuda cpu; do [ -e "$cache/libtorch-$TORCH_VERSION-$f/.complete" ] && { echo $f; return; }; done
  return 1
}

case "$mode" in
  env)
    f=$(installed_flavour) || { echo "libtorch is not installed: run scripts/libtorch.sh" >&2; exit 1; }
    dir=$(readlink -f "$cache/libtorch-$TORCH_VERSION-$f")
    echo "export LIBTORCH=$dir/torch"
    echo "export LD_LIBRARY_PATH=$dir/torch/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    exit 0 ;;
  auto) flavour=$(detect) ;;
  cpu|cuda) flavour=$mode ;;
  *) echo "usage: scripts/libtorch.sh [auto|cpu|cuda|env]" >&2; exit 2 ;;
esac

target="$cache/libtorch-$TORCH_VERSION-$flavour"
mkdir -p "$cache"
exec 9>"$cache/.libtorch-$flavour.lock"
flock 9

if [ ! -e "$target/.complete" ]; then
  tmp=$(mktemp -d "$cache/.tmp-libtorch-$flavour.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  wheels=("${CPU_WHEELS[@]}")
  [ "$flavour" = cuda ] && wheels+=("${CUDA_EXTRA[@]}")
  echo "whet: installing libtorch $TORCH_VERSION ($flavour) into $target ..." >&2
  start=$(date +%s)
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: --no-cache-dir \
    --target "$tmp/pkg" "${wheels[@]}"
  if [ "$flavour" = cpu ]; then
    rm -f "$tmp"/pkg/torch/lib/libtorch_cuda*.so "$tmp"/pkg/torch/lib/libtorch_nvshmem.so \
      "$tmp"/pkg/torch/lib/libtorch_python.so "$tmp"/pkg/torch/lib/libcaffe2_nvrtc.so
  fi
  echo "$TORCH_VERSION" > "$tmp/pkg/torch/build-version"
  touch "$tmp/pkg/.complete"
  rm -rf "$target"
  mv "$tmp/pkg" "$target"
  echo "whet: libtorch ready in $(( $(date +%s) - start )) s ($(du -sh "$target" | cut -f1) on disk)" >&2
fi

# The gloo headers c10d's ProcessGroupGloo.hpp includes (the torch wheel ships none; the dist crate's shim
# needs them): Debian's libgloo-dev unpacked into the cache, no system install; else a system install.
gloo_include() {
  local dir="$cache/gloo-headers"
  if [ -e "$dir/.complete" ]; then echo "$dir/usr/include"; return; fi
  local tmp; tmp=$(mktemp -d "$cache/.tmp-gloo.XXXXXX")
  if (cd "$tmp" && { apt-get download libgloo-dev >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get download libgloo-dev >/dev/null 2>&1; }; } \
      && dpkg -x libgloo-dev_*.deb x) \
      && [ -e "$tmp/x/usr/include/gloo/algorithm.h" ]; then
    rm -rf "$dir"; mv "$tmp/x" "$dir"; rm -rf "$tmp"; touch "$dir/.complete"; echo "$dir/usr/include"; return
  fi
  rm -rf "$tmp"
  if [ ! -e /usr/include/gloo/algorithm.h ] && command -v apt-get >/dev/null 2>&1; then
    echo "whet: apt-get download libgloo-dev failed; installing it" >&2
    apt-get install -y --no-install-recommends libgloo-dev >/dev/null 2>&1 || true
  fi
  if [ -e /usr/include/gloo/algorithm.h ]; then echo /usr/include; return; fi
  echo "whet: warning: no gloo headers (Debian's libgloo-dev); the dist crate will not build" >&2
}
exec 8>"$cache/.gloo.lock"
flock 8
gloo=$(gloo_include)
flock -u 8

# The CUDA headers the model crate's CUDA-graph shim includes beyond the runtime headers every flavour has
# (crt/, cccl's nv/target; 3 MB of wheels, the pins of cuda-toolkit 13.0.2): the cuda flavour has them in
# place; for the cpu flavour they are unpacked into the cache, so that one binary built here can capture
# CUDA graphs on a GPU machine.
cuda_include() {
  [ -e "$target/nvidia/cu13/include/crt/host_config.h" ] && return
  local dir="$cache/cuda-headers-13.0"
  if [ ! -e "$dir/.complete" ]; then
    local tmp; tmp=$(mktemp -d "$cache/.tmp-cuda-headers.XXXXXX")
    if "$py" -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: --no-cache-dir \
        --target "$tmp/pkg" nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 >/dev/null 2>&1; then
      rm -rf "$dir"; mv "$tmp/pkg" "$dir"; touch "$dir/.complete"
    else
      echo "whet: warning: could not install the CUDA crt/cccl headers; building without CUDA graphs" >&2
    fi
    rm -rf "$tmp"
  fi
  [ -e "$dir/.complete" ] && echo "$dir/nvidia/cu13/include"
}
exec 7>"$cache/.cuda-headers.lock"
flock 7
cuda_inc=$(cuda_include || true)
flock -u 7

real=$(readlink -f "$target")
ln -sfn "$real" "$repo/.libtorch.tmp" && mv -T "$repo/.libtorch.tmp" "$repo/.libtorch"
mkdir -p "$repo/.cargo"
cfg="$repo/.cargo/config.toml"
new=$(mktemp "$repo/.cargo/.config.XXXXXX")
{
  echo "# written by scripts/libtorch.sh; not tracked by git"
  echo "[env]"
  echo "LIBTORCH = \"$real/torch\""
  [ -n "$gloo" ] && echo "WHET_GLOO_INCLUDE = \"$gloo\""
  [ -n "$cuda_inc" ] && echo "WHET_CUDA_INCLUDE = \"$cuda_inc\""
  if command -v ccache >/dev/null 2>&1; then echo 'CXX = "ccache g++"'; echo 'CC = "ccache gcc"'; fi
} > "$new"
if cmp -s "$new" "$cfg" 2>/dev/null; then rm -f "$new"; else mv "$new" "$cfg"; fi
