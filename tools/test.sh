#!/usr/bin/env bash
# Installs the dependencies, builds everything and runs the whole CPU test suite
# (GPU tests, labelled `gpu`, are excluded here; run them with `ctest -L gpu` on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build
ctest --test-dir build --output-on-failure -LE gpu "$@"
