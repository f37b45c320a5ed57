#!/usr/bin/env bash
# Installs the dependencies, builds everything and runs the whole test suite. The GPU tests
# (label `gpu`) run where a CUDA device is present and show as "Skipped" elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build
ctest --test-dir build --output-on-failure "$@"
