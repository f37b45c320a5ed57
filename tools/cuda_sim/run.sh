#!/usr/bin/env bash
# cuda-sim: builds the CUDA kernels (kernels/*.cu) and their tests
# (tests/cuda/test_kernels_*.cpp) with g++ for the CPU and runs them. See README.md.
#
#   tools/cuda_sim/run.sh [doctest args...]           e.g. -tc='rmsnorm*'  or  -ltc
#   tools/cuda_sim/run.sh --engine [doctest args...]  the library's CUDA backend on the
#       simulated device: tests/cuda/test_cuda_engine.cpp and the
#       sim's own tests (tools/cuda_sim/test_sim_runtime.cpp), e.g. -tc='*graph*'
#   tools/cuda_sim/run.sh --bench [pyramid-bench args...]  pyramid-bench on the simulated
#       device, e.g. --shape tiny --prompt 64 --gen 8 (small: the sim is slow)
#
# Environment: PYR_SIM_BUILD (build folder, default build-cuda-sim/, build-cuda-sim-engine/
# with --engine and --bench), PYR_SIM_KERNEL_BUILD (the kernels' and the runtime's objects,
# which every mode shares: default the kernel mode's build folder), PYR_SIM_ASAN=1
# (AddressSanitizer build, in build-cuda-sim[-engine]-asan/),
# CUDA_INC (the folder with the toolkit's cuda_fp16.h), PYR_SIM_EAGER=1 (queued work runs at
# once instead of when the host waits for it: README.md), PYR_SIM_WORKERS, PYR_SIM_STACK_KB,
# PYR_SIM_DEVICE_MEM_MB, PYR_TEST_SEED (the kernel tests' random seed), JOBS (parallel
# compiles, default 2).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
mode=kernels
if [[ "${1:-}" == "--engine" ]]; then
    mode=engine
    shift
elif [[ "${1:-}" == "--bench" ]]; then
    mode=bench
    shift
fi

# The toolkit's half-precision headers are used as they are (they have host code paths);
# nothing else of the toolkit is needed (no nvcc, no libcudart, no GPU).
if [[ -z "${CUDA_INC:-}" ]]; then
    for d in "${CUDA_HOME:-}/include" "${CUDA_PATH:-}/include" /usr/local/cuda/include /usr/include; do
        if [[ -f "$d/cuda_fp16.h" && -f "$d/vector_types.h" ]]; then CUDA_INC="$d"; break; fi
    done
fi
if [[ -z "${CUDA_INC:-}" ]]; then
    echo "SKIPPED: cuda-sim: no cuda_fp16.h found; set CUDA_INC to the toolkit's include" \
         "folder (the headers alone suffice, e.g. pip's nvidia-cuda-runtime wheel)" >&2
    exit 77  # ctest shows it as "Skipped"
fi
if [[ $mode != kernels && ! -f "$CUDA_INC/cublas_v2.h" ]]; then
    echo "SKIPPED: cuda-sim --$mode: no cublas_v2.h next to $CUDA_INC/cuda_fp16.h (the" \
         "backend's declarations of cuBLAS are needed; pip's nvidia-cublas wheel has them)" >&2
    exit 77
fi

extra=()
kernel_folder="$ROOT/build-cuda-sim"
folder="$kernel_folder"
binary=test_cuda_kernels
if [[ $mode == engine ]]; then
    folder="$ROOT/build-cuda-sim-engine"
    binary=test_cuda_engine
elif [[ $mode == bench ]]; then  # the engine mode's objects, and pyramid-bench's main
    folder="$ROOT/build-cuda-sim-engine"
    binary=pyramid-bench
fi
if [[ "${PYR_SIM_ASAN:-0}" == 1 ]]; then
    folder="$folder-asan"
    kernel_folder="$kernel_folder-asan"
    extra=(OPT="-O1 -fno-omit-frame-pointer" EXTRA_CXXFLAGS="-fsanitize=address")
fi
BUILD="${PYR_SIM_BUILD:-$folder}"
if [[ $mode == kernels ]]; then kernel_folder="$BUILD"; fi
KBUILD="${PYR_SIM_KERNEL_BUILD:-$kernel_folder}"
mkdir -p "$BUILD" "$KBUILD"
# absolute: the compiler's dependency files name their targets by the path given, and a
# relative one would not match them (headers changed, objects not rebuilt)
BUILD="$(cd "$BUILD" && pwd)"
KBUILD="$(cd "$KBUILD" && pwd)"
echo "cuda-sim: building in $BUILD, the kernels in $KBUILD (CUDA headers from $CUDA_INC)"
make --no-print-directory -f "$ROOT/tools/cuda_sim/Makefile" -j"${JOBS:-2}" \
    ROOT="$ROOT" BUILD="$BUILD" KBUILD="$KBUILD" CUDA_INC="$CUDA_INC" "${extra[@]}" "$BUILD/$binary"

echo "cuda-sim: $BUILD/$binary $*"
start=$(date +%s)
status=0
"$BUILD/$binary" "$@" || status=$?
echo "cuda-sim: exit status $status after $(( $(date +%s) - start )) s"
exit $status
