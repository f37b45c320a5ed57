#!/usr/bin/env bash
# One call on a GPU machine: build with CUDA, run the GPU tests, optionally under
# compute-sanitizer, and time pyramid-bench. Writes logs and results to $OUT (or ./gpu-out).
# Stages: build test cpu sanitize bench profile (default: build test bench).
#   tools/gpu_check.sh build test bench
# build: the GPU test binary and pyramid-bench only (device time is scarce: CI runs the CPU
# suite); cpu: builds everything and runs the CPU suite there too. Every run has a time
# limit, so that a hang costs minutes, not the call.
# profile: ncu over two 7B batch-1 decode steps (pyramid-bench marks them as NVTX ranges),
# summed per kernel into profile.txt: launches, device time, share, DRAM GB/s.
# Dependencies missing on the GPU machine (nlohmann-json, doctest) can be carried in
# .gpu-deps/ (an install prefix: include/, share/cmake/, lib/cmake/).
# GPU_CHECK_SECONDS (default 540): the call's time; a bench run or stage that would start
# with under 40 s left is skipped (logged), so that the results so far come back.
# BENCH_BATCH=1: batch 32 (streaming's KV moves too) and the largest batch; BENCH_GQA=1: the
# LLaMA-3-8B shape's grouped decode attention against a block per query head (batch 1 and
# 32, prompt 2048).
# When test_cuda fails, its failing cases run again after the bench (which keeps its time
# first), once with each of the backend's speed-ups switched off (PYRAMID_CUDA_GRAPHS=0, ...):
# summary.txt says which switch, if any, makes them pass (triage.log has the runs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
stages=${*:-build test bench}
has() { [[ " $stages " == *" $1 "* ]]; }
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
time_left() { echo $((deadline - SECONDS)); }
in_time() { [ "$(time_left)" -ge 40 ] || { log "skipped $1: $(time_left) s left"; return 1; }; }

if has build; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/summary.txt"
  prefix=""
  [ -d .gpu-deps ] && prefix="-DCMAKE_PREFIX_PATH=$PWD/.gpu-deps"
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPYRAMID_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DPYRAMID_BUILD_BINDINGS=OFF $prefix > "$OUT/build.log" 2>&1 \
    && cmake --build build-gpu -j16 --target test_cuda pyramid-bench >> "$OUT/build.log" 2>&1
  rc=$?
  log "build rc=$rc"
  [ $rc -ne 0 ] && { tail -40 "$OUT/build.log"; exit 1; }
fi

if has cpu; then
  # the CPU suite; not label kernels (the CPU simulation of what test_cuda runs for real here)
  cmake --build build-gpu -j16 >> "$OUT/build.log" 2>&1 &&
    ctest --test-dir build-gpu --output-on-failure -j8 -LE "gpu|kernels" > "$OUT/ctest.log" 2>&1
  log "ctest rc=$? $(grep -E 'tests passed|tests failed' "$OUT/ctest.log")"
  grep -E "\(Failed\)|FAILED|ERROR" "$OUT/ctest.log" | head -20
fi

if has test && in_time test; then
  timeout $(( $(time_left) < 300 ? $(time_left) : 300 )) ./build-gpu/bin/test_cuda > "$OUT/test_cuda.log" 2>&1
  test_rc=$?
  log "test_cuda rc=$test_rc $(grep -E '^\[doctest\] (test cases|assertions)' "$OUT/test_cuda.log" | tr '\n' ' ')"
  grep -E "MESSAGE|near-tie|layers keep|ERROR|FAILED" "$OUT/test_cuda.log" | head -40
fi

if has sanitize && in_time sanitize; then
  timeout $(( $(time_left) < 300 ? $(time_left) : 300 )) compute-sanitizer --tool memcheck --error-exitcode 9 \
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
          in_time "bench $name" || return 0
          j=$(timeout $(( $(time_left) < 180 ? $(time_left) : 180 )) "$B" --bandwidth-gbs "${bw:-3000}" --json "$@" 2>> "$OUT/bench.log")
          echo "{\"name\": \"$name\", \"env\": \"${BENCH_ENV:-}\", \"result\": ${j:-null}}" >> "$OUT/bench.jsonl"
          log "bench $name ${BENCH_ENV:-} $(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print({k: round(d[k], 2) for k in ('batch','prefill_ms','decode_tokens_per_s','total_tokens_per_s') if k in d}, 'bw fraction', round(d['bandwidth'].get('fraction') or 0, 3), 'steps', d.get('decode_steps'), 'kv MiB', round(d['device_memory']['kv'] / 2**20, 1), 'peak MiB', round(d['device_memory']['peak'] / 2**20))" "${j:-null}" 2>&1)"; }
  # the Done-when runs first (decode at batch 1; pyramid's prefill against full's), then
  # each decode speed-up switched off alone (same machine, same call), then the others
  run 7b_full --shape llama2-7b --batch 1 --prompt 512 --gen 256 --repeat 3
  run 7b_pyramid --shape llama2-7b --batch 1 --prompt 512 --gen 256 --kv-policy pyramid --kv-retention 0.5 --repeat 3
  BENCH_ENV=PYRAMID_CUDA_GRAPHS=0 PYRAMID_CUDA_GRAPHS=0 run 7b_full_nographs --shape llama2-7b --batch 1 --prompt 512 --gen 256 --repeat 3
  BENCH_ENV=PYRAMID_FUSE_SWIGLU=0 PYRAMID_FUSE_SWIGLU=0 run 7b_full_unfused --shape llama2-7b --batch 1 --prompt 512 --gen 256 --repeat 3
  BENCH_ENV=PYRAMID_PDL=0 PYRAMID_PDL=0 run 7b_full_nopdl --shape llama2-7b --batch 1 --prompt 512 --gen 256 --repeat 3
  BENCH_ENV=PYRAMID_ATTN_SPLITS=1 PYRAMID_ATTN_SPLITS=1 run 7b_full_nosplit --shape llama2-7b --batch 1 --prompt 512 --gen 256 --repeat 3
  BENCH_ENV=PYRAMID_GPU_SAMPLING=0 PYRAMID_GPU_SAMPLING=0 run 7b_full_hostsampling --shape llama2-7b --batch 1 --prompt 512 --gen 256 --repeat 3
  # prefill attention on tensor cores (since 2026-12-06) against the CUDA-core kernel
  BENCH_ENV=PYRAMID_TENSOR_CORE_ATTENTION=0 PYRAMID_TENSOR_CORE_ATTENTION=0 run 7b_full_cudacore_attn --shape llama2-7b --batch 1 --prompt 512 --gen 256 --repeat 3
  run 7b_full_p3840 --shape llama2-7b --batch 1 --prompt 3840 --gen 256
  # a long prompt's prefill under pyramid 0.5 (its observed rows recomputed on the tensor cores)
  run 7b_pyramid_p3840 --shape llama2-7b --batch 1 --prompt 3840 --gen 256 --kv-policy pyramid --kv-retention 0.5
  BENCH_ENV=PYRAMID_TENSOR_CORE_ATTENTION=0 PYRAMID_TENSOR_CORE_ATTENTION=0 run 7b_full_p3840_cudacore_attn --shape llama2-7b --batch 1 --prompt 3840 --gen 256
  BENCH_ENV=PYRAMID_ATTN_SPLITS=1 PYRAMID_ATTN_SPLITS=1 run 7b_full_p3840_nosplit --shape llama2-7b --batch 1 --prompt 3840 --gen 256
  # prefill at retention 0.5 against 7b_full's (the Done-when ratio) and the selection overhead
  for p in snapshrink snapkv h2o streaming; do
    run 7b_$p --shape llama2-7b --batch 1 --prompt 512 --gen 256 --kv-policy $p --kv-retention 0.5 --repeat 3
  done
  if [ -n "${BENCH_BATCH:-}" ]; then  # throughput: the paper's point (minutes more)
    run 7b_full_b32 --shape llama2-7b --batch 32 --prompt 512 --gen 256
    # cuBLAS steps captured into graphs (since 2026-12-06) against launching them
    BENCH_ENV=PYRAMID_CUDA_GRAPHS=0 PYRAMID_CUDA_GRAPHS=0 run 7b_full_b32_nographs --shape llama2-7b --batch 32 --prompt 512 --gen 256
    run 7b_pyramid_b32 --shape llama2-7b --batch 32 --prompt 512 --gen 256 --kv-policy pyramid --kv-retention 0.5
    # the sequences' after_step on one host thread, as before 2026-12-07 (now on all of them)
    run 7b_pyramid_b32_host1 --shape llama2-7b --batch 32 --prompt 512 --gen 256 --kv-policy pyramid --kv-retention 0.5 --threads 1
    # StreamingLLM drops the row after its sinks each step: the sinks move toward the back
    # (since 2026-12-07) against the whole window moving toward the front
    run 7b_streaming_b32 --shape llama2-7b --batch 32 --prompt 512 --gen 256 --kv-policy streaming --kv-retention 0.5
    BENCH_ENV=PYRAMID_KV_BACK_MOVES=0 PYRAMID_KV_BACK_MOVES=0 run 7b_streaming_b32_front --shape llama2-7b --batch 32 --prompt 512 --gen 256 --kv-policy streaming --kv-retention 0.5
    # the largest batch that fits the GPU, full against pyramid (retention 0.5)
    run 7b_full_bmax --shape llama2-7b --batch max --prefill-batch 32 --prompt 512 --gen 256
    run 7b_pyramid_bmax --shape llama2-7b --batch max --prefill-batch 32 --prompt 512 --gen 256 --kv-policy pyramid --kv-retention 0.5
  fi
  if [ -n "${BENCH_GQA:-}" ]; then  # grouped-query attention (LLaMA-3-8B shape): decode blocks
    # grouped by KV head (since 2026-12-07) against a block per query head
    for b in 1 32; do
      run 8b_b${b}_p2048 --shape llama3-8b --batch $b --prompt 2048 --gen 128
      BENCH_ENV=PYRAMID_GROUPED_DECODE=0 PYRAMID_GROUPED_DECODE=0 run 8b_b${b}_p2048_per_head --shape llama3-8b --batch $b --prompt 2048 --gen 128
    done
  fi
  run bundled --model models/tiny-code-llama --batch 1 --prompt 512 --gen 256
  # the issue's Done-when figures from bench.jsonl
  [ -f "$OUT/bench.jsonl" ] && python3 - "$OUT/bench.jsonl" <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
runs = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d.get("result"): runs[d["name"]] = d["result"]
full, pyr = runs.get("7b_full"), runs.get("7b_pyramid")
if full:
    bw = full["bandwidth"]
    print(f"DONE-WHEN decode: 7B fp16 b1 P512 G256 {full['decode_tokens_per_s']:.1f} tok/s, "
          f"{(bw.get('fraction') or 0):.3f} of the bandwidth limit (target 0.80; "
          f"{bw.get('bandwidth_gbs')} GB/s copy, {bw['bytes_per_step'] / 1e9:.2f} GB per step)")
if full and pyr:
    print(f"DONE-WHEN prefill: pyramid 0.5 {pyr['prefill_ms']:.2f} ms vs full {full['prefill_ms']:.2f} ms "
          f"(ratio {pyr['prefill_ms'] / full['prefill_ms']:.3f}, target < 1); selection at b1: "
          f"prefill {pyr['selection']['prefill_ms']:.2f} ms, decode {pyr['selection']['decode_ms']:.2f} ms "
          f"over {pyr['gen']} steps; KV retention at the end {pyr['kv_end']['retention']:.3f}")
full_l, pyr_l = runs.get("7b_full_p3840"), runs.get("7b_pyramid_p3840")
if full_l and pyr_l:
    print(f"prefill P3840: pyramid 0.5 {pyr_l['prefill_ms']:.1f} ms vs full {full_l['prefill_ms']:.1f} ms "
          f"(ratio {pyr_l['prefill_ms'] / full_l['prefill_ms']:.3f}); decode {pyr_l['decode_tokens_per_s']:.1f} "
          f"vs {full_l['decode_tokens_per_s']:.1f} tok/s")
for tc, cc in (("7b_full", "7b_full_cudacore_attn"), ("7b_full_p3840", "7b_full_p3840_cudacore_attn")):
    if tc in runs and cc in runs:
        print(f"prefill attention on tensor cores: {tc} {runs[tc]['prefill_ms']:.2f} ms, on CUDA cores "
              f"{runs[cc]['prefill_ms']:.2f} ms (ratio {runs[tc]['prefill_ms'] / runs[cc]['prefill_ms']:.3f})")
either, front = runs.get("7b_streaming_b32"), runs.get("7b_streaming_b32_front")
if either and front:
    e, f = either["decode_tokens_per_s"], front["decode_tokens_per_s"]
    print(f"streaming b32 decode: KV rows moved toward the cheaper end {e:.1f} tok/s, "
          f"toward the front {f:.1f} tok/s (ratio {e / f:.3f})")
for b in (1, 32):
    g, h = runs.get(f"8b_b{b}_p2048"), runs.get(f"8b_b{b}_p2048_per_head")
    if g and h:
        print(f"GQA decode, 8B b{b} P2048: grouped {g['decode_tokens_per_s']:.1f} tok/s, a block per query head "
              f"{h['decode_tokens_per_s']:.1f} tok/s (ratio {g['decode_tokens_per_s'] / h['decode_tokens_per_s']:.3f})")
PY
fi

# The failing cases of test_cuda (doctest names each TEST CASE before its errors) once more
# with each switch, a filter of their names (',' in a name becomes '?', doctest's any-char).
if [ "${test_rc:-0}" -ne 0 ] && [ -f "$OUT/test_cuda.log" ]; then
  failed=$(python3 - "$OUT/test_cuda.log" <<'PY'
import re, sys
names, case = [], None
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"TEST CASE:\s+(.*\S)", line)
    if m:
        case = m.group(1)
    elif case and re.search(r"\b(ERROR|FATAL ERROR)\b", line) and case not in names:
        names.append(case)
print(",".join(n.replace(",", "?") for n in names))
PY
)
  log "triage: failing cases: ${failed:-none found (a crash or a timeout: see test_cuda.log)}"
  if [ -n "$failed" ]; then
    for sw in PYRAMID_CUDA_GRAPHS=0 PYRAMID_TENSOR_CORE_ATTENTION=0 PYRAMID_PDL=0 \
              PYRAMID_GROUPED_DECODE=0 PYRAMID_KV_BACK_MOVES=0 PYRAMID_GPU_SAMPLING=0 \
              PYRAMID_FUSE_SWIGLU=0 PYRAMID_ATTN_SPLITS=1; do
      in_time "triage $sw" || break
      echo "== $sw" >> "$OUT/triage.log"
      env "$sw" timeout $(( $(time_left) < 120 ? $(time_left) : 120 )) ./build-gpu/bin/test_cuda \
        -tc="$failed" >> "$OUT/triage.log" 2>&1
      log "triage: with $sw rc=$? $(grep -E '^\[doctest\] test cases' "$OUT/triage.log" | tail -1)"
    done
  fi
fi

if has profile && in_time profile; then
  timeout $(( $(time_left) < 400 ? $(time_left) : 400 )) ncu --clock-control none --print-units base --csv --nvtx --nvtx-include "decode/" \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
    ./build-gpu/bin/pyramid-bench --shape llama2-7b --batch 1 --prompt 512 --gen 2 --repeat 1 \
    > "$OUT/ncu.csv" 2> "$OUT/ncu.log"
  log "profile rc=$?"
  python3 - "$OUT/ncu.csv" <<'PY' 2>&1 | tee "$OUT/profile.txt"
import collections, csv, re, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 5]
head = next((i for i, r in enumerate(rows) if "Metric Name" in r), None)
if head is None:
    sys.exit("no ncu rows (see ncu.log)")
cols = {n: i for i, n in enumerate(rows[head])}
per = collections.defaultdict(lambda: {"ids": set(), "ns": 0.0, "bytes": 0.0})
for r in rows[head + 1:]:
    name = r[cols["Kernel Name"]].replace("(anonymous namespace)::", "").replace("void ", "")
    name = re.split(r"[<(]", name)[0].split("::")[-1]  # gemv_kernel, rmsnorm_kernel, ...
    k = per[name]
    k["ids"].add(r[cols["ID"]])
    v = float(r[cols["Metric Value"]].replace(",", "") or 0)
    if r[cols["Metric Name"]] == "gpu__time_duration.sum":
        k["ns"] += v
    else:
        k["bytes"] += v
total = sum(k["ns"] for k in per.values()) or 1.0
print(f"{'kernel':28s} {'launches':>8s} {'us':>10s} {'share':>7s} {'DRAM GB/s':>10s}")
for name, k in sorted(per.items(), key=lambda kv: -kv[1]["ns"]):
    gbs = k["bytes"] / k["ns"] if k["ns"] else 0.0
    print(f"{name:28s} {len(k['ids']):8d} {k['ns'] / 1e3:10.1f} {100 * k['ns'] / total:6.1f}% {gbs:10.0f}")
print(f"{'total (2 decode steps)':28s} {sum(len(k['ids']) for k in per.values()):8d} {total / 1e3:10.1f}")
PY
fi
