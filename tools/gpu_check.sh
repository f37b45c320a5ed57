#!/usr/bin/env bash
# One call on a GPU machine: build with CUDA, run the tests (GPU ones included), optionally
# under compute-sanitizer, and time pyramid-bench. Writes logs and results to $OUT (or
# ./gpu-out). Stages: build test sanitize bench (default: build test bench).
#   tools/gpu_check.sh build test sanitize bench
# Dependencies missing on the GPU machine (nlohmann-json, doctest) can be carried in
# .gpu-deps/ (an install prefix: include/, share/cmake/, lib/cmake/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
stages=${*:-build test bench}
has() { [[ " $stages " == *" $1 "* ]]; }
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

if has build; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/summary.txt"
  prefix=""
  [ -d .gpu-deps ] && prefix="-DCMAKE_PREFIX_PATH=$PWD/.gpu-deps"
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPYRAMID_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DPYRAMID_BUILD_BINDINGS=OFF $prefix > "$OUT/build.log" 2>&1 \
    && cmake --build build-gpu -j16 >> "$OUT/build.log" 2>&1
  rc=$?
  log "build rc=$rc"
  [ $rc -ne 0 ] && { tail -40 "$OUT/build.log"; exit 1; }
fi

if has test; then
  ctest --test-dir build-gpu --output-on-failure -j4 -LE gpu > "$OUT/ctest.log" 2>&1
  log "ctest rc=$? $(grep -E 'tests passed|tests failed' "$OUT/ctest.log")"
  grep -E "\(Failed\)|FAILED|ERROR" "$OUT/ctest.log" | head -20
  ./build-gpu/bin/test_cuda > "$OUT/test_cuda.log" 2>&1
  log "test_cuda rc=$? $(grep -E '^\[doctest\] (test cases|assertions)' "$OUT/test_cuda.log" | tr '\n' ' ')"
  grep -E "MESSAGE|near-tie|layers keep|ERROR|FAILED" "$OUT/test_cuda.log" | head -40
fi

if has sanitize; then
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 \
    ./build-gpu/bin/test_cuda > "$OUT/memcheck.log" 2>&1
  log "memcheck rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1)"
fi

if has bench; then
  # the copy bandwidth this card gives (bytes read + written), the physical decode limit's base
  python3 - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import torch
x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(20):
    s.record(); y.copy_(x); e.record(); torch.cuda.synchronize(); times.append(s.elapsed_time(e))
times.sort(); ms = times[len(times) // 2]
print(f"copy bandwidth: {2 * x.numel() / ms / 1e6:.0f} GB/s (median of 20, 2 GiB read + 2 GiB written)")
PY
  bw=$(grep -oE 'copy bandwidth: [0-9]+' "$OUT/summary.txt" | tail -1 | grep -oE '[0-9]+$')
  B=./build-gpu/bin/pyramid-bench
  # each run: one JSON line in bench.jsonl ({"name": ..., "env": ..., the bench's fields})
  run() { local name=$1; shift; local j
          j=$("$B" --bandwidth-gbs "${bw:-3000}" --json "$@" 2>> "$OUT/bench.log")
          echo "{\"name\": \"$name\", \"env\": \"${BENCH_ENV:-}\", \"result\": ${j:-null}}" >> "$OUT/bench.jsonl"
          log "bench $name ${BENCH_ENV:-} $(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print({k: round(d[k], 2) for k in ('prefill_ms','decode_tokens_per_s') if k in d})" "${j:-null}" 2>&1)"; }
  for rows in 1 2 4; do
    BENCH_ENV="PYRAMID_GEMV_ROWS=$rows" PYRAMID_GEMV_ROWS=$rows run 7b_full --shape llama2-7b --batch 1 --prompt 512 --gen 256 --repeat 3
  done
  BENCH_ENV=PYRAMID_CUDA_GEMV_MAX=0 PYRAMID_CUDA_GEMV_MAX=0 run 7b_full_cublas --shape llama2-7b --batch 1 --prompt 512 --gen 256
  BENCH_ENV=PYRAMID_FUSE_SWIGLU=0 PYRAMID_FUSE_SWIGLU=0 run 7b_full_unfused --shape llama2-7b --batch 1 --prompt 512 --gen 256 --repeat 3
  for p in pyramid snapshrink snapkv h2o; do
    run 7b_$p --shape llama2-7b --batch 1 --prompt 512 --gen 256 --kv-policy $p --kv-retention 0.5 --repeat 3
  done
  if [ -n "${BENCH_BATCH:-}" ]; then
    run 7b_full_b32 --shape llama2-7b --batch 32 --prompt 512 --gen 256
    run 7b_pyramid_b32 --shape llama2-7b --batch 32 --prompt 512 --gen 256 --kv-policy pyramid --kv-retention 0.5
  fi
  run bundled --model models/tiny-code-llama --batch 1 --prompt 512 --gen 256
fi
