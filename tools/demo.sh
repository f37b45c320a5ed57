#!/usr/bin/env bash
# Quick start: install the build dependencies, build pyramid (Release) and stream a
# completion of `def fibonacci(n):` from the bundled tiny-code-llama model.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build --target pyramid-cli
build/bin/pyramid-cli --prompt 'def fibonacci(n):' --max-tokens 128 --temperature 0 "$@"
