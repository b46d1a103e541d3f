#!/usr/bin/env python3
"""Code-completion prompts from a training run's held-out files (never seen in training).

Each prompt is a top-level function's header and its first body line, cut from the held-out
Python files listed in RUN/files.txt; at most PER_FILE (default two) per file, in file order, so
the set is a fixed function of the split. Usage: heldout-prompts.py RUN_DIR [N [PER_FILE]] >
prompts.jsonl
"""
import json
import sys
from pathlib import Path


def prompts_of(text):
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("def ") or line.startswith("async def "):
            j = i
            # The header may span lines; it ends at the line that ends with ':'.
            while j < len(lines) and not lines[j].rstrip().endswith(":"):
                j += 1
            body = j + 1
            while body < len(lines) and not lines[body].strip():
                body += 1
            if body < len(lines) and lines[body].startswith((" ", "\t")):
                yield "".join(lines[i : j + 1]) + lines[body]
            i = body
        i += 1


def main():
    run = Path(sys.argv[1])
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    per_file = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    files = [
        line.split("\t", 1)[1].strip()
        for line in (run / "files.txt").read_text().splitlines()
        if line.startswith("heldout\t")
    ]
    out = []
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for k, prompt in enumerate(prompts_of(text)):
            if k == per_file or len(prompt) > 400:
                break
            out.append({"prompt": prompt, "source": Path(path).name})
        if len(out) >= limit:
            break
    for row in out[:limit]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
